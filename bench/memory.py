"""What an idle step replica costs in memory, and how long an engine takes to start.

    python -m bench.memory [--runs 3]

Each run starts a six-step engine (source, four forwarding steps, sink) with `run_local()` and
times it until every step is ready, then reads each replica's RSS and USS (the memory only that
process holds) with psutil, once idle and once more after a job of 1,000 small items. A
two-step engine is timed the same way, which splits the start time into a fixed part and a part
per step. For context it also measures bare interpreters: what Python, numpy and pyzmq cost
before any SDK code runs, and how long `import blueengine.step` takes in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.report import check, machine, table
from bench.steps import chain_engine

STEPS = 6
MB = 1_000_000
SETTLE_S = 1.0  # let heartbeats and first-use allocations happen before reading memory

BASELINES = {
    "python": "pass",
    "python + import numpy, zmq, msgpack": "import numpy, zmq, msgpack",
    "python + import blueengine.step": "import blueengine.step",
}

Sizes = list[tuple[int, int]]
"""(RSS, USS) in bytes, one pair per process."""


@dataclass
class Run:
    """One start of the engine: its time to ready and each replica's memory."""

    ready_s: float
    idle: Sizes = field(default_factory=list)
    after_work: Sizes = field(default_factory=list)


def memory_of(pids: Sequence[int]) -> Sizes:
    """(RSS, USS) of each process."""
    import psutil  # here, not at the top: spawned replicas import this module too

    sizes = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        sizes.append((int(info.rss), int(info.uss)))
    return sizes


def start_once(steps: int, measure_memory: bool) -> Run:
    """Start an engine of `steps` steps, time it to ready, read its replicas' memory, stop it."""
    engine = chain_engine("bench-memory", steps - 2)
    start = time.perf_counter()
    client = engine.run_local(ready_timeout_s=60)
    client.start()
    run = Run(time.perf_counter() - start)
    try:
        if measure_memory:
            pids = [pid for spec in engine.steps for pid in client.supervisor.pids(spec.name)]
            time.sleep(SETTLE_S)
            run.idle = memory_of(pids)
            job = client.wait(client.submit({"kind": "small", "items": 1000}), timeout_s=60)
            if job.status != "done":
                raise RuntimeError(f"the benchmark job ended {job.status}: {job.error}")
            time.sleep(SETTLE_S)
            run.after_work = memory_of(pids)
    finally:
        client.stop()
    return run


def interpreter_memory(code: str) -> Sizes:
    """(RSS, USS) of a fresh interpreter that ran `code` and then waits."""
    script = f"{code}\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()
        return memory_of([process.pid])
    finally:
        process.communicate("")


def import_time_s(module: str, runs: int) -> float:
    """Median wall time of a fresh `python -c 'import module'`, interpreter start included."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_row(label: str, sizes: Sizes) -> list[str]:
    rss = [r for r, _ in sizes]
    uss = [u for _, u in sizes]
    figures = [statistics.median(rss), max(rss), statistics.median(uss), max(uss)]
    return [label, *(f"{size / MB:.1f}" for size in figures)]


def _seconds(values: Sequence[float]) -> str:
    listed = ", ".join(f"{value:.2f}" for value in values)
    return f"median {statistics.median(values):.2f} s (runs: {listed})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="engine starts to take the median of")
    args = parser.parse_args(argv)
    os.environ.setdefault("BLUEENGINE_LOG_LEVEL", "WARNING")
    print(f"bench.memory: engines of one replica per step\nmachine: {machine()}\n")

    runs = [start_once(STEPS, measure_memory=True) for _ in range(args.runs)]
    ready = [run.ready_s for run in runs]
    ready_2 = [start_once(2, measure_memory=False).ready_s for _ in range(args.runs)]
    per_step = (statistics.median(ready) - statistics.median(ready_2)) / (STEPS - 2)
    print(f"run_local() until {STEPS} steps ready: {_seconds(ready)}")
    print(f"run_local() until 2 steps ready: {_seconds(ready_2)}")
    print(f"so each step past the second adds {per_step:.2f} s")
    import_s = import_time_s("blueengine.step", args.runs)
    print(f"a fresh `python -c 'import blueengine.step'`: median {import_s:.2f} s\n")

    rows = [
        memory_row("step replica, idle", [size for run in runs for size in run.idle]),
        memory_row("step replica, after 1,000 items", [s for run in runs for s in run.after_work]),
        *(memory_row(label, interpreter_memory(code)) for label, code in BASELINES.items()),
    ]
    print(f"memory in MB of 10^6 bytes ({STEPS} replicas x {args.runs} runs in the replica rows):")
    print(table(["process", "RSS median", "max", "USS median", "max"], rows), end="\n\n")

    idle_rss_mb = statistics.median(rss for run in runs for rss, _ in run.idle) / MB
    print("targets:")
    print(check("idle replica RSS", idle_rss_mb, 60, at_least=False, unit=" MB", digits=1))
    print(
        check(
            f"run_local() to {STEPS} steps ready, median",
            statistics.median(ready),
            3,
            at_least=False,
            unit=" s",
        )
    )


if __name__ == "__main__":
    main()
