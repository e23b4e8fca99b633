"""The HTTP gateway, in process (httpx over ASGI) and as a user runs it (`blueengine serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import psutil
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from blueengine import JobStatus
from blueengine import gateway as gateway_module
from blueengine.gateway import GatewaySettings, create_app
from blueengine.sqlite_store import SqliteStore
from tests import gateway_engines
from tests.conftest import wait_until

KEYS = ("key-one", "key-two")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


class _RecordingStore(SqliteStore):
    """Notes when each job's row was written, to compare with when its 202 arrived."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.added: dict[str, float] = {}

    def add(self, job) -> None:
        super().add(job)
        self.added[job.job_id] = time.monotonic()


@pytest.fixture(scope="module")
def engine_client(tmp_path_factory):
    """The test engine, jobs in SQLite, shared by this module's in-process tests."""
    tmp = tmp_path_factory.mktemp("gateway")
    store = _RecordingStore(tmp / "jobs.db")
    engine = gateway_engines.make_engine(mark=str(tmp / "marks"))
    client = engine.run_local(store=store, ready_timeout_s=30, drain_timeout_s=5)
    client.start()
    client.marks = tmp / "marks"
    yield client
    client.stop()
    store.close()


def _asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.fixture
async def http(engine_client):
    app = create_app(engine_client.hub, GatewaySettings())
    async with _asgi_client(app) as client:
        yield client
    app.state.gateway.detach()


async def _finished(http: httpx.AsyncClient, job_id: str, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = (await http.get(f"/jobs/{job_id}")).json()
        if JobStatus(job["status"]).final:
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s")


# -- in process ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_job_is_kept_before_its_202_and_polls_to_its_result(http, engine_client):
    response = await http.post("/jobs", json={"n": 12})
    answered_at = time.monotonic()

    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert response.json()["status"] in ("queued", "running", "done")
    assert response.headers["location"] == f"/jobs/{job_id}"
    assert engine_client.hub.store.added[job_id] <= answered_at

    job = await _finished(http, job_id)
    assert job["status"] == "done"
    assert job["results"] == [{"n": 12, "square": 144}]
    assert job["error"] is None and job["attempts"] == 1
    assert job["finished_at"] >= job["created_at"]


@pytest.mark.anyio
async def test_wait_answers_200_with_the_finished_job_or_202_while_it_runs(http):
    finished = await http.post("/jobs", params={"wait": 20}, json={"n": 5})
    assert finished.status_code == 200
    assert finished.json()["results"] == [{"n": 5, "square": 25}]

    running = await http.post("/jobs", params={"wait": 0.1}, json={"n": 1, "delay_s": 0.5})
    assert running.status_code == 202
    assert running.json()["status"] in ("queued", "running")
    assert running.headers["location"].endswith(running.json()["job_id"])
    assert (await _finished(http, running.json()["job_id"]))["status"] == "done"


@pytest.mark.anyio
async def test_pages_list_every_job_once_newest_first(http):
    ids = []
    for n in range(7):
        response = await http.post("/jobs", params={"wait": 20}, json={"n": n})
        ids.append(response.json()["job_id"])

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await http.get("/jobs", params=params)).json()
        assert len(page["jobs"]) <= 3
        seen += [job["job_id"] for job in page["jobs"]]
        cursor, pages = page["next_cursor"], pages + 1
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and pages >= 3
    assert [job_id for job_id in seen if job_id in ids] == ids[::-1]

    done = (await http.get("/jobs", params={"status": "done", "limit": 1000})).json()
    assert {job["status"] for job in done["jobs"]} == {"done"}
    assert set(ids) <= {job["job_id"] for job in done["jobs"]}
    running = (await http.get("/jobs", params={"status": "running"})).json()
    assert not set(ids) & {job["job_id"] for job in running["jobs"]}


