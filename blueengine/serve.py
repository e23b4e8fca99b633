"""`blueengine serve APP`: the gateway and every step of an engine on this machine, no Docker.

The phases, in order:

1. start every step replica and wait until each step is ready (Ctrl-C aborts);
2. serve HTTP with uvicorn; print the URL and a curl example to paste; log one line per job;
3. on Ctrl-C or SIGTERM, uvicorn stops taking connections and finishes the requests it has
   (waits and event streams end at once, so clients come back later);
4. the engine drains: no new job starts, running ones get `drain_timeout_s` to finish;
5. the steps stop and the job store closes. Jobs still unfinished stay so in the store, and the
   next `serve` on the same ``--db`` resumes them.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

import uvicorn

from blueengine.client import LocalEngine
from blueengine.engine import BlueEngine
from blueengine.gateway import Gateway, GatewaySettings, create_app, job_log
from blueengine.sqlite_store import SqliteStore

logger = logging.getLogger(__name__)

GRACEFUL_HTTP_S = 5


@dataclass
class ServeOptions:
    """What `blueengine serve` was asked for."""

    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "blueengine.db"
    max_jobs: int = 10_000
    keep_finished: int = 10_000
    keep_finished_s: float = 7 * 86400.0
    drain_timeout_s: float = 30.0
    ready_timeout_s: float = 60.0
    max_connections: int = 1000
    settings: GatewaySettings = field(default_factory=GatewaySettings.from_env)


def serve(engine: BlueEngine, options: ServeOptions, out: TextIO) -> int:
    """Run the engine and its gateway until SIGINT or SIGTERM; returns the exit code."""
    _show_job_lines()
    store = SqliteStore(
        options.db,
        keep_finished=options.keep_finished,
        keep_finished_s=options.keep_finished_s,
        allow_pickle=engine.allow_pickle,
    )
    try:
        local = _start_engine(engine, store, options)
        if local is None:
            return 130
        try:
            _serve_http(local, options, out)
        finally:
            logger.info("Draining the engine (up to %.0f s).", options.drain_timeout_s)
            local.stop(drain=True)
    finally:
        store.close()
    return 0


def _show_job_lines() -> None:
    # One line per job is what the service shows by default; --log-level ERROR hides them.
    if logging.getLogger().getEffectiveLevel() <= logging.WARNING:
        job_log.setLevel(logging.INFO)


def _start_engine(
    engine: BlueEngine, store: SqliteStore, options: ServeOptions
) -> LocalEngine | None:
    """Start every replica and wait for all steps; None if interrupted meanwhile."""
    local = LocalEngine(
        engine,
        store=store,
        max_jobs=options.max_jobs,
        drain_timeout_s=options.drain_timeout_s,
        ready_timeout_s=options.ready_timeout_s,
    )
    # Until the gateway serves, SIGTERM aborts the start as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        local.start()
    except KeyboardInterrupt:
        logger.warning("Interrupted while the steps were starting; stopped.")
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return local


def _serve_http(local: LocalEngine, options: ServeOptions, out: TextIO) -> None:
    app = create_app(local.hub, options.settings)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_HTTP_S,
        limit_concurrency=options.max_connections,
    )
    server = _Server(config, app.state.gateway, lambda port: _announce(local, options, port, out))
    # uvicorn restores these when it stops and re-raises the signal it caught: they must only
    # take note, or the drain that follows would be cut short.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.note_signal)
    server.run()


class _Server(uvicorn.Server):
    """uvicorn's server, which says when it listens and ends event streams as it stops."""

    def __init__(
        self, config: uvicorn.Config, gateway: Gateway, on_ready: Callable[[int], None]
    ) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.on_ready = on_ready
        self.stop = threading.Event()

    def note_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready(self.servers[0].sockets[0].getsockname()[1])
        if self.stop.is_set():  # a signal came before uvicorn listened for them
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.end_streams()
        await super().shutdown(sockets)


def _announce(local: LocalEngine, options: ServeOptions, port: int, out: TextIO) -> None:
    # A wildcard address is where the server listens, not one to paste: name loopback instead.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(options.host, options.host)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    steps = ", ".join(f"{s.name} x{s.replicas}" for s in local.engine.steps)
    out.write(f"BlueEngine {local.engine.name} is ready at {url}\n")
    out.write(f"  steps: {steps}; jobs kept in {options.db}\n")
    out.write(f"Try:\n  {curl_example(local.engine, url, options.settings)}\n")
    out.write("Press Ctrl-C to drain and stop.\n")
    out.flush()


def curl_example(engine: BlueEngine, url: str, settings: GatewaySettings) -> str:
    """A command that submits one job and waits for its result."""
    parts = ["curl", "-s", "-X", "POST", f"{url}/jobs?wait=30"]
    parts += ["-H", "Content-Type: application/json"]
    if settings.api_keys:
        parts += ["-H", "Authorization: Bearer <one of BLUEENGINE_API_KEYS>"]
    parts += ["-d", json.dumps(_example_payload(engine))]
    return shlex.join(parts)


def _example_payload(engine: BlueEngine) -> Any:
    schema_of = getattr(engine.payload_model, "model_json_schema", None)
    schema = schema_of() if schema_of is not None else {}
    examples = schema.get("examples") or [{}]
    return examples[0]
