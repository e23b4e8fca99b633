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


def load_model(context: Context) -> dict[str, Any]:
    return {"pid": os.getpid(), "loaded_at": time.monotonic(), "factor": context.config["factor"]}


def scale(context: Context, input: dict[str, Any]) -> Any:
    job = input["Control"]
    model = context.resources
    return {
        "Result": {
            "value": job["x"] * model["factor"],
            "model_pid": model["pid"],
            "loaded_at": model["loaded_at"],
        }
    }


def setup_engine() -> BlueEngine:
    engine = BlueEngine("setup")
    engine.add_step("scale", scale, ["Control"], ["Result"], setup=load_model, config={"factor": 3})
    return engine


def sleepy_fetch(context: Context, input: dict[str, Any]) -> Any:
    job = input["Control"]
    started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on Linux
    time.sleep(job["sleep_s"])
    return {"forward": (job["i"], started, time.monotonic())}


def concurrent_engine(concurrency: int) -> BlueEngine:
    engine = BlueEngine("concurrent")
    engine.add_step("fetch", sleepy_fetch, ["Control"], [], concurrency=concurrency)
    engine.add_step("note", lambda_free_note, [], ["Result"])
    return engine


def lambda_free_note(context: Context, input: dict[str, Any]) -> Any:
    i, started, ended = input["forward"]
    return {"Result": {"i": i, "started": started, "ended": ended}}


class Opaque:
    """A value the codec refuses without pickle."""


def send_opaque(context: Context, input: dict[str, Any]) -> Any:
    yield {"forward": Opaque()}


def bad_outputs(context: Context, input: dict[str, Any]) -> Any:
    job = input["Control"]
    if job["kind"] == "undeclared":
        yield {"Result": {"oops": True}}
    elif job["kind"] == "not-json":
        yield {"Status": {"value": Opaque()}}
    yield {"forward": job}


def codec_engine(allow_pickle: bool = False) -> BlueEngine:
    engine = BlueEngine("codec", allow_pickle=allow_pickle)
    engine.add_step("make", send_opaque, ["Control"], [])
    engine.add_step("take", describe, [], ["Result"])
    return engine


def describe(context: Context, input: dict[str, Any]) -> Any:
    return {"Result": {"type": type(input["forward"]).__name__}}


def output_engine() -> BlueEngine:
    engine = BlueEngine("outputs")
    engine.add_step("check", bad_outputs, ["Control"], ["Status"])
    engine.add_step("end", lambda_free_end, [], [])
    return engine


def lambda_free_end(context: Context, input: dict[str, Any]) -> Any:
    return None


def watch_cancel(context: Context, input: dict[str, Any]) -> Any:
    job = input["Control"]
    open(job["log"] + ".started", "w").close()
    deadline = time.monotonic() + 20
    while not context.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(job["log"], "w") as out:
        out.write("cancelled" if context.cancelled else "timed out")
    return None


def cancel_engine() -> BlueEngine:
    engine = BlueEngine("watch")
    engine.add_step("watch", watch_cancel, ["Control"], [])
    engine.add_step("end", lambda_free_end, [], [])
    return engine


def hang_once(context: Context, input: dict[str, Any]) -> Any:
    job = input["Control"]
    marker = job["marker"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(30)  # the first attempt misses its deadline
    return {"Result": {"attempt": context.attempt}}


def deadline_engine() -> BlueEngine:
    engine = BlueEngine("deadline", job_timeout_s=1.0)
    engine.add_step("hang", hang_once, ["Control"], ["Result"], concurrency=2)
    return engine


slow = three_steps(replicas=2, delay_s=30)  # for a supervisor killed mid-job
