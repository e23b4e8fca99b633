"""Run an engine on this machine from Python: start the steps, submit jobs, collect results."""

from __future__ import annotations

import dataclasses
import logging
import queue
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from blueengine.engine import BlueEngine
from blueengine.errors import BlueEngineError, EngineFull
from blueengine.hub import Hub
from blueengine.jobs import Job
from blueengine.store import JobStore
from blueengine.supervisor import Supervisor
from blueengine.transport import private_ipc_dir

logger = logging.getLogger(__name__)


class LocalEngine:
    """An engine running on this machine: one process per step replica, a hub on a thread.

    Example::

        with engine.run_local() as client:
            job_ids = [client.submit({'url': u}) for u in urls]
            for job in client.as_completed(job_ids):
                print(job.job_id, job.status, job.results)
    """

    def __init__(
        self,
        engine: BlueEngine,
        *,
        ready_timeout_s: float = 60.0,
        drain_timeout_s: float = 30.0,
        max_jobs: int = 10_000,
        heartbeat_timeout_s: float = 5.0,
        store: JobStore | None = None,
        ipc_dir: str | None = None,
    ) -> None:
        engine.validate()
        self.engine = engine
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.ipc_dir = ipc_dir or private_ipc_dir(f"blueengine-{engine.name}-")
        self.hub = Hub(
            engine,
            f"ipc://{self.ipc_dir}/jobs",
            f"ipc://{self.ipc_dir}/events",
            max_jobs=max_jobs,
            store=store,
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
        try:
            self.supervisor = Supervisor(engine, self.hub, self.ipc_dir, drain_timeout_s)
        except BaseException:
            self.hub.stop()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
            raise
        self._started = False
        self._stopped = False

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> LocalEngine:
        """Start the hub and every replica; return once all steps are ready."""
        if self._started:
            return self
        self._started = True
        self.hub.start()
        self.supervisor.start()
        try:
            self.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.stop(drain=False)
            raise
        logger.info("Engine %s is ready.", self.engine.name)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.hub.live_replicas()
            missing = [s.name for s in self.engine.steps if live.get(s.name, 0) < s.replicas]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise BlueEngineError(
                    f"steps {', '.join(missing)} were not ready after {timeout_s} s; "
                    "their processes' log lines say why"
                )
            time.sleep(0.02)

    def stop(self, drain: bool = True) -> None:
        """Stop taking jobs, let running ones finish (up to the drain deadline), stop steps."""
        if self._stopped:
            return
        self._stopped = True
        self.hub.close_intake()
        if drain:
            deadline = time.monotonic() + self.drain_timeout_s
            while self.hub.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
        self.supervisor.stop()
        self._abandon_unfinished()
        self.hub.stop()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)
        logger.info("Engine %s stopped.", self.engine.name)

    def _abandon_unfinished(self) -> None:
        # Jobs here live only in memory: say what became of them rather than leave them hanging.
        # A durable store (SQLite) keeps them unfinished instead, so the next start resumes them.
        if getattr(self.hub.store, "durable", False):
            return
        with self.hub.lock:
            unfinished = [j.job_id for j in self.hub.table.jobs.values() if not j.status.final]
            for job_id in unfinished:
                self.hub.table.cancel(job_id, "the engine stopped before the job finished")

    def __enter__(self) -> LocalEngine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(drain=exc_type is None)

    def serve_forever(self) -> None:
        """Block until SIGINT or SIGTERM; the caller's `with` block then drains and stops."""
        stop = threading.Event()
        previous = {
            s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, payload: Any) -> str:
        """Queue one job and return its id; raises EngineFull when the engine is full."""
        return self.hub.submit(payload).job_id

    def get(self, job_id: str) -> Job:
        """A snapshot of the job."""
        with self.hub.lock:
            job = self.hub.get(job_id)
            return dataclasses.replace(job, results=list(job.results), statuses=list(job.statuses))

    def wait(self, job_id: str, timeout_s: float | None = None) -> Job:
        """Wait for the job to end (or the timeout) and return a snapshot of it."""
        self.hub.wait(job_id, timeout_s)
        return self.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel the job: its queued items are dropped in every step. False if already over."""
        return self.hub.cancel(job_id)

    def command(self, payload: Any) -> None:
        """Send an engine-wide command to every step that lists 'Control' (not the first)."""
        self.hub.command(payload)

    def as_completed(self, job_ids: Iterable[str], timeout_s: float | None = None) -> Iterator[Job]:
        """Yield each job as it ends, in the order they end."""
        pending = set(job_ids)
        finished: queue.Queue[str] = queue.Queue()

        def on_event(job: Job, event: str, data: Any) -> None:
            if event == "final" and job.job_id in pending:
                finished.put(job.job_id)

        with self.hub.lock:
            self.hub.listeners.append(on_event)
            for job_id in pending:
                if self.hub.get(job_id).status.final:
                    finished.put(job_id)
        try:
            yield from self._drain_finished(pending, finished, timeout_s)
        finally:
            with self.hub.lock:
                self.hub.listeners.remove(on_event)

    def _drain_finished(
        self, pending: set[str], finished: queue.Queue[str], timeout_s: float | None
    ) -> Iterator[Job]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                job_id = finished.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"{len(pending)} jobs did not finish in {timeout_s} s") from None
            if job_id in pending:
                pending.discard(job_id)
                yield self.get(job_id)

    def run(self, payloads: Iterable[Any], timeout_s: float | None = None) -> Iterator[Job]:
        """Submit every payload, waiting for room when the engine is full; yield jobs as they end.

        Jobs come back in the order they finish, not the order submitted.
        """
        job_ids = []
        for payload in payloads:
            while True:
                try:
                    job_ids.append(self.submit(payload))
                    break
                except EngineFull:
                    time.sleep(0.01)
        yield from self.as_completed(job_ids, timeout_s)
