"""Starts one process per step replica on this machine, restarts the ones that die, stops them.

Processes are spawned (not forked): a replica starts from a clean interpreter, so locks, threads
and sockets of the parent never leak into it. Each replica binds its outbox at a fixed ipc path,
so a restarted replica is found again by the next step without telling anybody.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from blueengine.engine import BlueEngine
from blueengine.errors import ConfigError
from blueengine.hub import Hub
from blueengine.step import ReplicaPlan, run_replica

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0


@dataclass
class _Slot:
    """One replica position (step, index) and the process currently filling it."""

    step_index: int
    index: int
    plan: ReplicaPlan
    process: BaseProcess | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    exit_codes: list[int | None] = field(default_factory=list)
    stopping: bool = False


@dataclass
class Supervisor:
    """Keeps every replica of an engine running until told to stop."""

    engine: BlueEngine
    hub: Hub
    ipc_dir: str
    drain_timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    slots: list[_Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._running = False
        self._stopping = False
        self._started = threading.Event()
        self._exited = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self.slots = self._plan()

    def _plan(self) -> list[_Slot]:
        slots: list[_Slot] = []
        upstream: tuple[str, ...] = (self.hub.jobs_endpoint,)
        last = len(self.engine.steps) - 1
        for step_index, spec in enumerate(self.engine.steps):
            outboxes = tuple(
                f"ipc://{self.ipc_dir}/s{step_index}r{i}" for i in range(spec.replicas)
            )
            for index in range(spec.replicas):
                plan = ReplicaPlan(
                    engine=self.engine.name,
                    spec=spec,
                    index=index,
                    replica_id="",
                    hub=self.hub.events_endpoint,
                    upstream=upstream,
                    outbox=outboxes[index] if step_index < last else None,
                    first=step_index == 0,
                    allow_pickle=self.engine.allow_pickle,
                    drain_timeout_s=self.drain_timeout_s,
                    heartbeat_s=self.heartbeat_s,
                )
                _check_picklable(plan)
                slots.append(_Slot(step_index, index, plan))
            upstream = outboxes
        return slots

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        # Every replica is spawned by the watcher thread, which lives until stop() is done: the
        # kernel's parent-death signal fires when the spawning *thread* exits, not the process.
        self._running = True
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        """SIGTERM the steps from the last to the first, so each drains into a live next step."""
        self._stopping = True
        for step_index in reversed(range(len(self.engine.steps))):
            slots = [s for s in self.slots if s.step_index == step_index]
            for slot in slots:
                slot.stopping = True
                if slot.process is not None and slot.process.is_alive():
                    os.kill(slot.process.pid or 0, signal.SIGTERM)
            deadline = time.monotonic() + self.drain_timeout_s + 5
            for slot in slots:
                self._reap(slot, deadline)
        self._running = False
        if self._thread is not None:
            self._thread.join()

    def _reap(self, slot: _Slot, deadline: float) -> None:
        # Only the watcher thread waits on processes (two waiters race for one exit status);
        # here we wait for it to report the exit.
        with self._exited:
            while slot.process is not None and time.monotonic() < deadline:
                self._exited.wait(deadline - time.monotonic())
            process = slot.process
        if process is not None:
            logger.warning("%s did not stop in time; killing it.", slot.plan.title)
            process.kill()
            with self._exited:
                while slot.process is not None:
                    self._exited.wait()

    def pids(self, step: str) -> list[int]:
        """The pids of a step's live replicas (for tests and tools)."""
        with self._lock:
            return [
                s.process.pid
                for s in self.slots
                if s.plan.spec.name == step and s.process and s.process.pid and s.process.is_alive()
            ]

    def exit_codes(self, step: str) -> list[int | None]:
        """Exit codes of a step's replica processes that ended, oldest first per replica."""
        with self._lock:
            return [code for s in self.slots if s.plan.spec.name == step for code in s.exit_codes]

    # -- watching ----------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        slot.plan = _with_id(slot.plan, uuid.uuid4().hex[:16])
        process = self._mp.Process(target=run_replica, args=(slot.plan,), name=slot.plan.title)
        process.start()
        with self._lock:
            slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None

    def _watch(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._started.set()
        while self._running:
            alive = {s.process.sentinel: s for s in self.slots if s.process is not None}
            for sentinel in wait(list(alive), timeout=0.1):
                self._on_exit(alive[sentinel])  # type: ignore[index]
            now = time.monotonic()
            for slot in self.slots:
                if slot.restart_at is not None and now >= slot.restart_at and not self._stopping:
                    self._spawn(slot)

    def _on_exit(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        process.join()
        with self._exited:
            slot.process = None
            slot.exit_codes.append(process.exitcode)
            self._exited.notify_all()
        self.hub.replica_died(slot.plan.replica_id)
        if slot.stopping or self._stopping:
            return
        uptime = time.monotonic() - slot.started_at
        if uptime > STABLE_AFTER_S:
            slot.backoff_s = BACKOFF_FIRST_S
        logger.warning(
            "%s (pid %s) exited with code %s after %.1f s; restarting in %.1f s.",
            slot.plan.title,
            process.pid,
            process.exitcode,
            uptime,
            slot.backoff_s,
        )
        slot.restart_at = time.monotonic() + slot.backoff_s
        slot.backoff_s = min(slot.backoff_s * 2, BACKOFF_MAX_S)


def _with_id(plan: ReplicaPlan, replica_id: str) -> ReplicaPlan:
    fields: dict[str, Any] = {**plan.__dict__, "replica_id": replica_id}
    return ReplicaPlan(**fields)


def _check_picklable(plan: ReplicaPlan) -> None:
    # Step functions reach spawned processes by reference; a lambda or a nested function cannot.
    try:
        pickle.dumps(plan)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"step {plan.spec.name!r} cannot be sent to its process: {exc}. Define its functions "
            "at module level, or give them as 'module:function' strings"
        ) from None
