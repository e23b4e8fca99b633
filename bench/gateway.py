"""The gateway against a bare FastAPI endpoint on the same uvicorn: what accepting a job costs.

    python -m bench.gateway [--jobs 3000] [--connections 16] [--samples 300] [--reps 3]

Two servers run side by side, each in its own process, started as users start them:
`blueengine serve bench.gateway:engine` (a no-op engine of three steps, jobs in SQLite) and the
same uvicorn configuration serving `bare_app`, one endpoint that parses the same JSON and answers
202. A raw keep-alive HTTP/1.1 client (no HTTP library's overhead in the figures) measures:

- accepted/s: `POST /jobs` over `--connections` connections, as fast as they are answered;
- completed/s: the same jobs, until the gateway's ``blueengine_jobs_total`` counts them done;
- waited/s: `POST /jobs?wait=30` on every connection, each answered once its job has ended;
- the p50 and p99 round trip of one request at a time: `POST /jobs?wait=5` against the bare
  endpoint's `POST /jobs`; the difference is what one job through three steps adds.

Repetitions interleave the two servers, so the ratios compare figures taken under the same load.
Targets: gateway rates >= 0.5x the bare rate; less than 5 ms added to the p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from bench.report import check, machine, median, percentile, table
from blueengine import BlueEngine, Context

ROOT = Path(__file__).resolve().parent.parent


# -- what is served ----------------------------------------------------------------------------


def take(context: Context, input: dict[str, Any]) -> Any:
    return {"forward": input["Control"]}


def hop(context: Context, input: dict[str, Any]) -> Any:
    return {"forward": input["forward"]}


def finish(context: Context, input: dict[str, Any]) -> Any:
    return {"Result": {"n": input["forward"].get("n")}}


engine = BlueEngine("bench-gateway")
engine.add_step("take", take, ["Control"], [])
engine.add_step("hop", hop, [], [])
engine.add_step("finish", finish, [], ["Result"])

bare_app = FastAPI()


@bare_app.post("/jobs", status_code=202)
async def bare_submit(payload: dict[str, Any] = Body()) -> JSONResponse:  # noqa: B008
    return JSONResponse({"job_id": uuid.uuid4().hex, "status": "queued"}, 202)


def _serve_bare() -> None:
    # The uvicorn configuration `blueengine serve` uses, so the HTTP layer is the same.
    import uvicorn

    config = uvicorn.Config(bare_app, host="127.0.0.1", port=0, log_config=None, access_log=False)
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"ready at http://127.0.0.1:{port}", flush=True)
        await task

    asyncio.run(run())


# -- the servers, in their own processes ---------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A server process the client talks to."""

    host: str
    port: int
    pid: int

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds used so far by the process itself and by its children (the steps)."""
        process = psutil.Process(self.pid)
        own = process.cpu_times()
        children = 0.0
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = child.cpu_times()
                children += times.user + times.system
        return own.user + own.system, children


@contextmanager
def _server(command: Sequence[str], workdir: str) -> Iterator[Server]:
    """Start a server process; yield it once it prints its address; stop it."""
    out = Path(workdir) / f"{len(os.listdir(workdir))}.out"
    with open(out, "w") as stdout:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=subprocess.STDOUT, cwd=ROOT, env=_environ()
        )
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"ready at http://([\d.]+):(\d+)", out.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not start:\n{out.read_text()}")
            time.sleep(0.02)
        yield Server(found.group(1), int(found.group(2)), process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BLUEENGINE_")}


# -- a raw HTTP/1.1 client ------------------------------------------------------------------------


class Connection:
    """One keep-alive connection sending requests one after another."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        response = await self.reader.readuntil(b"\r\n\r\n")
        status = int(response.split(b" ", 2)[1])
        found = re.search(rb"(?i)content-length: *(\d+)", response)
        length = int(found.group(1)) if found else 0
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _connections(host: str, port: int, count: int) -> list[Connection]:
    return [await Connection.open(host, port) for _ in range(count)]


