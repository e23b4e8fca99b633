"""The chain as most people first write it: processes linked by `multiprocessing.Queue`.

Each queue pickles the item, writes it into a pipe from a feeder thread and unpickles it on the
other side. Queues between steps are bounded (`depth`), as they must be for large items.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

from bench.chain import CHECK_INTERVAL_S, JOB_TIMEOUT_S, Closing, check_alive, spawn_all
from bench.payloads import latency_ns, new_item


def run_source(commands: Queue[Any], downstream: Queue[Any]) -> None:
    """Turn each command ``(kind, n)`` into n stamped items; None stops the chain."""
    while (command := commands.get()) is not None:
        kind, count = command
        for index in range(count):
            downstream.put(new_item(kind, index == count - 1))
    downstream.put(None)


def run_forwarder(upstream: Queue[Any], downstream: Queue[Any]) -> None:
    """Pass every item on."""
    while (item := upstream.get()) is not None:
        downstream.put(item)
    downstream.put(None)


def run_sink(upstream: Queue[Any], results: Queue[Any]) -> None:
    """Report the in-chain latency of each job's last item."""
    while (item := upstream.get()) is not None:
        if item[1]:
            results.put(latency_ns(item))


class QueueChain(Closing):
    """source -> `hops` forwarders -> sink as processes linked by bounded queues."""

    name = "mp.Queue"

    def __init__(self, hops: int, depth: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._commands: Queue[Any] = spawn.Queue()
        self._results: Queue[Any] = spawn.Queue()
        links: list[Queue[Any]] = [spawn.Queue(maxsize=depth) for _ in range(hops + 1)]
        plans: list[tuple[Any, tuple[Any, ...]]] = [(run_source, (self._commands, links[0]))]
        for index in range(hops):
            plans.append((run_forwarder, (links[index], links[index + 1])))
        plans.append((run_sink, (links[-1], self._results)))
        self._processes: list[BaseProcess] = spawn_all(plans)
        try:
            self.one_item("small")  # returns once every process is up and connected
        except BaseException:
            self.close()
            raise

    def run_jobs(self, kind: str, jobs: int, items_per_job: int) -> float:
        start = time.perf_counter()
        for _ in range(jobs):
            self._commands.put((kind, items_per_job))
        for _ in range(jobs):
            self._result()
        return time.perf_counter() - start

    def one_item(self, kind: str) -> tuple[int, int]:
        start = time.perf_counter_ns()
        self._commands.put((kind, 1))
        in_chain = self._result()
        return in_chain, time.perf_counter_ns() - start

    def _result(self) -> int:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            try:
                value: int = self._results.get(timeout=CHECK_INTERVAL_S)
                return value
            except queue.Empty:
                check_alive(self.name, self._processes)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no result in {JOB_TIMEOUT_S} s") from None

    def pids(self) -> list[int]:
        return [process.pid for process in self._processes if process.pid is not None]

    def close(self) -> None:
        self._commands.put(None)
        for process in self._processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join()
