"""Jobs kept in an SQLite file, so that a gateway that restarts resumes what it had accepted.

The file is in WAL mode with ``synchronous=NORMAL``: a job is committed before `add` returns and
survives the gateway process dying (``kill -9``); a power cut may lose the last few commits.
Pass ``synchronous="FULL"`` to fsync every commit as well, at the price of a disk flush per job.

Payloads are kept in the engine's wire codec (msgpack plus raw buffers), so a job resumed after a
restart gets back exactly what it was given, numpy arrays and tuples included; results, statuses
and errors are JSON, as they left the engine.

One process owns a file at a time: a second store opened on the same path fails with
`StoreLocked`, because two gateways resuming the same unfinished jobs would run them twice.

Finished jobs are pruned once they are older than `keep_finished_s` or beyond the newest
`keep_finished` (newest by acceptance); unfinished jobs are never pruned.

    >>> store = SqliteStore("jobs.db", keep_finished=10_000, keep_finished_s=7 * 86400)
    >>> engine.run_local(store=store)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

import msgpack

from blueengine import codec
from blueengine.errors import BlueEngineError
from blueengine.jobs import Job
from blueengine.types import JobStatus

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PRUNE_EVERY = 256  # finished jobs between two prunes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    payload BLOB NOT NULL,
    results TEXT NOT NULL DEFAULT '[]',
    statuses TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    finished_at REAL
);
"""
# No index beyond the job id's: each one is more pages written per job, and the queries that
# would use them (a page of one status, pruning, the unfinished jobs at start) scan the rows in
# `seq` order, which stays fast for the tens of thousands of jobs a store keeps.

_COLUMNS = (
    "seq, job_id, status, payload, results, statuses, error, attempts, created_at, finished_at"
)

_FINISH = """
UPDATE jobs SET status = ?, results = ?, statuses = ?, error = ?, attempts = ?, finished_at = ?
WHERE job_id = ?
"""


class StoreLocked(BlueEngineError):
    """Raised when another process already keeps its jobs in the same SQLite file."""


class SqliteStore:
    """A `JobStore` in an SQLite file; thread-safe (one connection behind a lock).

    `allow_pickle` must match the engine's: it decides whether payloads that need pickle can be
    kept, and whether they are unpickled when read back.
    """

    durable = True  # jobs outlive the process: unfinished ones are resumed, not abandoned

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        keep_finished: int = 10_000,
        keep_finished_s: float = 7 * 86400.0,
        allow_pickle: bool = False,
        synchronous: str = "NORMAL",
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        if keep_finished < 1:
            raise ValueError(f"keep_finished must be at least 1, not {keep_finished}")
        self.path = os.fspath(path)
        self.keep_finished = keep_finished
        self.keep_finished_s = keep_finished_s
        self.allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._lock_file = _lock_exclusively(self.path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._finished_since_prune = 0
        self.prune()

    # -- the JobStore protocol ---------------------------------------------------------------

    def add(self, job: Job) -> None:
        payload = _pack_payload(job.payload, self.allow_pickle)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (job_id, status, payload, created_at) VALUES (?, ?, ?, ?)",
                (job.job_id, JobStatus.QUEUED.value, payload, job.created_at),
            )

    def started(self, attempts: list[tuple[str, int]]) -> None:
        with self._lock:
            self._db.executemany(
                "UPDATE jobs SET attempts = ? WHERE job_id = ?",
                [(attempt, job_id) for job_id, attempt in attempts],
            )

    def finish(self, job: Job) -> None:
        row = (
            job.status.value,
            json.dumps(job.results),
            json.dumps(job.statuses),
            None if job.error is None else json.dumps(job.error),
            job.attempts,
            job.finished_at if job.finished_at is not None else time.time(),
            job.job_id,
        )
        with self._lock:
            updated = self._db.execute(_FINISH, row).rowcount
            self._finished_since_prune += 1
            due = self._finished_since_prune >= PRUNE_EVERY
        if not updated:
            # Finished without ever being added (a job that never went through `add`).
            self.add(job)
            self.finish(job)
            return
        if due:
            self.prune()

    def unfinished(self) -> list[Job]:
        rows = self._select("WHERE finished_at IS NULL ORDER BY seq", ())
        return [self._job(row) for row in rows]

    def get(self, job_id: str) -> Job | None:
        rows = self._select("WHERE job_id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def page(
        self, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first; the cursor is opaque (a position, still valid after pruning).

        The file does not know whether an unfinished job is queued or running: asked for
        either, it returns every unfinished job, and the caller checks the live state.
        A cursor this store did not give out yields an empty page.
        """
        before = _position(cursor)
        if before is None:
            return [], None
        where, args = _status_filter(status)
        rows = self._select(
            f"WHERE {where} AND seq < ? ORDER BY seq DESC LIMIT ?", (*args, before, limit + 1)
        )
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = str(rows[-1][0]) if more and rows else None
        return [self._job(row) for row in rows], next_cursor

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()

    # -- pruning -----------------------------------------------------------------------------

    def prune(self) -> int:
        """Delete finished jobs past their keeping time or count; returns how many went."""
        oldest_kept = time.time() - self.keep_finished_s
        with self._lock:
            self._finished_since_prune = 0
            by_age = self._db.execute(
                "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                (oldest_kept,),
            ).rowcount
            by_count = self._db.execute(
                "DELETE FROM jobs WHERE finished_at IS NOT NULL AND seq < (SELECT seq FROM jobs "
                "WHERE finished_at IS NOT NULL ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (max(0, self.keep_finished - 1),),
            ).rowcount
        if by_age or by_count:
            logger.debug("Pruned %d finished jobs from %s.", by_age + by_count, self.path)
        return by_age + by_count

    # -- helpers -----------------------------------------------------------------------------

    def _select(self, clause: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(f"SELECT {_COLUMNS} FROM jobs {clause}", args).fetchall()

    def _job(self, row: tuple[Any, ...]) -> Job:
        _, job_id, status, payload, results, statuses, error, attempts, created, finished = row
        return Job(
            job_id=job_id,
            payload=codec.decode(msgpack.unpackb(payload), allow_pickle=self.allow_pickle),
            status=JobStatus(status),
            results=json.loads(results),
            statuses=json.loads(statuses),
            error=None if error is None else json.loads(error),
            attempts=attempts,
            created_at=created,
            finished_at=finished,
        )


def _pack_payload(payload: Any, allow_pickle: bool) -> bytes:
    frames = codec.encode(payload, allow_pickle=allow_pickle)
    packed: bytes = msgpack.packb([bytes(frame) for frame in frames])
    return packed


def _position(cursor: str | None) -> int | None:
    if cursor is None:
        return 2**63 - 1
    return int(cursor) if cursor.isdecimal() and len(cursor) < 19 else None


def _status_filter(status: JobStatus | None) -> tuple[str, tuple[Any, ...]]:
    if status is None:
        return "1", ()
    if status.final:
        return "status = ?", (status.value,)
    return "finished_at IS NULL", ()


def _lock_exclusively(path: str) -> TextIO:
    # An advisory lock beside the file: the kernel drops it when the process dies, even by
    # SIGKILL, so a restarted gateway is never locked out by its dead predecessor.
    lock_file = open(f"{path}.lock", "a")  # noqa: SIM115 - held open for the store's lifetime
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise StoreLocked(
            f"{path} is in use by another process (a gateway already running on it?); "
            "give each gateway its own --db"
        ) from None
    return lock_file
