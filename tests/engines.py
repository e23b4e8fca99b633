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
    engine.add_step("square", square, [], ["Status"], replicas=replicas,
                    config={"delay_s": delay_s})
    engine.add_step("report", report, [], ["Result", "Statistic"])
    return engine
