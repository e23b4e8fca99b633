"""Step functions and engines the tests run in real processes (importable by spawned children)."""

from __future__ import annotations

import os
import time
from typing import Any

from blueengine import BlueEngine, Context


def numbers(context: Context, input: dict[str, Any]) -> Any:
    job = input["Control"]
    yield {"forward": (job["n"], job.get("fail_on", -1))}


def square(context: Context, input: dict[str, Any]) -> Any:
    n, fail_on = input["forward"]
    if n == fail_on:
        raise ValueError(f"refusing {n}")
    delay = context.config.get("delay_s", 0)
    if delay:
        time.sleep(delay)
    yield {"forward": (n, n * n, os.getpid())}


def report(context: Context, input: dict[str, Any]) -> Any:
    n, squared, pid = input["forward"]
    return {"Result": {"n": n, "square": squared, "pid": pid}}


def three_steps(replicas: int = 1, delay_s: float = 0.0, **options: Any) -> BlueEngine:
    engine = BlueEngine("squares", **options)
    engine.add_step("numbers", numbers, ["Control"], ["Status"])
    engine.add_step(
        "square", square, [], ["Status"], replicas=replicas, config={"delay_s": delay_s}
    )
    engine.add_step("report", report, [], ["Result", "Statistic"])
    return engine


def fan_out(context: Context, input: dict[str, Any]) -> Any:
    job = input["Control"]
    for index in range(job["items"]):
        yield {"forward": {"index": index, **job}}


def pass_on(context: Context, input: dict[str, Any]) -> Any:
    item = input["forward"]
    if item["index"] == item.get("finish_at", -1):
        yield {"Status": {"type": "finish"}}
        return
    delay = item.get("delay_s", 0)
    if delay:
        time.sleep(delay)
    log = context.config.get("log")
    if log:
        with open(log, "a") as lines:
            lines.write(f"{context.job_id} {item['index']}\n")
    yield {"forward": item, "Status": {"type": "message", "message": f"item {item['index']}"}}


def collect(context: Context, input: dict[str, Any]) -> Any:
    item = input["forward"]
    yield {"Result": {"index": item["index"]}}
    if item.get("last_finishes"):
        yield {"Status": {"type": "finish"}}


def fan_out_engine(log: str | None = None) -> BlueEngine:
    engine = BlueEngine("fan-out")
    engine.add_step("split", fan_out, ["Control"], [])
    engine.add_step("work", pass_on, [], ["Status"], config={"log": log})
    engine.add_step("collect", collect, [], ["Result", "Status"])
    return engine


def big_arrays(context: Context, input: dict[str, Any]) -> Any:
    import numpy as np

    job = input["Control"]
    for index in range(job["items"]):
        yield {"forward": np.full(job["size"], index % 251, dtype=np.uint8)}


def slow_sink(context: Context, input: dict[str, Any]) -> Any:
    array = input["forward"]
    time.sleep(context.config["delay_s"])
    return {"Result": {"first": int(array[0]), "size": int(array.size)}}


def slow_sink_engine() -> BlueEngine:
    engine = BlueEngine("backpressure")
    engine.add_step("produce", big_arrays, ["Control"], [])
    engine.add_step("hop", "tests.engines:hop", [], [])
    engine.add_step("sink", slow_sink, [], ["Result"], config={"delay_s": 0.004})
    return engine


def hop(context: Context, input: dict[str, Any]) -> Any:
    return {"forward": input["forward"]}


engine = three_steps()
