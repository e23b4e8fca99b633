"""The job table's bookkeeping: the XOR ledger, attempts, and who holds what."""

from __future__ import annotations

import json

from blueengine import protocol
from blueengine.hub import Hub
from blueengine.jobs import Job, JobTable
from blueengine.types import JobStatus
from tests import engines


def start(table: JobTable, payload: object = None) -> tuple[Job, protocol.Envelope]:
    job = Job(f"job-{len(table.jobs)}", payload)
    table.add(job)
    envelope = table.next_envelope()
    assert envelope is not None
    table.dispatched(envelope, "first")
    return job, envelope


def ack(table, envelope, replica, item, children=(), sent=None):
    xor = item
    for child in children:
        xor ^= child
    table.on_records(
        replica, "step", [[protocol.ACK, envelope.job_id, envelope.attempt, xor, sent or {}]]
    )


def result(table, envelope, value):
    table.on_records(
        "last",
        "last",
        [[protocol.OUT, envelope.job_id, envelope.attempt, "Result", json.dumps(value)]],
    )


def test_a_fanned_out_job_is_done_only_when_every_child_is_acked_in_any_order():
    table = JobTable()
    job, envelope = start(table)
    children = [11, 22, 33]
    ack(table, envelope, "last", 22)
    ack(table, envelope, "first", envelope.item_id, children, {"last": 3})
    ack(table, envelope, "last", 11)
    assert job.status is JobStatus.RUNNING
    ack(table, envelope, "last", 33)
    assert job.status is JobStatus.DONE


def test_a_dead_replica_holding_work_retries_the_job_and_drops_the_old_attempts_records():
    table = JobTable(max_attempts=2)
    job, first = start(table)
    ack(table, first, "first", first.item_id, [5], {"middle": 1})
    result(table, first, {"from": "attempt 1"})

    assert table.replica_died("middle", "square") == [job.job_id]
    assert job.status is JobStatus.QUEUED
    second = table.next_envelope()
    assert second is not None and second.attempt == 2
    result(table, first, {"late": "record of attempt 1"})
    ack(table, first, "middle", 5)
    assert job.results == []

    table.dispatched(second, "first")
    result(table, second, {"from": "attempt 2"})
    ack(table, second, "first", second.item_id)
    assert job.status is JobStatus.DONE
    assert job.results == [{"from": "attempt 2"}]


def test_a_replica_that_dies_holding_nothing_retries_nothing():
    table = JobTable()
    job, _envelope = start(table)
    assert table.replica_died("idle", "square") == []
    assert job.status is JobStatus.RUNNING


def test_work_sent_to_a_replica_already_dead_is_retried_when_the_ack_says_so():
    table = JobTable()
    job, envelope = start(table)
    table.replica_died("gone", "square")
    ack(table, envelope, "first", envelope.item_id, [7], {"gone": 1})
    assert job.status is JobStatus.QUEUED
    assert job.attempts == 1


def test_attempts_run_out_with_a_reason():
    table = JobTable(max_attempts=1)
    job, _envelope = start(table)
    table.replica_died("first", "numbers")
    assert job.status is JobStatus.FAILED
    assert job.error["type"] == "AttemptsExhausted"
    assert "step 'numbers' died" in job.error["message"]


def test_a_job_submitted_before_the_hub_starts_is_queued_once(tmp_path):
    hub = Hub(engines.engine, f"ipc://{tmp_path}/jobs", f"ipc://{tmp_path}/events")
    job = hub.submit({"n": 1})
    hub.start()
    try:
        with hub.lock:
            assert hub.table.queue.count(job.job_id) == 1
    finally:
        hub.stop()
