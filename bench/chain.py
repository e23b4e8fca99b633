"""The interface every benchmarked chain offers, whatever moves its items."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Protocol, Self

JOB_TIMEOUT_S = 120.0
"""No benchmark run takes near this long; a chain that does is broken, not slow."""

CHECK_INTERVAL_S = 0.5
"""How often a driver waiting for a result checks that the chain's processes still live."""


def check_alive(name: str, processes: Sequence[BaseProcess]) -> None:
    """Raise if a process of the chain has exited: its results will never come."""
    for process in processes:
        if not process.is_alive():
            raise RuntimeError(
                f"{name}: process {process.name} exited with code {process.exitcode}; "
                "its traceback is above"
            )


def spawn_all(plans: Sequence[tuple[Callable[..., None], tuple[Any, ...]]]) -> list[BaseProcess]:
    """Start one spawned process per (target, args), in order; return them."""
    spawn = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = [
        spawn.Process(target=target, args=args, daemon=True) for target, args in plans
    ]
    for process in processes:
        process.start()
    return processes


class Closing:
    """A chain used as a context manager: `close()` on the way out, whatever happened."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Chain(Protocol):
    """A source, `hops` forwarding processes and a sink, driven from this process.

    A job ``(kind, n)`` makes the source emit n items of that payload kind; the job is done
    when the sink has received its last item (and, for BlueEngine, every item is accounted
    for). Items of one job and of successive jobs flow through the chain concurrently.
    """

    name: str

    def run_jobs(self, kind: str, jobs: int, items_per_job: int) -> float:
        """Submit `jobs` jobs at once; return the seconds until the last one is done."""
        ...

    def one_item(self, kind: str) -> tuple[int, int]:
        """Run a job of one item alone: (in-chain ns, submit-to-done ns)."""
        ...

    def pids(self) -> list[int]:
        """The process ids of the chain's processes (not this driver process)."""
        ...

    def close(self) -> None:
        """Stop every process of the chain."""
        ...
