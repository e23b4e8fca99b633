"""The `blueengine` command: run an engine on payloads, or run one step's process."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from blueengine.engine import BlueEngine, import_string
from blueengine.errors import BlueEngineError, ConfigError
from blueengine.jobs import Job
from blueengine.log import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging("blueengine", args.log_level, args.log_json)
    # Forwarded to step processes through the environment they inherit.
    os.environ["BLUEENGINE_LOG_LEVEL"] = args.log_level
    os.environ["BLUEENGINE_LOG_JSON"] = "1" if args.log_json else ""
    try:
        code: int = args.command(args)
    except (BlueEngineError, OSError) as exc:
        print(f"blueengine: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blueengine", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("BLUEENGINE_LOG_LEVEL", "WARNING"))
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run an engine on payloads, one JSON line per job")
    run.add_argument("app", metavar="APP", help="module:attribute naming a BlueEngine")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="JSON",
        help="a job's payload as JSON (repeatable)",
    )
    run.add_argument("--jsonl", metavar="FILE", help="a file of payloads, one JSON per line")
    run.add_argument(
        "--inline", action="store_true", help="run every step in this process, one after another"
    )
    run.add_argument("--replicas", action="append", default=[], metavar="STEP=N")
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up on jobs not finished after S seconds",
    )
    run.set_defaults(command=_run)

    step = commands.add_parser("step", help="run one step's process on its own")
    step.add_argument("app", metavar="APP")
    step.add_argument("--step", required=True, metavar="NAME")
    step.add_argument("--replica", type=int, default=int(os.environ.get("BLUEENGINE_REPLICA", "0")))
    step.add_argument(
        "--hub",
        default=os.environ.get("BLUEENGINE_HUB"),
        help="the hub's events endpoint [BLUEENGINE_HUB]",
    )
    step.add_argument(
        "--upstream",
        action="append",
        default=None,
        help="producer endpoint(s) to take items from [BLUEENGINE_UPSTREAM]",
    )
    step.add_argument(
        "--bind",
        default=os.environ.get("BLUEENGINE_BIND"),
        help="endpoint to bind for the next step [BLUEENGINE_BIND]",
    )
    step.add_argument("--drain-timeout", type=float, default=30.0, metavar="S")
    step.set_defaults(command=_step)
    _add_serve_parser(commands)
    return parser


def _add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the HTTP gateway and every step on this machine",
        description="Serve APP over HTTP with every step in its own process; Ctrl-C drains. "
        "BLUEENGINE_API_KEYS (comma-separated) makes /jobs and /control ask for a key.",
    )
    serve.add_argument("app", metavar="APP", help="module:attribute naming a BlueEngine")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--replicas", action="append", default=[], metavar="STEP=N")
    serve.add_argument(
        "--db",
        default=os.environ.get("BLUEENGINE_DB", "blueengine.db"),
        metavar="PATH",
        help="the SQLite file jobs are kept in [BLUEENGINE_DB]",
    )
    serve.add_argument(
        "--max-jobs", type=int, default=10_000, help="unfinished jobs taken before a 429"
    )
    serve.add_argument(
        "--keep-finished", type=int, default=10_000, metavar="N", help="finished jobs kept"
    )
    serve.add_argument(
        "--keep-finished-for",
        type=float,
        default=7 * 86400.0,
        metavar="S",
        help="seconds a finished job is kept",
    )
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="S")
    serve.set_defaults(command=_serve)


def load_app(target: str) -> BlueEngine:
    """Import APP (`module:attribute`) from the current directory, like uvicorn does."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    engine = import_string(target)
    if not isinstance(engine, BlueEngine):
        raise ConfigError(f"{target} is a {type(engine).__name__}, not a BlueEngine")
    return engine


def parse_replicas(pairs: Sequence[str]) -> dict[str, int]:
    """`STEP=N` flags as a mapping."""
    replicas = {}
    for pair in pairs:
        name, sep, count = pair.partition("=")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--replicas takes STEP=N with N at least 1, not {pair!r}")
        replicas[name] = int(count)
    return replicas


