"""`blueengine serve`: started as a user starts it, stopped by signals, killed, and restarted."""

from __future__ import annotations

import shlex
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time

import httpx
import pytest

from blueengine import JobStatus
from tests import gateway_engines
from tests.conftest import wait_until

APP = "tests.gateway_engines:engine"


@pytest.fixture
def served(tmp_path):
    """Start `blueengine serve` processes; each is stopped and its steps checked gone."""
    started: list[gateway_engines.Served] = []
    # A gateway killed with -9 cannot remove its ipc directory: have it made where we clean
    # up. A short path, as ipc socket paths must stay under about 100 characters.
    ipc_parent = tempfile.mkdtemp(prefix="be-")

    def start(db: str | None = None, *args: str) -> gateway_engines.Served:
        log_dir = tmp_path / f"run{len(started)}"
        log_dir.mkdir()
        process = gateway_engines.Served(
            APP,
            db or str(tmp_path / "jobs.db"),
            *args,
            log_dir=str(log_dir),
            env={"TMPDIR": ipc_parent},
        )
        started.append(process)
        return process

    yield start
    for process in started:
        steps = process.step_pids() if process.process.poll() is None else []
        process.stop()
        assert gateway_engines.wait_gone(steps) == []
    shutil.rmtree(ipc_parent)


def _statuses(db: str) -> dict[str, str]:
    with sqlite3.connect(db) as connection:
        return dict(connection.execute("SELECT job_id, status FROM jobs").fetchall())


def test_it_prints_its_url_and_a_curl_example_that_works_then_logs_each_job(served):
    # --replicas too: the announcement comes once every replica of every step is ready.
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed, so the printed example cannot be pasted")
    server = served(None, "--replicas", "work=2")
    url = server.wait_ready()
    ready = httpx.get(f"{url}/readyz", timeout=30).json()
    assert ready["steps"] == {"take": 1, "work": 2, "report": 1}

    printed = server.out.read_text().splitlines()
    assert "steps: take x1, work x2, report x1" in printed[1]
    example = next(line.strip() for line in printed if line.strip().startswith("curl "))
    assert f"{url}/jobs?wait=30" in example
    answer = subprocess.run(
        shlex.split(example), capture_output=True, text=True, timeout=60, check=True
    )
    job = httpx.Response(200, content=answer.stdout).json()
    assert job["status"] == "done" and job["results"] == [{"n": 7, "square": 49}]
    wait_until(
        lambda: f"Job {job['job_id']} done after" in server.err.read_text(),
        what="the job's log line",
    )

    server.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert server.process.wait(60) == 0


def test_sigterm_drains_the_jobs_running_and_keeps_the_rest_for_the_next_start(served, tmp_path):
    db = str(tmp_path / "jobs.db")
    server = served(db)
    url = server.wait_ready()
    with httpx.Client(base_url=url, timeout=30) as http:
        ids = [http.post("/jobs", json={"n": n, "delay_s": 0.2}).json()["job_id"] for n in range(6)]
    rival = served(db)
    assert rival.process.wait(60) == 2
    assert "in use by another process" in rival.err.read_text()

    steps = server.step_pids()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    assert gateway_engines.wait_gone(steps) == []

    statuses = _statuses(db)
    assert set(statuses) == set(ids)
    assert set(statuses.values()) <= {"done", "queued"}, statuses
    assert "done" in statuses.values(), "nothing that was running got to finish"


def test_kill_9_loses_no_accepted_job_and_shows_no_result_twice(served, tmp_path):
    db = str(tmp_path / "jobs.db")
    first = served(db)
    url = first.wait_ready()
    with httpx.Client(base_url=url, timeout=30) as http:
        accepted = [http.post("/jobs", json={"n": n, "delay_s": 0.05}) for n in range(50)]
        assert {response.status_code for response in accepted} == {202}

        def some_done() -> bool:
            done = http.get("/jobs", params={"status": "done", "limit": 100}).json()
            return len(done["jobs"]) >= 5

        wait_until(some_done, what="a few jobs to finish")
    ids = [response.json()["job_id"] for response in accepted]
    steps = first.step_pids()
    first.kill()
    assert gateway_engines.wait_gone(steps, timeout_s=10) == [], "steps outlived their gateway"
    assert "queued" in _statuses(db).values(), "every job had ended: the restart has no work"

    second = served(db)
    with httpx.Client(base_url=second.wait_ready(), timeout=30) as http:
        jobs = [_final(http, job_id) for job_id in ids]

    assert [job["status"] for job in jobs] == ["done"] * 50
    for n, job in enumerate(jobs):
        assert job["results"] == [{"n": n, "square": n * n}]


def _final(http: httpx.Client, job_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if JobStatus(job["status"]).final:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end after the restart")
