"""The engine in real processes: delivery, fan-out, failures, cancellation, retries, drain."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil

from blueengine import JobStatus
from tests import engines
from tests.conftest import wait_until


def test_jobs_flow_through_three_steps_and_replicas_share_the_work(run_engine):
    client = run_engine(engines.three_steps(replicas=2, delay_s=0.002))
    ids = [client.submit({"n": n}) for n in range(100)]
    jobs = list(client.as_completed(ids, timeout_s=60))

    assert {job.status for job in jobs} == {JobStatus.DONE}
    assert sorted(job.results[0]["n"] for job in jobs) == list(range(100))
    assert all(
        job.results == [{"n": r["n"], "square": r["n"] ** 2, "pid": r["pid"]} for r in job.results]
        for job in jobs
    )
    workers = {job.results[0]["pid"] for job in jobs}
    assert workers == set(client.supervisor.pids("square"))


def test_kill_9_of_a_middle_replica_loses_no_job_and_shows_no_result_twice(run_engine):
    client = run_engine(engines.three_steps(replicas=2, delay_s=0.02))
    victim = client.supervisor.pids("square")[0]
    ids = [client.submit({"n": n}) for n in range(200)]
    wait_until(lambda: sum(client.get(i).status.final for i in ids) >= 20, what="progress")
    os.kill(victim, signal.SIGKILL)

    jobs = list(client.as_completed(ids, timeout_s=90))

    assert [job.status for job in jobs] == [JobStatus.DONE] * 200
    for job in jobs:
        n = job.payload["n"]
        assert [(r["n"], r["square"]) for r in job.results] == [(n, n * n)]
    assert any(job.attempts > 1 for job in jobs), "the killed replica held no work"
    assert all(job.results[0]["pid"] != victim for job in jobs if job.attempts > 1)
    wait_until(lambda: len(client.supervisor.pids("square")) == 2, what="the restart")
    assert victim not in client.supervisor.pids("square")


def test_one_job_fanning_out_into_50_items_completes_once_with_50_results(run_engine):
    client = run_engine(engines.fan_out_engine())
    job = client.wait(client.submit({"items": 50}), timeout_s=30)

    assert job.status is JobStatus.DONE
    assert sorted(r["index"] for r in job.results) == list(range(50))
    assert len(job.statuses) == 50


def test_finish_from_the_last_step_ends_the_job(run_engine):
    client = run_engine(engines.fan_out_engine())
    job = client.wait(client.submit({"items": 1, "last_finishes": True}), timeout_s=30)

    assert job.status is JobStatus.DONE
    assert job.results == [{"index": 0}]
    assert job.statuses[-1] == {"type": "finish"}


def test_finish_from_a_middle_step_drops_the_rest_of_the_job(run_engine, tmp_path):
    log = tmp_path / "processed"
    client = run_engine(engines.fan_out_engine(log=str(log)))
    job_id = client.submit({"items": 30, "finish_at": 0, "delay_s": 0.05})
    job = client.wait(job_id, timeout_s=30)
    assert job.status is JobStatus.DONE

    sentinel = client.wait(client.submit({"items": 1}), timeout_s=30)
    assert sentinel.status is JobStatus.DONE
    processed = [line for line in _lines(log) if line.startswith(job_id)]
    assert len(processed) <= 3, f"{len(processed)} of 29 items ran after the finish"
    assert len(job.results) <= 3


def test_an_exception_fails_its_job_only_and_the_step_keeps_serving(run_engine):
    client = run_engine(engines.three_steps())
    ids = [client.submit({"n": n, "fail_on": 3}) for n in range(10)]
    jobs = {job.payload["n"]: job for job in client.as_completed(ids, timeout_s=30)}

    assert [n for n, job in jobs.items() if job.status is JobStatus.FAILED] == [3]
    assert jobs[3].error == {
        "step": "square",
        "type": "ValueError",
        "message": "refusing 3",
        "code": None,
    }
    assert all(job.status is JobStatus.DONE for n, job in jobs.items() if n != 3)
    later = client.wait(client.submit({"n": 11}), timeout_s=30)
    assert later.status is JobStatus.DONE
    assert later.results[0]["square"] == 121


def test_cancel_drops_the_remaining_items_of_a_long_job(run_engine, tmp_path):
    log = tmp_path / "processed"
    client = run_engine(engines.fan_out_engine(log=str(log)))
    job_id = client.submit({"items": 100, "delay_s": 0.02})
    wait_until(lambda: len(client.get(job_id).results) >= 3, what="the first results")

    assert client.cancel(job_id)
    seen = len(_lines(log))
    job = client.wait(job_id, timeout_s=10)
    sentinel = client.wait(client.submit({"items": 1}), timeout_s=30)

    assert job.status is JobStatus.CANCELLED
    assert sentinel.status is JobStatus.DONE
    processed = [line for line in _lines(log) if line.startswith(job_id)]
    assert len(processed) <= seen + 3, f"{len(processed) - seen} items ran after the cancel"
    assert not client.cancel(job_id)


def test_a_slow_last_step_keeps_every_process_memory_bounded(run_engine):
    client = run_engine(engines.slow_sink_engine())
    processes = {
        name: psutil.Process(client.supervisor.pids(name)[0]) for name in ("produce", "hop", "sink")
    }
    before = {name: p.memory_info().rss for name, p in processes.items()}
    peak = dict(before)
    items, size = 400, 1 << 20  # 400 MiB produced in all, far faster than the sink takes it
    job_id = client.submit({"items": items, "size": size})

    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name, process in processes.items():
                peak[name] = max(peak[name], process.memory_info().rss)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        job = client.wait(job_id, timeout_s=60)
    finally:
        stop.set()
        sampler.join()

    assert job.status is JobStatus.DONE
    assert len(job.results) == items
    growth = {name: (peak[name] - before[name]) / 2**20 for name in processes}
    # Credit windows of two items per hop: a few MiB in flight, never the 400 MiB produced.
    assert max(growth.values()) < 40, f"memory grew by {growth} MiB"


def test_sigterm_drains_a_replica_without_retrying_any_job(run_engine):
    client = run_engine(engines.three_steps(replicas=2, delay_s=0.005))
    leaving = client.supervisor.pids("square")[0]
    ids = [client.submit({"n": n}) for n in range(150)]
    wait_until(lambda: sum(client.get(i).status.final for i in ids[:40]) >= 20, what="progress")
    os.kill(leaving, signal.SIGTERM)

    jobs = list(client.as_completed(ids, timeout_s=60))

    assert [job.status for job in jobs] == [JobStatus.DONE] * 150
    assert all(job.attempts == 1 for job in jobs), "a drained replica must not lose work"
    wait_until(lambda: leaving not in client.supervisor.pids("square"), what="the exit")
    assert client.supervisor.exit_codes("square") == [0]


def test_stop_drains_jobs_in_flight_before_the_steps_exit(run_engine):
    client = run_engine(engines.three_steps(delay_s=0.01))
    ids = [client.submit({"n": n}) for n in range(30)]
    wait_until(lambda: client.hub.in_flight > 0, what="work in flight")
    client.stop(drain=True)

    jobs = [client.get(i) for i in ids]
    assert all(job.status.final for job in jobs)
    done = [job for job in jobs if job.status is JobStatus.DONE]
    assert len(done) >= 1
    for job in jobs:
        if job.status is not JobStatus.DONE:
            assert job.error["message"] == "the engine stopped before the job finished"


def test_replica_processes_are_named_and_sockets_are_private(run_engine):
    client = run_engine(engines.three_steps(replicas=2))
    titles = set()
    for step in ("numbers", "square", "report"):
        for pid in client.supervisor.pids(step):
            titles.add(" ".join(psutil.Process(pid).cmdline()).strip())
    assert titles == {
        "blueengine squares numbers[0]",
        "blueengine squares square[0]",
        "blueengine squares square[1]",
        "blueengine squares report[0]",
    }
    assert os.stat(client.ipc_dir).st_mode & 0o777 == 0o700


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
