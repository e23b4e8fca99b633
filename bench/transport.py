"""Throughput and latency of a chain of forwarding steps: BlueEngine against the baselines.

    python -m bench.transport [--target-s 1.0] [--reps 5] [--samples 300]

The chain is a source, three forwarding steps and a sink: five processes, four hops. Every
system runs in this one invocation, with repetitions interleaved, so that the ratios compare
figures taken under the same load; absolute figures vary with the machine and what else runs.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import psutil

from bench import zmq_chain
from bench.blue_chain import BlueEngineChain
from bench.chain import Chain
from bench.payloads import KINDS, MIB_16, SMALL, Kind, payload_bytes
from bench.queue_chain import QueueChain
from bench.report import check, machine, median, percentile, table
from bench.zmq_chain import ZmqChain

HOPS = 3
BLUE, RAW, QUEUE = BlueEngineChain.name, zmq_chain.NAME, QueueChain.name
LATENCY_WARMUP = 20


@dataclass
class Throughput:
    """The repeated runs of one system on one payload kind."""

    system: str
    items: int
    rates: list[float] = field(default_factory=list)  # items per second, one per run
    cpu_us: list[float] = field(default_factory=list)  # CPU microseconds per item, per run

    @property
    def rate(self) -> float:
        return median(self.rates)


@dataclass
class Latency:
    """One-item-in-flight latencies of one system, in nanoseconds."""

    system: str
    in_chain: list[int]
    end_to_end: list[int]


@contextmanager
def baselines(kind: Kind) -> Iterator[list[Chain]]:
    """The baseline chains for one payload kind (their queue depths depend on the kind)."""
    with ExitStack() as stack:
        chains: list[Chain] = [stack.enter_context(ZmqChain(HOPS, kind.depth))]
        if not kind.large:
            chains.append(stack.enter_context(ZmqChain(HOPS, kind.depth, decode=True)))
        chains.append(stack.enter_context(QueueChain(HOPS, kind.depth)))
        yield chains


def measure_throughput(
    chains: Sequence[Chain], kind: Kind, target_s: float, reps: int
) -> dict[str, Throughput]:
    """Size each system's run to about `target_s`, then run them in turn, `reps` rounds."""
    per_job = kind.items_per_job
    jobs: dict[str, int] = {}
    for chain in chains:
        probe_jobs = max(1, kind.probe_items // per_job)
        elapsed = chain.run_jobs(kind.name, probe_jobs, per_job)
        rate = probe_jobs * per_job / elapsed
        jobs[chain.name] = max(1, math.ceil(rate * target_s / per_job))

    results = {c.name: Throughput(c.name, jobs[c.name] * per_job) for c in chains}
    for rep in range(reps):
        # Rotate the order so that no system always runs first or right after a given other.
        for chain in [*chains[rep % len(chains) :], *chains[: rep % len(chains)]]:
            result = results[chain.name]
            processes = [psutil.Process(pid) for pid in chain.pids()] + [psutil.Process()]
            cpu_before = _cpu_s(processes)
            elapsed = chain.run_jobs(kind.name, jobs[chain.name], per_job)
            result.cpu_us.append((_cpu_s(processes) - cpu_before) * 1e6 / result.items)
            result.rates.append(result.items / elapsed)
    return results


def _cpu_s(processes: Sequence[psutil.Process]) -> float:
    """CPU seconds (user and system, all threads) that the processes have used so far."""
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def measure_latency(chains: Sequence[Chain], samples: int) -> dict[str, Latency]:
    """One small item at a time through each chain, the systems taking turns item by item."""
    results = {c.name: Latency(c.name, [], []) for c in chains}
    for index in range(LATENCY_WARMUP + samples):
        for chain in chains:
            in_chain, end_to_end = chain.one_item(SMALL.name)
            if index >= LATENCY_WARMUP:
                results[chain.name].in_chain.append(in_chain)
                results[chain.name].end_to_end.append(end_to_end)
    return results


def throughput_table(kind: Kind, results: dict[str, Throughput]) -> str:
    size = payload_bytes(kind.name)
    raw, queue = results[RAW].rate, results[QUEUE].rate
    rows = []
    for result in results.values():
        low, high = min(result.rates), max(result.rates)
        rows.append(
            [
                result.system,
                f"{result.items:,}",
                f"{result.rate:,.0f}",
                f"{low:,.0f}-{high:,.0f}",
                f"{result.rate * size / 1e9:.3f}",
                f"{result.rate / raw:.2f}",
                f"{result.rate / queue:.2f}",
                f"{median(result.cpu_us):,.0f}",
            ]
        )
    headers = [
        "system",
        "items/run",
        "items/s",
        "range",
        "GB/s",
        "x raw",
        "x mp.Queue",
        "CPU us/item",
    ]
    title = f"{kind.name} payload ({size:,} bytes), median of runs:"
    return f"{title}\n{table(headers, rows)}"


def latency_table(results: dict[str, Latency]) -> str:
    raw = results[RAW]
    rows = []
    for result in results.values():
        rows.append(
            [
                result.system,
                _us(percentile(result.in_chain, 50)),
                _us(percentile(result.in_chain, 90)),
                _us(percentile(result.end_to_end, 50)),
                _us(percentile(result.end_to_end, 90)),
                f"{percentile(result.end_to_end, 50) / percentile(raw.end_to_end, 50):.2f}",
            ]
        )
    headers = ["system", "in-chain p50", "p90", "submit-to-done p50", "p90", "x raw (p50)"]
    return table(headers, rows)


def _us(ns: float) -> str:
    return f"{ns / 1000:,.0f} us"


def targets(tput: dict[str, dict[str, Throughput]], latency: dict[str, Latency]) -> list[str]:
    small, large = tput[SMALL.name], tput[MIB_16.name]
    blue, raw = latency[BLUE], latency[RAW]
    in_chain = percentile(blue.in_chain, 50) / percentile(raw.in_chain, 50)
    end_to_end = percentile(blue.end_to_end, 50) / percentile(raw.end_to_end, 50)
    checks = [
        ("small items/s, BlueEngine / raw pyzmq", small[BLUE].rate / small[RAW].rate, 0.5, True),
        ("16 MiB GB/s, BlueEngine / raw pyzmq", large[BLUE].rate / large[RAW].rate, 0.8, True),
        ("16 MiB GB/s, BlueEngine / mp.Queue", large[BLUE].rate / large[QUEUE].rate, 3, True),
        ("latency p50 in-chain, BlueEngine / raw pyzmq", in_chain, 2, False),
        ("latency p50 submit-to-done, BlueEngine / raw pyzmq", end_to_end, 2, False),
    ]
    return [check(label, value, target, at_least=up) for label, value, target, up in checks]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__)
    parser.add_argument("--target-s", type=float, default=1.0, help="seconds per measured run")
    parser.add_argument("--reps", type=int, default=5, help="measured runs per system")
    parser.add_argument("--samples", type=int, default=300, help="latency samples per system")
    args = parser.parse_args(argv)
    os.environ.setdefault("BLUEENGINE_LOG_LEVEL", "WARNING")

    print(f"bench.transport: source -> {HOPS} forwarding steps -> sink, one process each")
    print(f"machine: {machine()}\n")
    started = time.perf_counter()
    tput: dict[str, dict[str, Throughput]] = {}
    with BlueEngineChain(HOPS) as blue:
        for kind in KINDS.values():
            with baselines(kind) as others:
                chains = [blue, *others]
                tput[kind.name] = measure_throughput(chains, kind, args.target_s, args.reps)
                print(throughput_table(kind, tput[kind.name]), end="\n\n", flush=True)
                if kind is SMALL:
                    latency = measure_latency(chains, args.samples)

    print(f"latency of one small item alone, {args.samples} samples each:")
    print(latency_table(latency), end="\n\n")
    print("targets:")
    print("\n".join(targets(tput, latency)))
    print(f"\nmachine afterwards: {machine()}; took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
