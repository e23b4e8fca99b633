"""Jobs from submission to a final state: attempts, the completion ledger, who holds what.

A job's work is a tree of items: the root enters the first step, each step may forward children.
Every item id is a random 64-bit number. The ledger of an attempt starts at the root id; when a
replica finishes an item it reports `item ^ child_1 ^ ... ^ child_n`, so the ledger returns to 0
exactly when every item spawned has passed the last step, in constant space per job.

For retries the table also counts, per attempt, how many items each replica holds (sent to it and
not yet reported done). When a replica dies, every attempt it held work of is run again as a new
attempt; records of a superseded attempt are ignored, so results never show twice.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from blueengine import protocol
from blueengine.protocol import Envelope
from blueengine.types import JobStatus


@dataclass
class Job:
    """A job as clients see it; `results` and `statuses` are those of its current attempt."""

    job_id: str
    payload: Any
    status: JobStatus = JobStatus.QUEUED
    results: list[Any] = field(default_factory=list)
    statuses: list[Any] = field(default_factory=list)
    error: dict[str, Any] | None = None
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "results": self.results,
            "error": self.error,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


@dataclass
class _Attempt:
    number: int
    ledger: int
    holders: Counter[str] = field(default_factory=Counter)
    results: list[Any] = field(default_factory=list)
    statuses: list[Any] = field(default_factory=list)
    deadline: float | None = None


def new_item_id() -> int:
    # Never 0: a ledger of 0 means "complete".
    return random.getrandbits(64) or 1


def new_job_id() -> str:
    return uuid.uuid4().hex


Listener = Callable[[Job, str, Any], None]
"""Called as listener(job, event, data). Events: 'status' and 'result' (data: the message),
'statistic' (data: (step, the message)),
'retry' (data: the reason), 'final' (data: the status) and 'drop' (data: the last attempt whose
items still in the engine must be dropped)."""


class JobTable:
    """Every live job and its current attempt. Not thread-safe: the hub owns it."""

    def __init__(self, max_attempts: int = 3, job_timeout_s: float | None = None) -> None:
        self.max_attempts = max_attempts
        self.job_timeout_s = job_timeout_s
        self.jobs: dict[str, Job] = {}
        self.queue: list[str] = []  # job ids waiting for the first step, oldest first
        self._attempts: dict[str, _Attempt] = {}
        self._dead: set[str] = set()
        self.listeners: list[Listener] = []

    # -- intake ------------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Queue a job (new, or unfinished after a restart) for its next attempt."""
        self.jobs[job.job_id] = job
        job.status = JobStatus.QUEUED
        if job.attempts >= self.max_attempts:
            # Resumed after a restart with every attempt spent: perhaps the job itself brought
            # the engine down, so it must not run again.
            reason = "the engine stopped while its last attempt ran"
            message = f"gave up after {job.attempts} attempts: {reason}"
            self._finish(job.job_id, JobStatus.FAILED, _error(None, "AttemptsExhausted", message))
            return
        self.queue.append(job.job_id)

    def next_envelope(self) -> Envelope | None:
        """Start the next attempt of the oldest queued job; None when none waits."""
        while self.queue:
            job = self.jobs.get(self.queue.pop(0))
            if job is None or job.status is not JobStatus.QUEUED:
                continue
            job.attempts += 1
            root = new_item_id()
            deadline = time.time() + self.job_timeout_s if self.job_timeout_s else None
            attempt = _Attempt(job.attempts, root, deadline=deadline)
            self._attempts[job.job_id] = attempt
            # Clients see the current attempt's messages as they arrive; a retry starts afresh.
            job.results, job.statuses = attempt.results, attempt.statuses
            job.status = JobStatus.RUNNING
            return Envelope(job.job_id, job.attempts, root, deadline)
        return None

    def dispatched(self, envelope: Envelope, replica_id: str) -> bool:
        """Record that the root item went to `replica_id`; False if that replica is dead."""
        attempt = self._current(envelope.job_id, envelope.attempt)
        if attempt is None:
            return True
        attempt.holders[replica_id] += 1
        if replica_id in self._dead:
            self._retry(envelope.job_id, f"replica {replica_id} died")
            return False
        return True

    def undispatched(self, envelope: Envelope) -> None:
        """The root item could not be sent: put the job back at the head of the queue."""
        job = self.jobs.get(envelope.job_id)
        if job is None or self._current(envelope.job_id, envelope.attempt) is None:
            return
        del self._attempts[job.job_id]
        job.attempts -= 1
        job.status = JobStatus.QUEUED
        self.queue.insert(0, job.job_id)

    # -- records from replicas ---------------------------------------------------------------

    def on_records(self, replica_id: str, step: str, records: Iterable[list[Any]]) -> None:
        for record in records:
            kind, job_id, number = record[0], record[1], record[2]
            if self._current(job_id, number) is None:
                continue  # a superseded or finished attempt: its records must not count.
            if kind == protocol.OUT:
                self._on_output(job_id, step, record[3], record[4])
            elif kind == protocol.ACK:
                self._on_ack(job_id, replica_id, record[3], record[4])
            elif kind == protocol.FAIL:
                self._finish(job_id, JobStatus.FAILED, _error(*record[3:7]))

    def _on_output(self, job_id: str, step: str, channel: str, text: str) -> None:
        attempt = self._attempts[job_id]
        job = self.jobs[job_id]
        value = json.loads(text)
        if channel == "Result":
            attempt.results.append(value)
            self._notify(job, "result", value)
        elif channel == "Status":
            attempt.statuses.append(value)
            self._notify(job, "status", value)
            if isinstance(value, dict) and value.get("type") == "finish":
                self._finish(job_id, JobStatus.DONE)
        else:
            self._notify(job, "statistic", (step, value))

    def _on_ack(self, job_id: str, replica_id: str, xor: int, sent: dict[str, int]) -> None:
        attempt = self._attempts[job_id]
        attempt.ledger ^= xor
        attempt.holders[replica_id] -= 1
        for target, count in sent.items():
            attempt.holders[target] += count
        if self._dead and any(attempt.holders[t] > 0 for t in sent if t in self._dead):
            self._retry(job_id, "a replica holding its work died")
        elif attempt.ledger == 0:
            self._finish(job_id, JobStatus.DONE, settled=True)

    # -- failures, cancellation, deadlines ---------------------------------------------------

    def replica_died(self, replica_id: str, step: str) -> list[str]:
        """Retry every attempt that had work inside the replica; returns their job ids."""
        self._dead.add(replica_id)
        hit = [j for j, a in self._attempts.items() if a.holders.get(replica_id, 0) > 0]
        for job_id in hit:
            self._retry(job_id, f"a replica of step {step!r} died holding its work")
        return hit

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> bool:
        """Cancel a job that has not finished; False if it had already."""
        job = self.jobs.get(job_id)
        if job is None or job.status.final:
            return False
        self._finish(job_id, JobStatus.CANCELLED, _error(None, "Cancelled", reason))
        return True

    def expire(self, now: float) -> None:
        """Retry (or fail) every attempt past its deadline."""
        for job_id, attempt in list(self._attempts.items()):
            if attempt.deadline is not None and now > attempt.deadline:
                self._retry(job_id, f"it missed its deadline of {self.job_timeout_s} s")

    def _retry(self, job_id: str, reason: str) -> None:
        job = self.jobs[job_id]
        if job.attempts >= self.max_attempts:
            message = f"gave up after {job.attempts} attempts: {reason}"
            self._finish(job_id, JobStatus.FAILED, _error(None, "AttemptsExhausted", message))
            return
        attempt = self._attempts.pop(job_id)
        job.status, job.results, job.statuses = JobStatus.QUEUED, [], []
        self.queue.insert(0, job_id)
        self._notify(job, "drop", attempt.number)
        self._notify(job, "retry", reason)

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        error: dict[str, Any] | None = None,
        *,
        settled: bool = False,
    ) -> None:
        """End a job. Unless `settled` (every item accounted for), items may still be in flight."""
        job = self.jobs[job_id]
        self._attempts.pop(job_id, None)
        job.status, job.error, job.finished_at = status, error, time.time()
        if not settled and job.attempts:
            self._notify(job, "drop", job.attempts)
        self._notify(job, "final", status)

    # -- helpers -----------------------------------------------------------------------------

    def _current(self, job_id: str, number: int) -> _Attempt | None:
        attempt = self._attempts.get(job_id)
        return attempt if attempt is not None and attempt.number == number else None

    def _notify(self, job: Job, event: str, data: Any) -> None:
        for listener in self.listeners:
            listener(job, event, data)

    @property
    def in_flight(self) -> int:
        return len(self._attempts)

    def forget(self, job_id: str) -> None:
        """Drop a finished job from memory."""
        job = self.jobs.get(job_id)
        if job is not None and job.status.final:
            del self.jobs[job_id]


def _error(step: str | None, kind: str, message: str, code: str | None = None) -> dict[str, Any]:
    """A job's error: the step at fault, the exception type, its message, and a stable code
    when the exception carried one (clients branch on the code, people read the message)."""
    return {"step": step, "type": kind, "message": message, "code": code}
