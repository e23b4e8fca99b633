"""The `blueengine` command, started the way users start it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from blueengine import JobStatus
from blueengine.hub import Hub
from tests import engines
from tests.conftest import wait_until

APP = "tests.engines:engine"


def blueengine(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blueengine", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.parametrize("mode", [[], ["--inline"]])
def test_run_prints_one_json_line_per_job_in_input_order(mode):
    done = blueengine("run", APP, *mode, "--input", '{"n": 4}', "--input", '{"n": 5}')

    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["status"] for line in lines] == ["done", "done"]
    assert [line["results"][0]["square"] for line in lines] == [16, 25]
    assert set(lines[0]) == {"job_id", "status", "results", "error"}
    assert "2/2 jobs" in done.stderr


@pytest.mark.parametrize("mode", [[], ["--inline"]])
def test_run_exits_1_when_a_job_failed_and_reads_jsonl(tmp_path, mode):
    payloads = tmp_path / "jobs.jsonl"
    payloads.write_text('{"n": 1}\n\n{"n": 2, "fail_on": 2}\n')
    done = blueengine("run", APP, *mode, "--jsonl", str(payloads))

    assert done.returncode == 1
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["status"] == "done"
    assert second["status"] == "failed"
    assert second["error"]["step"] == "square"
    assert second["error"]["message"] == "refusing 2"


def test_run_explains_bad_input():
    bad_json = blueengine("run", APP, "--input", "{nope")
    bad_app = blueengine("run", "tests.engines:nothing", "--input", "{}")
    bad_replicas = blueengine("run", APP, "--replicas", "square=zero", "--input", "{}")

    assert bad_json.returncode == 2
    assert "--input is not valid JSON" in bad_json.stderr
    assert "has no attribute 'nothing'" in bad_app.stderr
    assert "--replicas takes STEP=N" in bad_replicas.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def tcp_hub() -> Iterator[Hub]:
    hub = Hub(engines.engine, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    hub.start()
    yield hub
    hub.stop()


def test_step_processes_on_tcp_find_each_other_by_host_name(tcp_hub):
    numbers_port, square_port = free_port(), free_port()
    common = ["--hub", tcp_hub.events_endpoint]
    commands = [
        [
            "--step",
            "numbers",
            "--upstream",
            tcp_hub.jobs_endpoint,
            "--bind",
            f"tcp://127.0.0.1:{numbers_port}",
        ],
        [
            "--step",
            "square",
            "--upstream",
            f"tcp://localhost:{numbers_port}",
            "--bind",
            f"tcp://127.0.0.1:{square_port}",
        ],
        ["--step", "report", "--upstream", f"tcp://localhost:{square_port}"],
    ]
    env = {**os.environ, "BLUEENGINE_LOG_LEVEL": "WARNING"}
    steps = [
        subprocess.Popen([sys.executable, "-m", "blueengine", "step", APP, *common, *args], env=env)
        for args in commands
    ]
    try:
        wait_until(lambda: all(tcp_hub.live_replicas().values()), what="three steps joined")
        ids = [tcp_hub.submit({"n": n}).job_id for n in range(20)]
        jobs = [tcp_hub.wait(job_id, timeout_s=30) for job_id in ids]
        assert [job.status for job in jobs] == [JobStatus.DONE] * 20
        assert [job.results[0]["square"] for job in jobs] == [n * n for n in range(20)]
    finally:
        for step in steps:
            step.send_signal(signal.SIGTERM)
        codes = [step.wait(timeout=30) for step in steps]
    assert codes == [0, 0, 0]


def test_step_says_what_it_needs():
    done = blueengine("step", APP, "--step", "square", "--upstream", "tcp://127.0.0.1:1")
    assert done.returncode == 2
    assert "needs --hub and --upstream" in done.stderr


def test_replicas_die_with_a_supervisor_killed_with_kill_9():
    args = ["run", "tests.engines:slow", "--input", '{"n": 1}', "--input", '{"n": 2}']
    run = subprocess.Popen(
        [sys.executable, "-m", "blueengine", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        parent = psutil.Process(run.pid)
        wait_until(lambda: len(_replicas(parent)) == 4, what="four replicas")
        replicas = _replicas(parent)
        run.kill()
        run.wait(timeout=10)
        _gone, alive = psutil.wait_procs(replicas, timeout=10)
        assert alive == []
    finally:
        run.kill()
        run.wait(timeout=10)


def _replicas(parent: psutil.Process) -> list[psutil.Process]:
    return [p for p in parent.children() if " ".join(p.cmdline()).startswith("blueengine ")]