async def rate(host: str, port: int, target: str, jobs: int, connections: int) -> float:
    """Requests answered per second, `connections` at a time; every answer must be 2xx."""
    pool = await _connections(host, port, connections)
    numbers = iter(range(jobs))

    async def drive(connection: Connection) -> None:
        for n in numbers:
            status, body = await connection.request("POST", target, json.dumps({"n": n}).encode())
            if status >= 300:
                raise RuntimeError(f"POST {target} answered {status}: {body[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(drive(connection) for connection in pool))
    elapsed = time.perf_counter() - started
    for connection in pool:
        connection.close()
    return jobs / elapsed


async def completion(host: str, port: int, jobs: int, connections: int) -> tuple[float, float]:
    """(accepted/s, completed/s) of `jobs` new jobs, counting done jobs on /metrics."""
    done_before = await _done(host, port)
    started = time.perf_counter()
    accepted = await rate(host, port, "/jobs", jobs, connections)
    while await _done(host, port) < done_before + jobs:
        await asyncio.sleep(0.005)
    return accepted, jobs / (time.perf_counter() - started)


async def _done(host: str, port: int) -> float:
    # A new connection each time: an idle one may have timed out while the jobs went in.
    connection = await Connection.open(host, port)
    _, text = await connection.request("GET", "/metrics")
    connection.close()
    found = re.search(rb'blueengine_jobs_total\{[^}]*outcome="done"[^}]*\} ([\d.e+]+)', text)
    return float(found.group(1)) if found else 0.0


async def round_trips(host: str, port: int, target: str, samples: int) -> list[float]:
    """Seconds per request, one at a time, after a few to warm up."""
    connection = await Connection.open(host, port)
    times = []
    for n in range(samples + 20):
        started = time.perf_counter()
        status, body = await connection.request("POST", target, json.dumps({"n": n}).encode())
        if status >= 300:
            raise RuntimeError(f"POST {target} answered {status}: {body[:200]!r}")
        times.append(time.perf_counter() - started)
    connection.close()
    return times[20:]


# -- the run -------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, workdir: str) -> dict[str, list[float]]:
    serve = [sys.executable, "-m", "blueengine", "serve", "bench.gateway:engine", "--port", "0"]
    serve += ["--db", f"{workdir}/jobs.db", "--max-jobs", str(args.jobs * 4)]
    bare_command = [sys.executable, "-m", "bench.gateway", "--serve-bare"]
    figures: dict[str, list[float]] = {}
    with _server(serve, workdir) as gateway, _server(bare_command, workdir) as bare:
        for _ in range(args.reps):
            for name, value in _one_round(args, gateway, bare).items():
                figures.setdefault(name, []).append(value)
    return figures


def _one_round(args: argparse.Namespace, gateway: Server, bare: Server) -> dict[str, float]:
    jobs, connections = args.jobs, args.connections
    bare_cpu = bare.cpu_s()
    bare_rate = asyncio.run(rate(*bare.address, "/jobs", jobs, connections))
    bare_after = bare.cpu_s()
    gateway_cpu = gateway.cpu_s()
    accepted, completed = asyncio.run(completion(*gateway.address, jobs, connections))
    gateway_after = gateway.cpu_s()
    waited = asyncio.run(rate(*gateway.address, "/jobs?wait=30", jobs // 2, connections))
    bare_times = asyncio.run(round_trips(*bare.address, "/jobs", args.samples))
    gateway_times = asyncio.run(round_trips(*gateway.address, "/jobs?wait=5", args.samples))
    return {
        "bare/s": bare_rate,
        "accepted/s": accepted,
        "completed/s": completed,
        "waited/s": waited,
        "bare p50": percentile(bare_times, 50),
        "bare p99": percentile(bare_times, 99),
        "gateway p50": percentile(gateway_times, 50),
        "gateway p99": percentile(gateway_times, 99),
        "bare server us": (bare_after[0] - bare_cpu[0]) / jobs * 1e6,
        "gateway server us": (gateway_after[0] - gateway_cpu[0]) / jobs * 1e6,
        "gateway steps us": (gateway_after[1] - gateway_cpu[1]) / jobs * 1e6,
    }


def report(figures: dict[str, list[float]]) -> str:
    value = {name: median(values) for name, values in figures.items()}
    bare = value["bare/s"]
    rows = [
        ["bare FastAPI endpoint", f"{bare:,.0f}", "1.00x"],
        *(
            [f"gateway, {name}", f"{value[name]:,.0f}", f"{value[name] / bare:.2f}x"]
            for name in ("accepted/s", "completed/s", "waited/s")
        ),
    ]
    latency = [
        [name, f"{value[f'{name} p50'] * 1e3:.2f}", f"{value[f'{name} p99'] * 1e3:.2f}"]
        for name in ("bare", "gateway")
    ]
    cpu = [
        ["bare FastAPI endpoint", f"{value['bare server us']:.0f}", "-"],
        [
            "gateway and its 3 steps",
            f"{value['gateway server us']:.0f}",
            f"{value['gateway steps us']:.0f}",
        ],
    ]
    added_ms = (value["gateway p50"] - value["bare p50"]) * 1e3
    lines = [
        table(["requests per second", "rate", "vs bare"], rows),
        "",
        table(["one request at a time", "p50 ms", "p99 ms"], latency),
        "",
        table(["CPU per job, microseconds", "server", "steps"], cpu),
        "",
        check("gateway accepted vs bare", value["accepted/s"] / bare, 0.5, at_least=True),
        check("gateway completed vs bare", value["completed/s"] / bare, 0.5, at_least=True),
        f"  added p50 through 3 steps: {added_ms:.2f} ms (target < 5 ms) "
        + ("met" if added_ms < 5 else "MISSED"),
        "",
        machine(),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per throughput run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--samples", type=int, default=300, help="requests timed one at a time")
    parser.add_argument("--reps", type=int, default=3, help="rounds, interleaving the servers")
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        _serve_bare()
        return
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as workdir:
        figures = measure(args, workdir)
    print(report(figures))


if __name__ == "__main__":
    main()