# -- run ----------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    engine = load_app(args.app).with_replicas(parse_replicas(args.replicas))
    payloads = list(_payloads(args))
    bar = _Progress(len(payloads), sys.stderr)
    jobs = (
        _run_inline(engine, payloads, bar)
        if args.inline
        else _run_local(engine, payloads, bar, args.timeout)
    )
    bar.close()
    for job in jobs:
        record = {k: job.to_dict()[k] for k in ("job_id", "status", "results", "error")}
        print(json.dumps(record), flush=True)
    return 0 if all(job.status == "done" for job in jobs) else 1


def _payloads(args: argparse.Namespace) -> Iterator[Any]:
    for text in args.input:
        yield _parse_json(text, "--input")
    if args.jsonl:
        with open(args.jsonl, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield _parse_json(line, f"{args.jsonl} line {number}")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None


def _run_inline(engine: BlueEngine, payloads: list[Any], bar: _Progress) -> list[Job]:
    from blueengine.inline import InlineEngine

    jobs = []
    for job in InlineEngine(engine).run(payloads):
        jobs.append(job)
        bar.advance()
    return jobs


def _run_local(
    engine: BlueEngine, payloads: list[Any], bar: _Progress, timeout_s: float | None
) -> list[Job]:
    finished: dict[str, Job] = {}
    with engine.run_local() as client:
        ids = [client.submit(p) for p in payloads]
        try:
            for job in client.as_completed(ids, timeout_s):
                finished[job.job_id] = job
                bar.advance()
        except TimeoutError:
            for job_id in ids:
                if job_id not in finished:
                    client.cancel(job_id)
                    finished[job_id] = client.get(job_id)
    return [finished[job_id] for job_id in ids]


class _Progress:
    """A one-line progress bar on stderr, drawn only on a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.started = time.monotonic()
        self.live = stream.isatty()
        self._draw()

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        if not self.live:
            return
        width = 30
        filled = width * self.done // max(1, self.total)
        rate = self.done / max(1e-9, time.monotonic() - self.started)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} jobs {rate:.1f}/s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.done}/{self.total} jobs finished\n")


# -- serve ---------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from blueengine.serve import ServeOptions, serve

    engine = load_app(args.app).with_replicas(parse_replicas(args.replicas))
    options = ServeOptions(
        host=args.host,
        port=args.port,
        db=args.db,
        max_jobs=args.max_jobs,
        keep_finished=args.keep_finished,
        keep_finished_s=args.keep_finished_for,
        drain_timeout_s=args.drain_timeout,
    )
    return serve(engine, options, sys.stdout)


# -- step ---------------------------------------------------------------------------------------


def _step(args: argparse.Namespace) -> int:
    from blueengine.step import ReplicaPlan, run_replica

    engine = load_app(args.app)
    spec = engine.step(args.step)
    position = engine.steps.index(spec)
    upstream = args.upstream or _split(os.environ.get("BLUEENGINE_UPSTREAM", ""))
    last = position == len(engine.steps) - 1
    if not args.hub or not upstream:
        raise ConfigError(
            "a step needs --hub and --upstream (or BLUEENGINE_HUB and BLUEENGINE_UPSTREAM)"
        )
    if not last and not args.bind:
        raise ConfigError(
            f"step {spec.name!r} forwards to a next step, so it needs --bind (or BLUEENGINE_BIND)"
        )
    plan = ReplicaPlan(
        engine=engine.name,
        spec=spec,
        index=args.replica,
        replica_id=uuid.uuid4().hex[:16],
        hub=args.hub,
        upstream=tuple(upstream),
        outbox=None if last else args.bind,
        first=position == 0,
        allow_pickle=engine.allow_pickle,
        drain_timeout_s=args.drain_timeout,
    )
    run_replica(plan, supervised=False)
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