@pytest.mark.anyio
async def test_delete_cancels_a_running_job_and_refuses_one_that_had_ended(http):
    job_id = (await http.post("/jobs", json={"n": 2, "delay_s": 0.5})).json()["job_id"]

    cancelled = await http.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"]["type"] == "Cancelled"
    assert (await http.delete(f"/jobs/{job_id}")).status_code == 200  # cancelling twice is fine
    assert (await http.get(f"/jobs/{job_id}")).json()["status"] == "cancelled"

    finished = (await http.post("/jobs", params={"wait": 20}, json={"n": 3})).json()
    refused = await http.delete(f"/jobs/{finished['job_id']}")
    assert refused.status_code == 409
    assert "already ended done" in refused.json()["detail"]
    assert (await http.delete("/jobs/no-such-job")).status_code == 404


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "url", "options", "status"),
    [
        ("POST", "/jobs", {"json": {"n": "twelve"}}, 422),
        ("POST", "/jobs", {"json": {"n": 1, "fail": 0}}, 422),
        ("POST", "/jobs", {"json": [1, 2]}, 422),
        (
            "POST",
            "/jobs",
            {"content": b"{bad", "headers": {"content-type": "application/json"}},
            422,
        ),
        ("POST", "/jobs", {}, 422),
        ("POST", "/jobs?wait=-1", {"json": {"n": 1}}, 422),
        ("POST", "/jobs?wait=nan", {"json": {"n": 1}}, 422),
        ("GET", "/jobs?limit=0", {}, 422),
        ("GET", "/jobs?status=lost", {}, 422),
        ("GET", "/jobs?cursor=garbage", {}, 200),
        ("GET", "/jobs/no-such-job", {}, 404),
        ("GET", "/jobs/no-such-job/events", {}, 404),
        ("PUT", "/jobs", {"json": {}}, 405),
        ("POST", "/control", {"json": {"big": 2**70}}, 422),
        ("POST", "/control", {"json": "not an object"}, 422),
        ("GET", "/nowhere", {}, 404),
    ],
)
async def test_what_a_client_gets_wrong_is_answered_as_json_with_a_reason(
    http, method, url, options, status
):
    response = await http.request(method, url, **options)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    if status != 200:
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]
    if status == 405:
        assert response.headers["allow"] == "GET, POST"


@pytest.mark.anyio
async def test_a_body_over_the_limit_is_refused_with_or_without_content_length(engine_client):
    app = create_app(engine_client.hub, GatewaySettings(max_body_bytes=1000))
    padded = json.dumps({"n": 1, "pad": "x" * 2000}).encode()

    async def chunks():
        for start in range(0, len(padded), 100):
            yield padded[start : start + 100]

    async with _asgi_client(app) as http:
        declared = await http.post(
            "/jobs", content=padded, headers={"content-type": "application/json"}
        )
        streamed = await http.post(
            "/jobs", content=chunks(), headers={"content-type": "application/json"}
        )
        small = await http.post("/jobs", json={"n": 1})
    app.state.gateway.detach()

    assert declared.status_code == 413 and streamed.status_code == 413
    assert "limit of 1000 bytes" in streamed.json()["detail"]
    assert small.status_code == 202


@pytest.mark.anyio
async def test_a_full_engine_answers_429_with_retry_after_and_takes_jobs_again_later(run_engine):
    client = run_engine(gateway_engines.make_engine("gw-full", delay_s=0.2), max_jobs=2)
    app = create_app(client.hub, GatewaySettings())
    async with _asgi_client(app) as http:
        accepted = [await http.post("/jobs", json={"n": n}) for n in range(2)]
        refused = await http.post("/jobs", json={"n": 2})
        for response in accepted:
            await _finished(http, response.json()["job_id"])
        later = await http.post("/jobs", params={"wait": 20}, json={"n": 3})

    assert [r.status_code for r in accepted] == [202, 202]
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "2 unfinished jobs" in refused.json()["detail"]
    assert later.status_code == 200


@pytest.mark.anyio
async def test_readyz_says_503_until_every_step_has_a_live_replica(tmp_path):
    client = gateway_engines.make_engine("gw-ready").run_local(ready_timeout_s=30)
    app = create_app(client.hub, GatewaySettings())
    try:
        async with _asgi_client(app) as http:
            before = await http.get("/readyz")
            health = await http.get("/healthz")
            client.start()
            after = await http.get("/readyz")
    finally:
        client.stop()

    assert before.status_code == 503
    assert before.json()["steps"] == {"take": 0, "work": 0, "report": 0}
    assert "take, work, report" in before.json()["detail"]
    assert health.status_code == 200
    assert after.status_code == 200
    assert after.json() == {
        "ready": True,
        "steps": {"take": 1, "work": 1, "report": 1},
        "detail": None,
    }


