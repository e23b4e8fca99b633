"""BlueEngine step functions of the benchmarks (module level: spawned replicas import them)."""

from __future__ import annotations

from typing import Any

from bench.payloads import latency_ns, new_item
from blueengine import BlueEngine, Context


def source(context: Context, input: dict[str, Any]) -> Any:
    """Fan one job ``{'kind': ..., 'items': n}`` out into n stamped items."""
    job = input["Control"]
    last = job["items"] - 1
    for index in range(job["items"]):
        yield {"forward": new_item(job["kind"], index == last)}


def forward(context: Context, input: dict[str, Any]) -> Any:
    """Pass the item on untouched: what a hop costs with no work in it."""
    return {"forward": input["forward"]}


def sink(context: Context, input: dict[str, Any]) -> Any:
    """Report the in-chain latency of each job's last item."""
    item = input["forward"]
    if item[1]:
        return {"Result": {"latency_ns": latency_ns(item)}}
    return None


def chain_engine(name: str, hops: int) -> BlueEngine:
    """source -> `hops` forwarding steps -> sink: `hops + 2` processes."""
    engine = BlueEngine(name)
    engine.add_step("source", source, ["Control"], [])
    for index in range(1, hops + 1):
        engine.add_step(f"hop{index}", forward, [], [])
    engine.add_step("sink", sink, [], ["Result"])
    return engine
