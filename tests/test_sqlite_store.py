"""The SQLite job store: what it keeps, paging, pruning, one owner, jobs resumed after a stop."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

from blueengine import Job, JobStatus
from blueengine.hub import Hub
from blueengine.sqlite_store import SqliteStore, StoreLocked
from tests import engines, gateway_engines


@pytest.fixture
def store(tmp_path):
    opened = SqliteStore(tmp_path / "jobs.db")
    yield opened
    opened.close()


def _finished(job_id: str, status: JobStatus = JobStatus.DONE, **fields) -> Job:
    job = Job(job_id, {"n": 1}, status=status, attempts=1, finished_at=time.time())
    for name, value in fields.items():
        setattr(job, name, value)
    return job


def test_a_job_reads_back_as_it_was_added_and_finished(store):
    payload = {"pair": (1, "a"), "image": np.arange(6, dtype=np.uint16).reshape(2, 3)}
    store.add(Job("a", payload))

    queued = store.get("a")
    assert queued.status is JobStatus.QUEUED
    assert queued.payload["pair"] == (1, "a")
    assert np.array_equal(queued.payload["image"], payload["image"])

    error = {"step": "work", "type": "ValueError", "message": "bad"}
    store.finish(
        _finished("a", JobStatus.FAILED, payload=payload, results=[{"x": 1}], error=error,
                  statuses=[{"type": "message", "message": "hi"}])
    )  # fmt: skip
    failed = store.get("a")
    assert failed.status is JobStatus.FAILED
    assert failed.results == [{"x": 1}]
    assert failed.statuses == [{"type": "message", "message": "hi"}]
    assert failed.error == error
    assert failed.attempts == 1
    assert failed.finished_at is not None
    assert store.get("missing") is None


def test_a_job_is_on_disk_when_add_returns(store, tmp_path):
    store.add(Job("durable", {"n": 1}))

    other = sqlite3.connect(tmp_path / "jobs.db")
    try:
        rows = other.execute("SELECT job_id, status FROM jobs").fetchall()
    finally:
        other.close()
    assert rows == [("durable", "queued")]


def test_unfinished_jobs_come_back_oldest_first_and_finished_ones_do_not(store):
    for job_id in ("first", "second", "third"):
        store.add(Job(job_id, {"id": job_id}))
    store.finish(_finished("second"))

    assert [job.job_id for job in store.unfinished()] == ["first", "third"]


def test_pages_walk_every_job_newest_first_and_filter_by_status(store):
    for index in range(7):
        store.add(Job(f"j{index}", {"n": index}))
    for index in (1, 4):
        store.finish(_finished(f"j{index}"))

    seen, cursor = [], None
    while True:
        jobs, cursor = store.page(None, 3, cursor)
        seen.append([job.job_id for job in jobs])
        if cursor is None:
            break
    assert seen == [["j6", "j5", "j4"], ["j3", "j2", "j1"], ["j0"]]

    done, more = store.page(JobStatus.DONE, 10, None)
    assert [job.job_id for job in done] == ["j4", "j1"] and more is None
    unfinished, _ = store.page(JobStatus.RUNNING, 10, None)
    assert [job.job_id for job in unfinished] == ["j6", "j5", "j3", "j2", "j0"]
    assert store.page(None, 3, "not-a-cursor") == ([], None)


def test_finished_jobs_are_pruned_by_count_and_by_age_but_unfinished_ones_never(tmp_path):
    store = SqliteStore(tmp_path / "jobs.db", keep_finished=2, keep_finished_s=3600)
    try:
        store.add(Job("waiting", {"n": 0}))
        for index in range(4):
            store.add(Job(f"f{index}", {"n": index}))
            store.finish(_finished(f"f{index}"))
        store.add(Job("old", {"n": 9}))
        store.finish(_finished("old", finished_at=time.time() - 7200))

        assert store.prune() == 3
        kept = {job.job_id for job in store.page(None, 100, None)[0]}
        assert kept == {"waiting", "f2", "f3"}
    finally:
        store.close()


def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
    first = SqliteStore(tmp_path / "jobs.db")
    first.add(Job("kept", {"n": 1}))
    with pytest.raises(StoreLocked, match="in use by another process"):
        SqliteStore(tmp_path / "jobs.db")
    first.close()

    second = SqliteStore(tmp_path / "jobs.db")
    try:
        assert second.get("kept").payload == {"n": 1}
    finally:
        second.close()


def test_threads_may_add_and_finish_at_once(store):
    def add_and_finish(prefix: str) -> None:
        for index in range(50):
            store.add(Job(f"{prefix}{index}", {"n": index}))
            store.finish(_finished(f"{prefix}{index}"))

    threads = [threading.Thread(target=add_and_finish, args=(p,)) for p in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    jobs, _ = store.page(JobStatus.DONE, 1000, None)
    assert len(jobs) == 200


def test_jobs_left_unfinished_by_a_stop_are_resumed_by_the_next_engine(tmp_path):
    engine = gateway_engines.make_engine("resume", delay_s=0.05)
    store = SqliteStore(tmp_path / "jobs.db")
    with engine.run_local(store=store, ready_timeout_s=30) as client:
        ids = [client.submit({"n": n}) for n in range(30)]
        client.stop()  # drains what runs; the queued jobs stay queued in the store
    left = {job.job_id for job in store.unfinished()}
    assert left, "every job finished before the stop; nothing was left to resume"
    assert all(store.get(job_id).status is not JobStatus.CANCELLED for job_id in ids)
    store.close()

    store = SqliteStore(tmp_path / "jobs.db")
    try:
        with engine.run_local(store=store, ready_timeout_s=30) as client:
            jobs = {job.job_id: job for job in client.as_completed(left, timeout_s=60)}
        assert {job.status for job in jobs.values()} == {JobStatus.DONE}
        for job_id in ids:
            job = store.get(job_id)
            assert job.status is JobStatus.DONE
            assert job.results == [{"n": job.payload["n"], "square": job.payload["n"] ** 2}]
    finally:
        store.close()


def test_a_job_that_spent_its_attempts_before_a_restart_fails_instead_of_running_again(tmp_path):
    path = tmp_path / "jobs.db"
    store = SqliteStore(path)
    spent, fresh = Job("spent", {"n": 1}), Job("fresh", {"n": 2})
    store.add(spent)
    store.add(fresh)
    store.started([("spent", 3), ("fresh", 1)])
    store.close()

    store = SqliteStore(path)
    hub = Hub(
        engines.three_steps(max_attempts=3),
        f"ipc://{tmp_path}/j",
        f"ipc://{tmp_path}/e",
        store=store,
    )
    hub.start()
    try:
        failed = hub.get("spent")
        assert failed.status is JobStatus.FAILED
        assert failed.error["type"] == "AttemptsExhausted"
        assert "stopped while its last attempt ran" in failed.error["message"]
        assert store.get("spent").status is JobStatus.FAILED
        with hub.lock:
            assert hub.table.queue == ["fresh"]
            assert hub.table.jobs["fresh"].attempts == 1
    finally:
        hub.stop()
        store.close()