@pytest.mark.anyio
async def test_keys_guard_every_job_and_control_route_but_not_probes_or_metrics(engine_client):
    app = create_app(engine_client.hub, GatewaySettings(api_keys=KEYS))
    known = engine_client.submit({"n": 1})
    engine_client.wait(known, timeout_s=20)
    routes = [
        ("POST", "/jobs", {"json": {"n": 1}}),
        ("GET", "/jobs", {}),
        ("GET", f"/jobs/{known}", {}),
        ("GET", f"/jobs/{known}/events", {}),
        ("DELETE", f"/jobs/{known}", {}),
        ("POST", "/control", {"json": {"type": "noop"}}),
    ]
    wrong_keys = [{}, {"Authorization": "Bearer key-three"}, {"Authorization": f"Basic {KEYS[0]}"}]

    async with _asgi_client(app) as http:
        for method, url, options in routes:
            for headers in wrong_keys:
                refused = await http.request(method, url, headers=headers, **options)
                assert refused.status_code == 401, (method, url, headers)
                assert refused.headers["www-authenticate"].startswith("Bearer")
                assert "BLUEENGINE_API_KEYS" in refused.json()["detail"]
            allowed = await http.request(method, url, headers=AUTH, **options)
            assert allowed.status_code in (200, 202, 409), (method, url, allowed.text)
        for url in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert (await http.get(url)).status_code == 200, url
    app.state.gateway.detach()


@pytest.mark.anyio
async def test_control_commands_reach_the_steps_that_list_control(http, engine_client):
    response = await http.post("/control", json={"type": "mark", "text": "hello steps"})

    assert response.status_code == 202 and response.json() == {"status": "sent"}
    wait_until(
        lambda: engine_client.marks.exists() and "hello steps" in engine_client.marks.read_text(),
        what="the command to reach the report step",
    )


