"""The hub: feeds jobs to the first step on credit and follows every job to its end.

It runs on a thread of its own in the process that owns the engine (the local client, the
gateway). All sockets belong to that thread; other threads talk to it through `Hub`'s methods,
which take the lock and wake the thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from blueengine import codec, protocol
from blueengine.engine import BlueEngine
from blueengine.errors import EngineFull, EngineStopped, JobNotFound
from blueengine.jobs import Job, JobTable, new_job_id
from blueengine.stats import combine
from blueengine.store import JobStore, MemoryStore
from blueengine.transport import Producer, bind, configure

logger = logging.getLogger(__name__)

POLL_MS = 100
RECENT_DROPS = 10_000


@dataclass
class ReplicaInfo:
    """A replica as the hub knows it, from its HELLO and heartbeats."""

    replica_id: str
    step: str
    index: int
    pid: int
    last_seen: float = field(default_factory=time.monotonic)
    stats: dict[str, Any] = field(default_factory=dict)


class Hub:
    """The engine's coordinator. Start it, then submit jobs and wait for them."""

    def __init__(
        self,
        engine: BlueEngine,
        jobs_endpoint: str,
        events_endpoint: str,
        *,
        max_jobs: int = 10_000,
        store: JobStore | None = None,
        heartbeat_timeout_s: float = 5.0,
    ) -> None:
        self.engine = engine
        self.max_jobs = max_jobs
        self.store: JobStore = store if store is not None else MemoryStore()
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.table = JobTable(engine.max_attempts, engine.job_timeout_s)
        self.table.listeners.append(self._on_job_event)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.replicas: dict[str, ReplicaInfo] = {}
        self.intake_open = True
        self.listeners: list[Callable[[Job, str, Any], None]] = []
        self._zmq = zmq.Context()
        self.producer = Producer(self._zmq, jobs_endpoint)
        self.events = self._zmq.socket(zmq.ROUTER)
        configure(self.events)
        self.events_endpoint = bind(self.events, events_endpoint)
        # A pipe, not a socket, wakes the hub: any thread may write to it without owning it.
        self._wake, self._waker = os.pipe()
        os.set_blocking(self._waker, False)
        self._poked = False
        self._payloads: dict[str, list[Any]] = {}
        self._drops: list[tuple[str, int]] = []
        self._recent_drops: OrderedDict[str, int] = OrderedDict()
        self._commands: list[Any] = []
        self._retired_stats: dict[str, list[dict[str, Any]]] = {}
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def jobs_endpoint(self) -> str:
        return self.producer.endpoint

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the jobs the store holds unfinished, then start serving."""
        with self.lock:
            # Jobs submitted before start() are in the table already and in the store too.
            resumed = [j for j in self.store.unfinished() if j.job_id not in self.table.jobs]
            for job in resumed:
                self._payloads[job.job_id] = codec.encode(
                    job.payload, allow_pickle=self.engine.allow_pickle
                )
                self.table.add(job)
        if resumed:
            logger.info("Resubmitted %d unfinished jobs from the store.", len(resumed))
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="blueengine-hub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._poke()
        if self._thread is not None:
            self._thread.join()
        self.producer.close()
        self.events.close(linger=0)
        os.close(self._wake)
        os.close(self._waker)
        self._zmq.term()

    # -- the API for other threads -----------------------------------------------------------

    def submit(self, payload: Any, job_id: str | None = None) -> Job:
        """Queue a job; raises EngineFull when the engine has no room for it."""
        frames = codec.encode(payload, allow_pickle=self.engine.allow_pickle)
        with self.lock:
            if not self.intake_open:
                raise EngineStopped("the engine is stopping and takes no new jobs")
            waiting = len(self.table.queue) + self.table.in_flight
            if waiting >= self.max_jobs:
                raise EngineFull(f"the engine already holds {waiting} unfinished jobs")
        job = Job(job_id or new_job_id(), payload)
        self.store.add(job)  # durable before anybody hears of the job; outside the lock
        with self.lock:
            self._payloads[job.job_id] = frames
            self.table.add(job)
        self._poke()
        return job

    def get(self, job_id: str) -> Job:
        with self.lock:
            job = self.table.jobs.get(job_id) or self.store.get(job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            return job

    def wait(self, job_id: str, timeout_s: float | None = None) -> Job:
        """Block until the job is final or the timeout passes; returns it either way."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.changed:
            job = self.get(job_id)
            while not job.status.final:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.changed.wait(left)
            return job

    def cancel(self, job_id: str) -> bool:
        with self.lock:
            self.get(job_id)
            cancelled = self.table.cancel(job_id)
        self._poke()
        return cancelled

    def command(self, payload: Any) -> None:
        """Broadcast an engine-wide command to every step that lists 'Control'."""
        with self.lock:
            self._commands.append(payload)
        self._poke()

    def replica_died(self, replica_id: str) -> None:
        """Called by a supervisor that saw the process exit: faster than a missed heartbeat."""
        with self.lock:
            info = self._retire(replica_id)
            step = info.step if info else "?"
            retried = self.table.replica_died(replica_id, step)
        if retried:
            logger.warning(
                "Replica %s of step %s died; retrying %d jobs.", replica_id, step, len(retried)
            )
        self._poke()

    def close_intake(self) -> None:
        """Take no new jobs and dispatch no queued ones; what runs goes on."""
        with self.lock:
            self.intake_open = False

    def live_replicas(self) -> dict[str, int]:
        """Live replicas per step."""
        with self.lock:
            counts = {spec.name: 0 for spec in self.engine.steps}
            for info in self.replicas.values():
                counts[info.step] = counts.get(info.step, 0) + 1
            return counts

    @property
    def in_flight(self) -> int:
        with self.lock:
            return self.table.in_flight

    @property
    def unfinished(self) -> int:
        with self.lock:
            return self.table.in_flight + len(self.table.queue)

    def _poke(self) -> None:
        # One wake-up pending is enough: waking the hub per job costs the caller its GIL. The
        # hub clears the flag under the lock before it looks at the queue, so none is missed.
        if self._poked:
            return
        self._poked = True
        # A full pipe means the hub is awake anyway.
        with contextlib.suppress(BlockingIOError):
            os.write(self._waker, b"x")

    # -- the hub thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in (self.producer.socket, self.events, self._wake):
            poller.register(sock, zmq.POLLIN)
        next_check = time.monotonic()
        while self._running:
            ready = dict(poller.poll(POLL_MS))
            with self.lock:
                if self._wake in ready:
                    # Empty the pipe before clearing the flag: a poke landing in between then
                    # leaves its byte for the next poll instead of being swallowed with this one.
                    os.read(self._wake, 4096)
                    self._poked = False
                if self.events in ready:
                    self._handle_events()
                self.producer.handle()
                if time.monotonic() >= next_check:
                    self._check_health()
                    next_check = time.monotonic() + 0.5
                self._dispatch()
                self._broadcast()

    def _handle_events(self) -> None:
        while self.events.poll(0):
            identity, kind, body = self.events.recv_multipart()
            beat = protocol.unpack(body) if kind == protocol.BEAT else None
            # Heartbeats come from a socket of their own and name their replica in the body.
            replica_id = beat["id"] if beat else identity.decode(errors="replace")
            info = self.replicas.get(replica_id)
            if info is not None:
                info.last_seen = time.monotonic()
                if beat:
                    info.stats = beat["stats"]
            if kind == protocol.RECORDS and info is not None:
                self.table.on_records(replica_id, info.step, protocol.unpack(body))
            elif kind == protocol.HELLO:
                self._on_hello(identity, protocol.unpack(body))
            elif kind == protocol.BYE:
                self._on_bye(identity, replica_id)

    def _on_hello(self, identity: bytes, info: dict[str, Any]) -> None:
        replica_id = identity.decode()
        self.replicas[replica_id] = ReplicaInfo(
            replica_id, info["step"], info["index"], info["pid"]
        )
        logger.info("Step %s replica %d (pid %d) joined.", info["step"], info["index"], info["pid"])
        if self._recent_drops:
            body = protocol.pack(list(self._recent_drops.items()))
            self.events.send_multipart([identity, protocol.CANCEL, body])

    def _on_bye(self, identity: bytes, replica_id: str) -> None:
        # Its records all came before BYE, so whatever it still holds it will never finish.
        info = self._retire(replica_id)
        self.table.replica_died(replica_id, info.step if info else "?")
        self.events.send_multipart([identity, protocol.BYE, b""])

    def _retire(self, replica_id: str) -> ReplicaInfo | None:
        # A step's counters must not go down when one of its replicas goes: keep its last stats.
        info = self.replicas.pop(replica_id, None)
        if info is not None and info.stats:
            retired = self._retired_stats.setdefault(info.step, [])
            retired[:] = [combine([*retired, {**info.stats, "in_flight": 0, "credits": 0}])]
        return info

    def step_stats(self) -> dict[str, dict[str, Any]]:
        """Built-in stats per step: its live replicas' plus what retired replicas counted."""
        with self.lock:
            per_step: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.engine.steps}
            for info in self.replicas.values():
                if info.stats:
                    per_step.setdefault(info.step, []).append(info.stats)
            for step, retired in self._retired_stats.items():
                per_step.setdefault(step, []).extend(retired)
            return {step: combine(snaps) for step, snaps in per_step.items()}

    def _check_health(self) -> None:
        now = time.monotonic()
        for replica_id, info in list(self.replicas.items()):
            if now - info.last_seen > self.heartbeat_timeout_s:
                logger.warning(
                    "Step %s replica %d is silent; taking it for dead.", info.step, info.index
                )
                self._retire(replica_id)
                self.table.replica_died(replica_id, info.step)
        self.table.expire(time.time())

    def _dispatch(self) -> None:
        started: list[tuple[str, int]] = []
        while self.intake_open:
            target = self.producer.pick()
            if target is None:
                break
            envelope = self.table.next_envelope()
            if envelope is None:
                break
            frames = [protocol.ITEM, envelope.pack(), *self._payloads[envelope.job_id]]
            if self.producer.send(target, frames):
                self.table.dispatched(envelope, target.decode())
                started.append((envelope.job_id, envelope.attempt))
            else:
                self.table.undispatched(envelope)
        if started:
            # One write for the batch: after a restart, attempts already spent still count.
            self.store.started(started)

    def _broadcast(self) -> None:
        if self._drops:
            body = protocol.pack(self._drops)
            self._drops = []
            self._to_all(protocol.CANCEL, body)
        for command in self._commands:
            self._to_all(protocol.COMMAND, protocol.pack(command))
        self._commands = []

    def _to_all(self, kind: bytes, body: bytes) -> None:
        for replica_id in self.replicas:
            self.events.send_multipart([replica_id.encode(), kind, body])

    def _on_job_event(self, job: Job, event: str, data: Any) -> None:
        if event == "drop":
            self._drops.append((job.job_id, data))
            self._recent_drops[job.job_id] = data
            while len(self._recent_drops) > RECENT_DROPS:
                self._recent_drops.popitem(last=False)
        elif event == "final":
            self._on_final(job)
        for listener in self.listeners:
            listener(job, event, data)

    def _on_final(self, job: Job) -> None:
        self._payloads.pop(job.job_id, None)
        self.store.finish(job)
        self.table.forget(job.job_id)
        self.changed.notify_all()
