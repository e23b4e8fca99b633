"""The HTTP gateway: takes jobs over HTTP, hands them to the engine's hub, follows them to the end.

It works for any engine: the payload is validated against ``engine.payload_model`` when the
engine has one (and the OpenAPI document at ``/openapi.json`` shows it), else it is any JSON
object. Pydantic's lax mode takes some values the schema does not name (``0`` for ``false``,
``"7"`` for ``7``); give such fields strict types to refuse them. Routes:

- ``POST /jobs``: queue a job. ``202`` with ``job_id``, ``status`` and a ``Location`` header;
  with ``?wait=S``, ``200`` and the finished job if it ends within S seconds.
- ``POST /jobs/upload``: the same for a file sent as multipart: the part ``file`` becomes the
  payload field ``<field>_b64`` (``image_b64`` unless the form says otherwise), base64; the
  form field ``payload`` may hold the other fields as a JSON object.
- ``GET /jobs/{job_id}``: the job. ``GET /jobs?status=&limit=&cursor=``: a page of jobs, newest
  first; follow ``next_cursor`` until it is null (a page may hold fewer than ``limit`` jobs).
- ``GET /jobs/{job_id}/events``: server-sent events: ``status`` for each Status message in
  order, ``retry`` when the job starts again (its statuses start afresh), and ``final`` with
  the job once it has ended, after which the stream closes.
- ``DELETE /jobs/{job_id}``: cancel the job. ``POST /control``: broadcast a command to every
  step that lists ``Control``.
- ``GET /healthz`` (the process serves), ``GET /readyz`` (every step has a live replica, else
  ``503``), ``GET /metrics`` (Prometheus; see `blueengine.metrics`).

Errors are JSON ``{"detail": "..."}``: 401 without a valid key, 404 for an unknown job, 409 to
cancel a job that already ended, 413 for a body over the limit (counted as it arrives, so a
body without Content-Length is stopped too), 422 for an invalid payload (with ``errors``), 429
with ``Retry-After`` when the engine already holds ``max_jobs`` unfinished jobs, 503 while it
stops. Nothing a client sends causes a 500.

With ``BLUEENGINE_API_KEYS`` set (comma-separated), ``/jobs*`` and ``/control`` need
``Authorization: Bearer <key>``; the probes and ``/metrics`` stay open.

    >>> client = engine.run_local(store=SqliteStore("jobs.db")).start()
    >>> app = create_app(client.hub)
    >>> uvicorn.run(app)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgpack
from fastapi import Body, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blueengine import __version__, protocol
from blueengine.errors import CodecError, EngineFull, EngineStopped, JobNotFound
from blueengine.hub import Hub
from blueengine.jobs import Job
from blueengine.metrics import CONTENT_TYPE, GatewayMetrics
from blueengine.types import JobStatus

logger = logging.getLogger(__name__)
job_log = logging.getLogger(f"{__name__}.jobs")
"""One line per job as it ends, at INFO (`blueengine serve` shows them)."""

MAX_WAIT_S = 300.0
KEEPALIVE_S = 15.0
MAX_PAGE = 1000
STOPPING_RETRY_AFTER_S = 5
_REJECTION = {EngineFull: "full", EngineStopped: "stopped", CodecError: "invalid"}
_SUBMIT = frozenset({"/jobs", "/jobs/upload"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway behaves; `from_env` reads the ``BLUEENGINE_*`` variables."""

    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20

    @classmethod
    def from_env(cls, **overrides: Any) -> GatewaySettings:
        """Settings from ``BLUEENGINE_API_KEYS`` and ``BLUEENGINE_MAX_BODY_BYTES``."""
        keys = os.environ.get("BLUEENGINE_API_KEYS", "")
        values: dict[str, Any] = {
            "api_keys": tuple(key.strip() for key in keys.split(",") if key.strip()),
            "max_body_bytes": int(os.environ.get("BLUEENGINE_MAX_BODY_BYTES", str(1 << 20))),
        }
        return cls(**{**values, **overrides})


# -- what the API answers (also its OpenAPI schemas) -------------------------------------------


class JobError(BaseModel):
    """Why a job failed or was cancelled; `step` is null when no step is to blame.

    `code` is a stable code when the step's exception carried one: branch on it, not on the
    message.
    """

    step: str | None
    type: str
    message: str
    code: str | None = None


