"""Engines the gateway tests run in real processes, and serve with `blueengine serve`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from blueengine import BlueEngine, Context


def _json_number(value: Any) -> Any:
    if isinstance(value, str | bool):
        raise ValueError("must be a JSON number")
    return value


# Pydantic's lax mode would take "7" for 7 and 0 for false, which the schema does not allow.
JsonNumber = BeforeValidator(_json_number)


class Work(BaseModel):
    """A job for the test engine: square `n`, after `delay_s`, saying `statuses` things first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"n": 7}]})

    n: Annotated[int, JsonNumber] = Field(0, ge=0, le=1_000_000)
    delay_s: Annotated[float, JsonNumber] = Field(0.0, ge=0.0, le=1.0)
    statuses: Annotated[int, JsonNumber] = Field(0, ge=0, le=50)
    fail: StrictBool = False


def take(context: Context, input: dict[str, Any]) -> Any:
    job = input["Control"]
    yield {"forward": job, "Status": {"type": "message", "message": "taken"}}


def work(context: Context, input: dict[str, Any]) -> Any:
    job = input["forward"]
    if job.get("fail"):
        raise ValueError(f"asked to fail on n={job.get('n')}")
    time.sleep(float(job.get("delay_s") or 0) + context.config.get("delay_s", 0))
    for index in range(int(job.get("statuses") or 0)):
        yield {"Status": {"type": "message", "message": f"status {index}"}}
    yield {"forward": job}


def report(context: Context, input: dict[str, Any]) -> Any:
    if "Control" in input:
        _obey(context, input["Control"])
        return None
    job = input["forward"]
    n = job.get("n", 0) if isinstance(job.get("n"), int) else 0
    return {
        "Result": {"n": n, "square": n * n},
        "Statistic": {"jobsReported": 1, "report_ms": 2.5, "note": "text is not a metric"},
    }


def _obey(context: Context, command: Any) -> None:
    # Commands reach this step only; a test sees them in the file its config names.
    mark = context.config.get("mark")
    if mark and isinstance(command, dict) and command.get("type") == "mark":
        with open(mark, "a") as lines:
            lines.write(f"{command.get('text')}\n")


def make_engine(
    name: str = "gw-test",
    *,
    delay_s: float = 0.0,
    mark: str | None = None,
    with_model: bool = True,
    **options: Any,
) -> BlueEngine:
    """Three steps: `take` (Control), `work` (waits, says statuses), `report` (Result)."""
    engine = BlueEngine(name, payload_model=Work if with_model else None, **options)
    engine.add_step("take", take, ["Control"], ["Status"])
    engine.add_step("work", work, [], ["Status"], config={"delay_s": delay_s})
    engine.add_step("report", report, ["Control"], ["Result", "Statistic"], config={"mark": mark})
    return engine


engine = make_engine()
slow = make_engine("gw-slow", delay_s=0.05, with_model=False)
free_form = make_engine("gw-free", with_model=False)


# -- `blueengine serve` in a child process, as a user starts it ---------------------------------


class Served:
    """A `python -m blueengine serve APP --port 0` process; `url` once it says it is ready."""

    def __init__(
        self, app: str, db: str, *args: str, log_dir: str, env: dict[str, str] | None = None
    ) -> None:
        import subprocess
        import sys
        from pathlib import Path

        self.out = Path(log_dir) / "serve.out"
        self.err = Path(log_dir) / "serve.err"
        command = [sys.executable, "-m", "blueengine", "serve", app, "--port", "0", "--db", db]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            # Files, not pipes: nothing the test forgets to read can block the server.
            self.process = subprocess.Popen(
                [*command, *args],
                stdout=out,
                stderr=err,
                cwd=Path(__file__).resolve().parent.parent,
                env={**_clean_environ(), **(env or {})},
            )
        self.url = ""

    def wait_ready(self, timeout_s: float = 60.0) -> str:
        """Wait for the line with the URL; fail with the server's log if it never comes."""
        import re

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(r"ready at (http://\S+)", self.out.read_text())
            if found:
                self.url = found.group(1)
                return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"serve did not become ready; its log:\n{self.err.read_text()}")

    def step_pids(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit (and SIGKILL if it never comes); the exit code."""
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def _clean_environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("BLUEENGINE_")}


def wait_gone(pids: list[int], timeout_s: float = 20.0) -> list[int]:
    """Wait for processes to end; returns those still alive after the timeout (and kills them)."""
    import psutil

    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        process.kill()
    return [process.pid for process in alive]


def read_events(lines: Any) -> list[tuple[str, Any]]:
    """Server-sent events as (event, data) pairs, from an iterator of the stream's lines."""
    import json

    events: list[tuple[str, Any]] = []
    event, data = "message", None
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:].strip())
        elif not line and data is not None:
            events.append((event, data))
            event, data = "message", None
    return events
