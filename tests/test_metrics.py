"""/metrics: every step's built-in series, Statistic keys by their rule, and promtool's verdict."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from blueengine.gateway import GatewaySettings, create_app
from blueengine.metrics import StatisticSeries
from tests import gateway_engines
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _statistic_text(series: StatisticSeries) -> dict[tuple[str, frozenset], float]:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()

    class Only:
        def collect(self):
            return series.collect()

    registry.register(Only())
    return _samples(generate_latest(registry).decode())


def _labels(step: str, **extra: str) -> frozenset:
    return frozenset({"engine": "e", "step": step, **extra}.items())


def test_numbers_count_times_histogram_and_other_values_are_counted_as_ignored():
    series = StatisticSeries("e")
    series.add("detect", {"facesDetected": 3, "decode_ms": 12, "cache_hit": True})
    series.add("detect", {"facesDetected": 2, "decode_ms": 30, "cache_hit": False})
    series.add("detect", {"cpu_ms_total": 1500, "label": "text", "nan": float("nan")})
    series.add("detect", {"faces_detected": -1, "items": [1, 2]})
    series.add("align", 7)

    samples = _statistic_text(series)
    assert samples[("blueengine_statistic_faces_detected_total", _labels("detect"))] == 5
    assert samples[("blueengine_statistic_cache_hit_total", _labels("detect"))] == 1
    assert samples[("blueengine_statistic_cpu_seconds_total", _labels("detect"))] == 1.5
    assert samples[("blueengine_statistic_decode_seconds_count", _labels("detect"))] == 2
    assert samples[("blueengine_statistic_decode_seconds_sum", _labels("detect"))] == pytest.approx(
        0.042
    )
    bucket = ("blueengine_statistic_decode_seconds_bucket", _labels("detect", le="0.025"))
    assert samples[bucket] == 1
    assert samples[("blueengine_statistic_values_ignored_total", _labels("detect"))] == 4
    assert samples[("blueengine_statistic_values_ignored_total", _labels("align"))] == 1


def test_a_name_keeps_its_first_type_and_the_number_of_series_is_capped():
    series = StatisticSeries("e", max_series=3)
    series.add("a", {"wait_seconds": 1.0})
    series.add("a", {"wait_seconds_total": 2.0})  # a counter would clash with the histogram
    for index in range(5):
        series.add("a", {f"key_{index}": 1})

    names = {name for name, _ in _statistic_text(series)}
    assert "blueengine_statistic_wait_seconds_total" not in names
    made = {n for n in names if n.startswith("blueengine_statistic_key_")}
    assert made == {"blueengine_statistic_key_0_total", "blueengine_statistic_key_1_total"}
    ignored = _statistic_text(series)
    assert ignored[("blueengine_statistic_values_ignored_total", _labels("a"))] == 4


@pytest.fixture(scope="module")
def busy_app():
    """An engine that has run jobs, one of them failed, and the gateway in front of it."""
    client = gateway_engines.make_engine("gw-metrics").run_local(ready_timeout_s=30)
    client.start()
    try:
        app = create_app(client.hub, GatewaySettings())
        ids = [client.submit({"n": n}) for n in range(20)]
        ids.append(client.submit({"n": 1, "fail": True}))
        list(client.as_completed(ids, timeout_s=30))
        yield client, app
    finally:
        client.stop()


async def _scrape(app) -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        await http.post("/jobs", json={"n": 3})
        await http.get("/jobs/no-such-job")
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


async def test_metrics_carry_every_steps_built_in_series_and_the_statistics_steps_wrote(busy_app):
    client, app = busy_app
    # Replicas report with their heartbeats, about once a second.
    wait_until(
        lambda: all(s["items_in"] >= 20 for s in client.hub.step_stats().values()),
        what="heartbeats with the steps' counts",
    )
    samples = _samples(await _scrape(app))

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset({"engine": "gw-metrics", **labels}.items()))]

    for step in ("take", "work", "report"):
        assert value("blueengine_step_items_in_total", step=step) >= 20
        assert value("blueengine_step_processing_seconds_count", step=step) >= 20
        assert value("blueengine_step_replicas", step=step) == 1
        for name in (
            "waiting_seconds_total",
            "blocked_seconds_total",
            "items_in_flight",
            "credits",
            "errors_total",
            "items_dropped_total",
            "items_out_total",
        ):
            assert (f"blueengine_step_{name}", _labels_of("gw-metrics", step)) in samples
    assert value("blueengine_step_errors_total", step="work") == 1
    assert value("blueengine_statistic_jobs_reported_total", step="report") >= 20
    assert value("blueengine_statistic_report_seconds_count", step="report") >= 20
    assert value("blueengine_jobs_total", outcome="done") >= 20
    assert value("blueengine_jobs_total", outcome="failed") == 1
    assert value("blueengine_job_duration_seconds_count", outcome="done") >= 20
    assert value("blueengine_jobs_accepted_total") == 1
    http_404 = {"method": "GET", "route": "/jobs/{job_id}", "code": "404"}
    assert value("blueengine_http_requests_total", **http_404) == 1


def _labels_of(engine: str, step: str) -> frozenset:
    return frozenset({"engine": engine, "step": step}.items())


async def test_no_job_id_ever_becomes_a_label(busy_app):
    client, app = busy_app
    text = await _scrape(app)
    job_ids = {job.job_id for job in client.hub.store.page(None, 100, None)[0]}
    assert job_ids
    assert not any(job_id in text for job_id in job_ids)
    assert not re.search(r'route="/jobs/[0-9a-f]{32}', text)


async def test_promtool_finds_nothing_to_complain_about(busy_app, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing; CI must install it (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    _, app = busy_app
    text = await _scrape(app)
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""
