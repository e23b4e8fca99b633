"""Where jobs are kept: in memory by default; the gateway keeps them in SQLite.

The hub writes a job to its store before the job is acknowledged, and again when it ends. After a
restart the hub queues every job the store holds unfinished, so nothing accepted is lost.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

from blueengine.jobs import Job
from blueengine.types import JobStatus


class JobStore(Protocol):
    """What the hub needs of a place to keep jobs. Implementations must be thread-safe."""

    def add(self, job: Job) -> None:
        """Keep a new job; durable when this returns."""

    def started(self, attempts: list[tuple[str, int]]) -> None:
        """Record that these jobs started these attempts (so a restart knows how many ran)."""

    def finish(self, job: Job) -> None:
        """Record a job's final state, results and error."""

    def unfinished(self) -> list[Job]:
        """Jobs added and not finished, oldest first (to resubmit after a restart)."""

    def get(self, job_id: str) -> Job | None:
        """A job by id, or None."""

    def page(
        self, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, optionally of one status; returns them and the next cursor."""

    def close(self) -> None:
        """Release files and connections."""


class MemoryStore:
    """Jobs in this process's memory; keeps the newest `keep_finished` finished jobs."""

    def __init__(self, keep_finished: int = 10_000) -> None:
        self.keep_finished = keep_finished
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.job_id] = job

    def started(self, attempts: list[tuple[str, int]]) -> None:
        pass  # the jobs here are the hub's own objects, which count their attempts

    def finish(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.job_id] = job
            self._finished[job.job_id] = None
            while len(self._finished) > self.keep_finished:
                old, _ = self._finished.popitem(last=False)
                self._jobs.pop(old, None)

    def unfinished(self) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if not job.status.final]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def page(
        self, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        with self._lock:
            newest_first = list(reversed(self._jobs.values()))
        if cursor is not None:
            ids = [job.job_id for job in newest_first]
            newest_first = newest_first[ids.index(cursor) + 1 :] if cursor in ids else []
        chosen = [job for job in newest_first if status is None or job.status is status]
        page = chosen[:limit]
        more = len(chosen) > limit
        return page, (page[-1].job_id if more and page else None)

    def close(self) -> None:
        pass