class JobView(BaseModel):
    """A job as clients see it: `results` are those of its current attempt."""

    job_id: str
    status: JobStatus
    results: list[Any]
    error: JobError | None
    attempts: int
    created_at: float
    finished_at: float | None


class JobAccepted(BaseModel):
    """A job taken in; poll the `Location` header's URL or its events for the rest."""

    job_id: str
    status: JobStatus


class JobPage(BaseModel):
    """Jobs newest first; pass `next_cursor` as `cursor` for the next page (null at the end)."""

    jobs: list[JobView]
    next_cursor: str | None


class Problem(BaseModel):
    """An error: what went wrong and what to do about it."""

    detail: str


class InvalidRequest(BaseModel):
    """A request the gateway could not accept: a summary and each field at fault."""

    detail: str
    errors: list[dict[str, Any]]


class Readiness(BaseModel):
    """Live replicas per step; ready when every step has one and the engine takes jobs."""

    ready: bool
    steps: dict[str, int]
    detail: str | None = None


class Health(BaseModel):
    status: Literal["ok"]


class CommandSent(BaseModel):
    status: Literal["sent"]


def _problem(text: str, model: type[BaseModel] = Problem, **extra: Any) -> dict[str, Any]:
    # JSON named outright, not through `model`: FastAPI would give an event stream's errors
    # the stream's media type. `_add_error_schemas` puts the models in the document.
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"description": text, "content": {"application/json": {"schema": schema}}, **extra}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
_INVALID: dict[int | str, dict[str, Any]] = {
    422: _problem("The request or its payload is invalid", InvalidRequest)
}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem("The body could not be read as JSON text"),
    413: _problem("The body is larger than the gateway's limit"),
}
_UNKNOWN_JOB: dict[int | str, dict[str, Any]] = {404: _problem("No such job")}
_EVENT_STREAM = {
    "description": "Server-sent events: `status` (a Status message), `retry` (the job starts "
    "again; its statuses start afresh), then `final` (the job), after which the stream ends",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


# -- the gateway's state ------------------------------------------------------------------------


class Gateway:
    """The engine as the routes see it; wakes requests that wait on jobs when the hub reports."""

    def __init__(self, hub: Hub, settings: GatewaySettings) -> None:
        self.hub = hub
        self.settings = settings
        self.metrics = GatewayMetrics(hub)
        self.closing = False
        self._keys = [key.encode() for key in settings.api_keys]
        self._waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._attached = False

    # -- the hub's listeners (hub thread, under hub.lock: nothing here may block) -----------

    def attach(self) -> None:
        """Start listening to the hub; idempotent."""
        with self.hub.lock:
            if not self._attached:
                self.hub.listeners += [self._on_job_event, self.metrics.on_job_event]
                self._attached = True

    def detach(self) -> None:
        with self.hub.lock:
            if self._attached:
                self.hub.listeners.remove(self._on_job_event)
                self.hub.listeners.remove(self.metrics.on_job_event)
                self._attached = False

    def _on_job_event(self, job: Job, event: str, data: Any) -> None:
        if event in ("status", "retry", "final"):
            for loop, changed in self._waiting.get(job.job_id, ()):
                _wake(loop, changed)
        if event == "final":
            _log_end(job)

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, payload: Any) -> Job:
        """Queue a job, counting the outcome; hub errors pass through to their handlers."""
        try:
            job = self.hub.submit(payload)
        except (EngineFull, EngineStopped, CodecError) as exc:
            self.reject(_REJECTION[type(exc)])
            raise
        self.metrics.count_accepted()
        return job

    def reject(self, reason: str) -> None:
        self.metrics.count_rejected(reason)

    def view(self, job_id: str) -> dict[str, Any]:
        """The job as JSON, read whole under the hub's lock; raises JobNotFound."""
        with self.hub.lock:
            return _view(self.hub.get(job_id))

    def page(
        self, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        jobs, next_cursor = self.hub.store.page(status, limit, cursor)
        views = [self._live_view(job) for job in jobs]
        return [v for v in views if status is None or v["status"] == status], next_cursor

    def _live_view(self, job: Job) -> dict[str, Any]:
        # A store on disk does not follow a running job: the hub's copy is the current one.
        with self.hub.lock:
            if not job.status.final:
                job = self.hub.table.jobs.get(job.job_id) or self.hub.store.get(job.job_id) or job
            return _view(job)

    async def wait(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        """The job once it has ended, or as it is when the timeout passes."""
        async with self._watch(job_id) as changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while True:
                        changed.clear()
                        view = self.view(job_id)
                        if JobStatus(view["status"]).final or self.closing:
                            return view
                        await changed.wait()
        return self.view(job_id)

    async def events(self, job_id: str) -> AsyncIterator[tuple[str, Any] | None]:
        """The job's events as (name, data), from its first Status message to its end; None
        when nothing happened for `KEEPALIVE_S`, so that proxies keep the stream open."""
        cursor = _EventCursor()
        async with self._watch(job_id) as changed:
            while True:
                changed.clear()
                with self.hub.lock:
                    events, ended = cursor.advance(self.hub.get(job_id))
                for event in events:
                    yield event
                if ended or self.closing:
                    return
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        await changed.wait()
                except TimeoutError:
                    yield None

    @contextlib.asynccontextmanager
    async def _watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self.hub.lock:
            self._waiting.setdefault(job_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self.hub.lock:
                entries = self._waiting[job_id]
                entries.remove(entry)
                if not entries:
                    del self._waiting[job_id]

    @property
    def watching(self) -> int:
        """How many requests wait on jobs (waits and event streams)."""
        with self.hub.lock:
            return sum(len(entries) for entries in self._waiting.values())

    def end_streams(self) -> None:
        """Let waiting requests and event streams end now: the gateway is shutting down."""
        with self.hub.lock:
            self.closing = True
            for entries in self._waiting.values():
                for loop, changed in entries:
                    _wake(loop, changed)

    # -- keys and readiness ------------------------------------------------------------------

    def key_is_valid(self, key: str) -> bool:
        # Compared with every key, in constant time, so timing tells nothing about any of them.
        given = key.encode()
        matches = [hmac.compare_digest(given, known) for known in self._keys]
        return any(matches)

    def readiness(self) -> tuple[bool, dict[str, int], str | None]:
        live = self.hub.live_replicas()
        missing = [step for step, count in live.items() if count < 1]
        if missing:
            return False, live, f"steps without a live replica: {', '.join(missing)}"
        if not self.hub.intake_open:
            return False, live, "the engine is stopping and takes no new jobs"
        return True, live, None


class _EventCursor:
    """How far a client's event stream has got through a job."""

    def __init__(self) -> None:
        self.attempt = 0
        self.sent = 0

    def advance(self, job: Job) -> tuple[list[tuple[str, Any]], bool]:
        """Events not sent yet (call under the hub's lock), and whether the job has ended."""
        events: list[tuple[str, Any]] = []
        if job.attempts != self.attempt:
            if self.attempt:
                events.append(("retry", {"attempt": job.attempts}))
            self.attempt, self.sent = job.attempts, 0
        fresh = job.statuses[self.sent :]
        self.sent += len(fresh)
        events += [("status", status) for status in fresh]
        if job.status.final:
            events.append(("final", _view(job)))
        return events, job.status.final


def _view(job: Job) -> dict[str, Any]:
    view = job.to_dict()
    view["results"] = list(job.results)  # the hub appends to the live list
    return view


def _wake(loop: asyncio.AbstractEventLoop, changed: asyncio.Event) -> None:
    # The loop may have closed since the request registered; there is nobody left to wake.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(changed.set)


def _log_end(job: Job) -> None:
    if not job_log.isEnabledFor(logging.INFO):
        return
    elapsed = (job.finished_at or time.time()) - job.created_at
    why = ""
    if job.error:
        where = f"step {job.error['step']} " if job.error.get("step") else ""
        why = f": {where}{job.error['type']}: {job.error['message']}"
    job_log.info(
        "Job %s %s after %.3f s, %d attempt(s)%s.",
        job.job_id,
        job.status,
        elapsed,
        job.attempts,
        why,
    )


# -- routes -------------------------------------------------------------------------------------


async def _gateway(request: Request) -> Gateway:
    # async: FastAPI would run a plain function on its thread pool, a costly trip per request.
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]
WaitQuery = Annotated[
    float,
    Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait for the job to end (200 if it does)"),
]
_bearer = HTTPBearer(
    auto_error=False, description="One of the keys in the gateway's BLUEENGINE_API_KEYS"
)


async def _require_key(
    gateway: GatewayDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None:
        raise HTTPException(
            401,
            "this route needs an API key: send 'Authorization: Bearer <key>' with one of the "
            "keys in the gateway's BLUEENGINE_API_KEYS",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not gateway.key_is_valid(credentials.credentials):
        raise HTTPException(
            401,
            "the API key is not one of the gateway's keys (BLUEENGINE_API_KEYS)",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


async def _accept(gateway: Gateway, request: Request, data: Any, wait: float) -> Response:
    """Submit a payload; 202 with its Location, or 200 with the job if it ends within `wait`."""
    job = gateway.submit(data)
    headers = {"Location": f"{request.scope.get('root_path', '')}/jobs/{job.job_id}"}
    if wait > 0:
        view = await gateway.wait(job.job_id, wait)
        if JobStatus(view["status"]).final:
            return JSONResponse(view, 200, headers)
        return JSONResponse({"job_id": job.job_id, "status": view["status"]}, 202, headers)
    return JSONResponse({"job_id": job.job_id, "status": job.status.value}, 202, headers)


def _submit_endpoint(gateway: Gateway, payload_type: Any) -> Callable[..., Awaitable[Response]]:
    # The busiest route takes its gateway from here, not from a dependency FastAPI would solve.
    async def submit_job(request: Request, payload: Any, wait: WaitQuery = 0) -> Response:
        data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
        return await _accept(gateway, request, data, wait)

    # FastAPI validates the body against, and documents, the type this annotation names: the
    # engine's payload model, known only now.
    submit_job.__annotations__["payload"] = Annotated[payload_type, Body()]
    return submit_job


def _upload_endpoint(gateway: Gateway, payload_type: Any) -> Callable[..., Awaitable[Response]]:
    """``POST /jobs/upload``: a file sent as multipart becomes a base64 field of the payload.

    The file part ``file`` becomes ``<field>_b64`` (``image_b64`` by default, what the face
    engine reads); ``payload`` may carry the payload's other fields as a JSON object. The result
    is validated like a ``POST /jobs`` body.
    """

    async def upload_job(
        request: Request,
        file: Annotated[UploadFile, File(description="The file the job is about")],
        field: Annotated[str, Form(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")] = "image",
        payload: Annotated[str, Form(description="Other payload fields, a JSON object")] = "{}",
        wait: WaitQuery = 0,
    ) -> Response:
        data = _payload_fields(payload)
        data[f"{field}_b64"] = base64.b64encode(await file.read()).decode("ascii")
        if isinstance(payload_type, type) and issubclass(payload_type, BaseModel):
            try:
                data = payload_type.model_validate(data).model_dump(mode="json")
            except ValidationError as exc:
                raise RequestValidationError(exc.errors(include_url=False)) from None
        return await _accept(gateway, request, data, wait)

    return upload_job


def _payload_fields(text: str) -> dict[str, Any]:
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        fields = exc
    if not isinstance(fields, dict):
        error = {"loc": ["body", "payload"], "msg": "must be a JSON object", "type": "value_error"}
        raise RequestValidationError([error])
    return fields


async def get_job(job_id: str, gateway: GatewayDep) -> Response:
    return JSONResponse(gateway.view(job_id))


async def list_jobs(
    gateway: GatewayDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    jobs, next_cursor = gateway.page(status, limit, cursor)
    return JSONResponse({"jobs": jobs, "next_cursor": next_cursor})


async def job_events(job_id: str, gateway: GatewayDep) -> Response:
    gateway.view(job_id)  # a 404 now, before the stream's 200 is sent
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    stream = _event_stream(gateway.events(job_id))
    return StreamingResponse(stream, headers=headers, media_type="text/event-stream")


async def _event_stream(events: AsyncIterator[tuple[str, Any] | None]) -> AsyncIterator[bytes]:
    async for event in events:
        if event is None:
            yield b": keep-alive\n\n"
        else:
            name, data = event
            yield f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def cancel_job(job_id: str, gateway: GatewayDep) -> Response:
    cancelled = gateway.hub.cancel(job_id)
    view = gateway.view(job_id)
    if not cancelled and view["status"] != JobStatus.CANCELLED:
        detail = f"job {job_id!r} already ended {view['status']}; there is nothing to cancel"
        return JSONResponse({"detail": detail}, 409)
    return JSONResponse(view)


async def send_command(gateway: GatewayDep, command: Annotated[dict[str, Any], Body()]) -> Response:
    try:
        protocol.pack(command)
    except (ValueError, TypeError, OverflowError, msgpack.PackException) as exc:
        raise CodecError(
            f"the command cannot be sent to the steps ({exc}); integers must fit in 64 bits"
        ) from None
    gateway.hub.command(command)
    return JSONResponse({"status": "sent"}, 202)


async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(gateway: GatewayDep) -> Response:
    ready, steps, detail = gateway.readiness()
    return JSONResponse({"ready": ready, "steps": steps, "detail": detail}, 200 if ready else 503)


async def metrics(gateway: GatewayDep) -> Response:
    return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE)


def _add_job_routes(app: FastAPI, gateway: Gateway, payload_type: Any, guarded: bool) -> None:
    # Routes go on the app itself, not through an included router: the 405 handler looks
    # for every method of a path among the app's own routes.
    guard = [Depends(_require_key)] if guarded else []
    refused: dict[int | str, dict[str, Any]] = {}
    if guarded:
        refused[401] = _problem("No API key, or not a valid one")

    def add(path: str, endpoint: Any, method: str, responses: Any, **options: Any) -> None:
        app.add_api_route(
            path,
            endpoint,
            methods=[method],
            dependencies=[*guard, *options.pop("dependencies", [])],
            responses={**_INVALID, **refused, **responses},
            tags=[options.pop("tag", "jobs")],
            **options,
        )

    submitted = {
        202: {"model": JobAccepted, "description": "Queued; see the Location header"},
        200: {"model": JobView, "description": "Finished within `wait` seconds"},
        **_BODY_ERRORS,
        429: _problem("The engine is full; retry later", headers=_RETRY_AFTER),
        503: _problem("The engine is stopping", headers=_RETRY_AFTER),
    }
    add(
        "/jobs",
        _submit_endpoint(gateway, payload_type),
        "POST",
        submitted,
        status_code=202,
        summary="Queue a job",
    )
    add(
        "/jobs/upload",
        _upload_endpoint(gateway, payload_type),
        "POST",
        submitted,
        status_code=202,
        summary="Queue a job about an uploaded file",
    )
    add("/jobs", list_jobs, "GET", {200: {"model": JobPage}}, summary="List jobs")
    add(
        "/jobs/{job_id}",
        get_job,
        "GET",
        {200: {"model": JobView}, **_UNKNOWN_JOB},
        summary="Get a job",
    )
    add(
        "/jobs/{job_id}/events",
        job_events,
        "GET",
        {200: _EVENT_STREAM, **_UNKNOWN_JOB},
        summary="Follow a job's events",
    )
    add(
        "/jobs/{job_id}",
        cancel_job,
        "DELETE",
        {200: {"model": JobView}, **_UNKNOWN_JOB, 409: _problem("The job had already ended")},
        summary="Cancel a job",
    )
    add(
        "/control",
        send_command,
        "POST",
        {202: {"model": CommandSent}, **_BODY_ERRORS},
        status_code=202,
        summary="Send a command to every step that lists Control",
        description="Any JSON object that msgpack can carry: integers within 64 bits, nesting "
        "under 512 levels (else 422). Steps run it as an item with no job.",
        tag="control",
    )


def _add_probe_routes(app: FastAPI) -> None:
    app.add_api_route(
        "/healthz", healthz, methods=["GET"], tags=["probes"], responses={200: {"model": Health}}
    )
    app.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        tags=["probes"],
        responses={
            200: {"model": Readiness},
            503: {"model": Readiness, "description": "Not ready"},
        },
    )
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        tags=["probes"],
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )


# -- errors -------------------------------------------------------------------------------------


async def _on_invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if request.method == "POST" and request.url.path.endswith("/jobs"):
        gateway: Gateway = request.app.state.gateway
        gateway.reject("invalid")
    errors = [_field_error(error) for error in exc.errors()]
    where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
    return JSONResponse({"detail": f"invalid request: {where}", "errors": errors}, 422)


def _field_error(error: Any) -> dict[str, Any]:
    # Only what is surely JSON: pydantic's `ctx` and `input` may hold any object.
    message = str(error.get("msg", ""))
    ctx = error.get("ctx")
    if error.get("type") == "json_invalid" and isinstance(ctx, dict):
        message = f"the body is not valid JSON ({ctx.get('error')})"
    return {
        "loc": [str(part) for part in error.get("loc", ())],
        "msg": message,
        "type": str(error.get("type")),
    }


async def _on_unknown_job(request: Request, exc: Exception) -> Response:
    detail = f"{exc}: no job by that id was accepted here, or it ended long enough ago to be pruned"
    return JSONResponse({"detail": detail}, 404)


async def _on_full(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineFull)
    seconds = max(1, math.ceil(exc.retry_after_s))
    detail = f"{exc}; retry in {seconds} s"
    return JSONResponse({"detail": detail}, 429, {"Retry-After": str(seconds)})


async def _on_stopped(request: Request, exc: Exception) -> Response:
    headers = {"Retry-After": str(STOPPING_RETRY_AFTER_S)}
    return JSONResponse({"detail": f"{exc}; retry on another gateway or later"}, 503, headers)


async def _on_unencodable(request: Request, exc: Exception) -> Response:
    detail = f"the engine cannot carry this body: {exc}"
    return JSONResponse({"detail": detail, "errors": []}, 422)


async def _on_crash(request: Request, exc: Exception) -> Response:
    logger.error("The gateway failed on %s %s.", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "the gateway failed on this request; its log says why"}, 500)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names the methods of one route; /jobs has a route per method.
        headers["Allow"] = ", ".join(_methods_for(request))
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers)


def _methods_for(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _add_error_schemas(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in (Problem, InvalidRequest):
                schemas[model.__name__] = model.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(JobNotFound, _on_unknown_job)
    app.add_exception_handler(EngineFull, _on_full)
    app.add_exception_handler(EngineStopped, _on_stopped)
    app.add_exception_handler(CodecError, _on_unencodable)
    app.add_exception_handler(Exception, _on_crash)


# -- middleware ---------------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised while a request body is read, once it passes the gateway's limit."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than this gateway's limit of {max_bytes} bytes; "
            "send a smaller payload (large inputs belong behind a URL the first step fetches) "
            "or raise BLUEENGINE_MAX_BODY_BYTES",
        )


class BodyLimit:
    """Answers 413 for a body over `max_bytes`: at once from Content-Length, else as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            await JSONResponse({"detail": error.detail}, 413)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_within_limit, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class ShedWhenFull:
    """Answers 429 to ``POST /jobs`` while the engine is full, before the body is read.

    Under a flood most requests are refused; refusing them unread spares parsing and validating
    bodies that could not be taken anyway. It runs before the key check, so a client without
    a key may learn that the engine is full, and nothing more.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in _SUBMIT:
            hub = self.gateway.hub
            # Read without the hub's lock, which the hub holds while it works: a count a moment
            # stale is fine here, as `Hub.submit` checks again under the lock.
            unfinished = len(hub.table.queue) + hub.table.in_flight
            if unfinished >= hub.max_jobs:
                self.gateway.reject("full")
                full = EngineFull(f"the engine already holds {unfinished} unfinished jobs")
                response = await _on_full(Request(scope), full)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HttpMetrics:
    """Counts requests and their durations by route template, never by raw path."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def send_and_note(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_http(method, route, code, time.perf_counter() - started)


# -- the app ------------------------------------------------------------------------------------


def create_app(hub: Hub, settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway's ASGI app for a hub (started or not); serve it with uvicorn.

    The app listens to the hub from now on (``app.state.gateway.detach()`` stops that).
    """
    settings = settings if settings is not None else GatewaySettings.from_env()
    gateway = Gateway(hub, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway.attach()
        yield
        # Still attached: jobs that end while the engine drains are counted and logged.
        gateway.end_streams()

    app = FastAPI(
        title=f"BlueEngine {hub.engine.name}",
        version=__version__,
        description=f"Jobs for the {hub.engine.name!r} engine, by the BlueEngine gateway.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    guarded = bool(settings.api_keys)
    _add_job_routes(app, gateway, hub.engine.payload_model or dict[str, Any], guarded)
    _add_probe_routes(app)
    _add_error_handlers(app)
    _add_error_schemas(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ShedWhenFull, gateway=gateway)
    app.add_middleware(HttpMetrics, metrics=gateway.metrics)
    gateway.attach()
    return app