@contextlib.contextmanager
def _uvicorn(app):
    """The app on a real uvicorn, on a thread of this process, at port 0."""
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_until(lambda: server.started, what="uvicorn to listen")
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_quiet_stream_is_kept_alive_and_a_client_that_leaves_leaves_nothing_waiting(
    engine_client, monkeypatch
):
    monkeypatch.setattr(gateway_module, "KEEPALIVE_S", 0.05)
    app = create_app(engine_client.hub, GatewaySettings())
    gateway = app.state.gateway
    with _uvicorn(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        job_id = http.post("/jobs", json={"n": 1, "delay_s": 0.5, "statuses": 3}).json()["job_id"]
        with http.stream("GET", f"/jobs/{job_id}/events") as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert next(line for line in lines if line) == ": keep-alive"
            assert gateway.watching == 1
        wait_until(lambda: gateway.watching == 0, what="the stream's watcher to go")
        assert json.loads(first[5:]) == {"type": "message", "message": "taken"}
        assert http.post("/jobs", params={"wait": 20}, json={"n": 2}).status_code == 200
    gateway.detach()


# -- against `blueengine serve` -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`blueengine serve` of the test engine with API keys, as a user starts it."""
    tmp = tmp_path_factory.mktemp("live")
    served = gateway_engines.Served(
        "tests.gateway_engines:engine",
        str(tmp / "jobs.db"),
        log_dir=str(tmp),
        env={"BLUEENGINE_API_KEYS": ",".join(KEYS)},
    )
    try:
        served.wait_ready()
        steps = served.step_pids()
        yield served
    finally:
        served.stop()
    assert gateway_engines.wait_gone(steps) == []


def test_events_stream_a_jobs_statuses_in_order_then_its_end(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as http:
        payload = {"n": 3, "statuses": 5, "delay_s": 0.3}
        job_id = http.post("/jobs", json=payload).json()["job_id"]
        with http.stream("GET", f"/jobs/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            live_events = gateway_engines.read_events(stream.iter_lines())
        replayed = gateway_engines.read_events(http.get(f"/jobs/{job_id}/events").text.splitlines())

    messages = [data["message"] for event, data in live_events if event == "status"]
    assert messages == ["taken", *(f"status {i}" for i in range(5))]
    assert [event for event, _ in live_events][-1] == "final"
    final = live_events[-1][1]
    assert final["status"] == "done" and final["results"] == [{"n": 3, "square": 9}]
    assert replayed == live_events


def test_a_streamed_body_over_the_limit_is_cut_off_by_the_real_server(live):
    def megabytes():
        yield b'{"n": 1, "pad": "'
        for _ in range(2048):
            yield b"x" * 1024
        yield b'"}'

    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as http:
        response = http.post(
            "/jobs", content=megabytes(), headers={"content-type": "application/json"}
        )
        assert http.get("/healthz").status_code == 200

    assert response.status_code == 413
    assert "limit of 1048576 bytes" in response.json()["detail"]


def test_fuzzed_requests_get_no_5xx_and_answers_that_match_the_openapi_document(live):
    # The key goes in through the schema's own security scheme, so that negative cases can
    # still leave it out and expect a 401.
    config = SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": KEYS[1]}}}}
    )
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=config, timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 10

    for operation in operations:
        _fuzz(operation, GenerationMode.POSITIVE)
        if operation.path not in ("/healthz", "/readyz", "/metrics"):  # nothing to get wrong
            _fuzz(operation, GenerationMode.NEGATIVE)


def _fuzz(operation, mode: GenerationMode) -> None:
    # /control refuses integers beyond 64 bits, which a schema of "any object" cannot say, and
    # /jobs/upload's `payload` form field must hold a JSON object, which a form's string field
    # cannot say: schema-valid requests to those two may rightly get a 422.
    loose = ("/control", "/jobs/upload")
    excluded = [positive_data_acceptance] if operation.path in loose else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def call_and_check(case) -> None:
        case.call_and_validate(excluded_checks=excluded, timeout=30)

    call_and_check()


def test_a_flood_gets_429s_while_memory_stays_flat_and_every_accepted_job_finishes(tmp_path):
    served = gateway_engines.Served(
        "tests.gateway_engines:slow",
        str(tmp_path / "jobs.db"),
        "--max-jobs",
        "20",
        log_dir=str(tmp_path),
    )
    try:
        served.wait_ready()
        steps = served.step_pids()
        gateway = psutil.Process(served.process.pid)
        outcome = asyncio.run(_flood(served.url, gateway))
        with httpx.Client(base_url=served.url, timeout=30) as http:
            ends = [_wait_done(http, job_id) for job_id in outcome["accepted"]]
    finally:
        served.stop()
    assert gateway_engines.wait_gone(steps) == []

    assert outcome["codes"] <= {202, 429}, outcome["codes"]
    assert outcome["refused"] > 300, "the engine was never full"
    assert 20 <= len(outcome["accepted"]) < 300
    assert set(ends) == {"done"}
    growth_mib = (outcome["peak_rss"] - outcome["rss_before"]) / 2**20
    # 600 jobs of 256 KiB are 150 MiB of payload; only the 20 the engine holds may stay.
    assert growth_mib < 50, f"the gateway grew by {growth_mib:.0f} MiB"


async def _flood(url: str, gateway: psutil.Process) -> dict:
    pad = "x" * 262144
    accepted: list[str] = []
    codes: set[int] = set()
    refused = 0
    rss_before = gateway.memory_info().rss
    peak = [rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], gateway.memory_info().rss)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    limits = httpx.Limits(max_connections=16)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            queue = iter(range(600))

            async def worker() -> None:
                nonlocal refused
                for n in queue:
                    response = await http.post("/jobs", json={"n": n, "pad": pad})
                    codes.add(response.status_code)
                    if response.status_code == 202:
                        accepted.append(response.json()["job_id"])
                    else:
                        refused += 1
                        assert int(response.headers["retry-after"]) >= 1

            await asyncio.gather(*(worker() for _ in range(16)))
    finally:
        stop.set()
        sampler.join()
    return {
        "accepted": accepted,
        "codes": codes,
        "refused": refused,
        "rss_before": rss_before,
        "peak_rss": peak[0],
    }


def _wait_done(http: httpx.Client, job_id: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = http.get(f"/jobs/{job_id}").json()["status"]
        if JobStatus(status).final:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")
