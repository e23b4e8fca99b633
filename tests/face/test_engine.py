"""services.face:engine in real processes: real photos, bad input, SSRF, and every way to run it.

One engine serves the whole module (starting six processes with their models takes seconds).
Images are built from scikit-image's photos at test time and served by a local HTTP server;
BLUEENGINE_FETCH_ALLOW_NETS allows 127.0.0.1 alone, so the trap listening on 127.0.0.2 stands for
every address the engine must not reach.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image, ImageEnhance

pytest.importorskip("dlib")
pytest.importorskip("skimage")

from skimage import data

from blueengine.client import LocalEngine
from blueengine.jobs import Job
from services.face import make_engine
from services.face.fetch import ALLOW_NETS_ENV
from services.face.gallery import sample_face
from tests.gateway_engines import Served

from .conftest import MIB, ContentServer, Trap, encode, start_server, stop_server

# The first test also starts the engine and runs every source; on a busy machine that is slow.
pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = "127.0.0.1/32"
JOB_TIMEOUT_S = 30.0

# Tighter than the defaults, so that limits are reached quickly by small test files.
LIMITS = {
    "max_bytes": 2 * MIB,
    "max_pixels": 4_000_000,
    "connect_timeout_s": 1.0,
    "read_timeout_s": 1.0,
    "total_timeout_s": 2.0,
}


# -- images -----------------------------------------------------------------------------------


def rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).rotate(degrees, Image.Resampling.BILINEAR))


def brightened(image: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))


def grayscale(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("L"))


def resized(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.LANCZOS))


def on_canvas(image: np.ndarray, side: int, at: tuple[int, int]) -> np.ndarray:
    canvas = np.full((side, side, 3), 90, dtype=np.uint8)
    canvas[at[1] : at[1] + image.shape[0], at[0] : at[0] + image.shape[1]] = image
    return canvas


@dataclass(frozen=True)
class Photo:
    """A test image, how it is sent, and the faces (all Eileen Collins) it holds."""

    name: str
    image: np.ndarray
    faces: int
    fmt: str = "PNG"
    inline: bool = False  # sent as a data: URI instead of a URL
    embedding: bool = False

    @property
    def path(self) -> str:
        return f"/photos/{self.name}.{self.fmt.lower()}"

    def body(self) -> bytes:
        return encode(Image.fromarray(self.image), self.fmt)

    def payload(self, server: ContentServer) -> dict[str, Any]:
        if self.inline:
            uri = f"data:image/{self.fmt.lower()};base64,{base64.b64encode(self.body()).decode()}"
            payload: dict[str, Any] = {"image_url": uri}
        else:
            payload = {"image_url": server.url(self.path)}
        if self.embedding:
            payload["embedding"] = True
        return payload


def make_photos() -> list[Photo]:
    astronaut = data.astronaut()
    head = sample_face()
    return [
        Photo("astronaut", astronaut, 1),
        Photo("astronaut-jpeg", astronaut, 1, fmt="JPEG"),
        Photo("mirrored", np.ascontiguousarray(np.fliplr(astronaut)), 1),
        Photo("rotated-8", rotated(astronaut, 8), 1),
        Photo("rotated-minus-8", rotated(astronaut, -8), 1),
        Photo("brighter", brightened(astronaut, 1.4), 1),
        Photo("darker", brightened(astronaut, 0.6), 1),
        Photo("grayscale", grayscale(astronaut), 1),
        Photo("tiled-2x2", np.tile(astronaut, (2, 2, 1)), 4),
        Photo("pair", np.hstack([astronaut, np.fliplr(astronaut)]), 2),
        Photo("smaller", resized(astronaut, 384), 1),
        Photo("on-canvas", on_canvas(astronaut, 768, (200, 150)), 1),
        Photo("head", head, 1),
        Photo("head-inline", head, 1, fmt="JPEG", inline=True),
        Photo("with-embedding", astronaut, 1, embedding=True),
        Photo("chelsea", data.chelsea(), 0),
        Photo("coffee", data.coffee(), 0),
        Photo("camera", data.camera(), 0),
        Photo("rocket", data.rocket(), 0),
        Photo("ihc", data.immunohistochemistry(), 0),
    ]


PHOTOS = make_photos()
PHOTO_NAMES = [photo.name for photo in PHOTOS]


def bad_routes() -> dict[str, bytes]:
    """Bodies the engine must refuse as images, or as too many pixels."""
    png = encode(Image.fromarray(data.astronaut()), "PNG")
    return {
        "/bad/page.json": json.dumps({"error": "not found"}).encode(),
        "/bad/random.bin": np.random.default_rng(0).bytes(4096),
        "/bad/empty": b"",
        "/bad/truncated.png": png[: len(png) // 2],
        "/bad/huge.png": encode(Image.new("RGB", (2500, 2000)), "PNG"),
    }


# -- the engine and its server --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(astronaut_png: bytes, astronaut_jpeg: bytes) -> Iterator[ContentServer]:
    content = start_server(astronaut_png, astronaut_jpeg)
    for path, body in {**{p.path: p.body() for p in PHOTOS}, **bad_routes()}.items():
        content.routes[path] = lambda h, body=body: h.reply(200, body)
    yield content
    stop_server(content)


@pytest.fixture(scope="module")
def client(server: ContentServer) -> Iterator[LocalEngine]:
    # Replica processes inherit the environment at spawn, restarted ones too: keep it all along.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ALLOW_NETS_ENV, ALLOWED)
        engine = make_engine({"download": LIMITS})
        with engine.run_local(ready_timeout_s=120, drain_timeout_s=5) as local:
            yield local


def run_jobs(client: LocalEngine, payloads: Sequence[Any]) -> list[Job]:
    job_ids = [client.submit(payload) for payload in payloads]
    return [client.wait(job_id, JOB_TIMEOUT_S) for job_id in job_ids]


def run_job(client: LocalEngine, payload: Any) -> Job:
    [job] = run_jobs(client, [payload])
    return job


# -- the same photos through every way of running the engine --------------------------------------

Outcome = tuple[str, list[dict[str, Any]]]
"""A job as the comparison sees it: its status and its results in face order."""


def outcome(status: str, results: list[dict[str, Any]]) -> Outcome:
    return status, sorted(results, key=lambda result: result["index"])


@dataclass
class Runners:
    """What the sources run the photos through: the module's engine and its gateway."""

    client: LocalEngine
    gateway_url: str


def through_local_engine(runners: Runners, payloads: list[dict[str, Any]]) -> list[Outcome]:
    return [outcome(job.status, job.results) for job in run_jobs(runners.client, payloads)]


def through_gateway(runners: Runners, payloads: list[dict[str, Any]]) -> list[Outcome]:
    with httpx.Client(base_url=runners.gateway_url, timeout=JOB_TIMEOUT_S + 10) as http:
        views = [
            http.post("/jobs", params={"wait": JOB_TIMEOUT_S}, json=payload).json()
            for payload in payloads
        ]
    return [outcome(view["status"], view["results"]) for view in views]


def through_cli(payloads: list[dict[str, Any]], *flags: str) -> list[Outcome]:
    inputs = [arg for payload in payloads for arg in ("--input", json.dumps(payload))]
    command = [sys.executable, "-m", "blueengine", "run", "services.face:engine", *inputs]
    env = {**os.environ, ALLOW_NETS_ENV: ALLOWED, "BLUEENGINE_LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [*command, *flags],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return [outcome(record["status"], record["results"]) for record in records]


def through_cli_pipeline(runners: Runners, payloads: list[dict[str, Any]]) -> list[Outcome]:
    return through_cli(payloads)


def through_cli_inline(runners: Runners, payloads: list[dict[str, Any]]) -> list[Outcome]:
    return through_cli(payloads, "--inline")


Source = Callable[[Runners, list[dict[str, Any]]], list[Outcome]]

# Every way of running the engine, each given the same payloads; the first is the reference.
SOURCES: dict[str, Source] = {
    "local-engine": through_local_engine,
    "cli": through_cli_pipeline,
    "cli-inline": through_cli_inline,
    "gateway": through_gateway,
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`blueengine serve services.face:engine` in a child process, as `make run` starts it."""
    where = tmp_path_factory.mktemp("gateway")
    env = {ALLOW_NETS_ENV: ALLOWED, "BLUEENGINE_MAX_BODY_BYTES": str(8 * MIB)}
    served = Served("services.face:engine", str(where / "jobs.db"), log_dir=str(where), env=env)
    try:
        yield served.wait_ready(timeout_s=150)
    finally:
        served.stop()


@pytest.fixture(scope="module")
def outcomes(
    client: LocalEngine, gateway: str, server: ContentServer
) -> dict[str, dict[str, Outcome]]:
    """Each source's outcome per photo name; the sources run at once, sharing the 2 cores."""
    payloads = [photo.payload(server) for photo in PHOTOS]
    runners = Runners(client, gateway)
    with ThreadPoolExecutor(len(SOURCES)) as pool:
        futures = {name: pool.submit(source, runners, payloads) for name, source in SOURCES.items()}
        return {
            name: dict(zip(PHOTO_NAMES, future.result(), strict=True))
            for name, future in futures.items()
        }


@pytest.mark.parametrize("photo", PHOTOS, ids=PHOTO_NAMES)
def test_photo_is_recognized(photo: Photo, outcomes: dict[str, dict[str, Outcome]]) -> None:
    status, results = outcomes["local-engine"][photo.name]

    assert status == "done"
    assert [result["index"] for result in results] == list(range(photo.faces))
    for result in results:
        assert result["faces"] == photo.faces
        assert result["identity"] == "eileen_collins"
        assert result["distance"] < 0.6
        assert len(result["landmarks"]) == 68
        assert ("embedding" in result) == photo.embedding
        height, width = photo.image.shape[:2]
        assert result["image"] == {"width": width, "height": height}
        box = result["box"]
        assert 0 <= box["left"] < box["right"] <= width
        assert 0 <= box["top"] < box["bottom"] <= height


def test_tiled_photo_has_a_face_in_each_quadrant(outcomes: dict[str, dict[str, Outcome]]) -> None:
    _, results = outcomes["local-engine"]["tiled-2x2"]

    quadrants = sorted((r["box"]["top"] // 512, r["box"]["left"] // 512) for r in results)
    assert quadrants == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("source", list(SOURCES)[1:])
def test_every_source_gives_the_same_results(
    source: str, outcomes: dict[str, dict[str, Outcome]]
) -> None:
    reference = outcomes["local-engine"]

    for name in PHOTO_NAMES:
        assert outcomes[source][name] == reference[name], name


def test_a_photo_uploaded_to_the_gateway_is_recognized(gateway: str, astronaut_png: bytes) -> None:
    with httpx.Client(base_url=gateway, timeout=JOB_TIMEOUT_S + 10) as http:
        response = http.post(
            "/jobs/upload",
            params={"wait": JOB_TIMEOUT_S},
            files={"file": ("astronaut.png", astronaut_png, "image/png")},
            data={"payload": json.dumps({"embedding": True})},
        )

    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "done"
    [face] = job["results"]
    assert face["identity"] == "eileen_collins"
    assert face["distance"] < 0.6
    assert len(face["embedding"]) == 128


# -- bad input fails its job, clearly -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "code"),
    [
        pytest.param("/page.html", "bad_image", id="html"),
        pytest.param("/bad/page.json", "bad_image", id="json"),
        pytest.param("/bad/random.bin", "bad_image", id="random-bytes"),
        pytest.param("/bad/empty", "bad_image", id="empty"),
        pytest.param("/bad/truncated.png", "bad_image", id="truncated"),
        pytest.param("/bad/huge.png", "too_large", id="too-many-pixels"),
        pytest.param("/huge-length", "too_large", id="content-length-over-limit"),
        pytest.param("/chunked", "too_large", id="body-over-limit"),
        pytest.param("/gzip-bomb", "too_large", id="gzip-bomb"),
        pytest.param("/missing", "fetch_failed", id="404"),
        pytest.param("/broken", "fetch_failed", id="500"),
        pytest.param("/silent", "fetch_failed", id="silent-origin"),
        pytest.param("/trickle", "fetch_failed", id="trickling-origin"),
        pytest.param("/loop-a", "fetch_failed", id="redirect-loop"),
    ],
)
def test_bad_download_fails_its_job_with_a_code(
    client: LocalEngine, server: ContentServer, path: str, code: str
) -> None:
    job = run_job(client, {"image_url": server.url(path)})

    assert job.status == "failed"
    assert job.error is not None
    assert (job.error["step"], job.error["code"]) == ("download", code)
    if code == "fetch_failed":
        assert server.url(path) in job.error["message"]
    assert job.results == []


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        pytest.param({"image_b64": "PCFkb2N0eXBlIGh0bWw+"}, "bad_image", id="b64-html"),
        pytest.param({"image_b64": "%%%"}, "bad_image", id="b64-invalid"),
        pytest.param({"image_url": "data:application/json,{}"}, "bad_image", id="data-json"),
        pytest.param({"image_url": "file:///etc/passwd"}, "url_refused", id="file-scheme"),
        pytest.param({"image_url": "ftp://127.0.0.1/a.png"}, "url_refused", id="ftp-scheme"),
        pytest.param({"image_url": "gopher://127.0.0.1:70/"}, "url_refused", id="gopher-scheme"),
        pytest.param({"url": "https://example.org/a.jpg"}, "bad_payload", id="no-image"),
        pytest.param(["not", "an", "object"], "bad_payload", id="not-an-object"),
    ],
)
def test_bad_payload_fails_its_job_with_a_code(
    client: LocalEngine, payload: Any, code: str
) -> None:
    job = run_job(client, payload)

    assert job.status == "failed"
    assert job.error is not None
    assert (job.error["step"], job.error["code"]) == ("download", code)


def test_credentials_in_the_url_are_refused_and_not_shown(
    client: LocalEngine, server: ContentServer
) -> None:
    url = f"http://admin:hunter2@127.0.0.1:{server.server_port}/astronaut.png"
    requests_before = len(server.requests)

    job = run_job(client, {"image_url": url})

    assert job.status == "failed"
    assert job.error is not None
    assert job.error["code"] == "url_refused"
    assert "hunter2" not in json.dumps(job.to_dict())
    assert len(server.requests) == requests_before


def forbidden_urls(trap: Trap, server: ContentServer) -> dict[str, str]:
    port = trap.port
    decimal = int(ipaddress.IPv4Address("127.0.0.2"))
    return {
        "loopback": trap.url(),
        "decimal": f"http://{decimal}:{port}/",
        "hex": f"http://0x7f000002:{port}/",
        "octal": f"http://0177.0.0.2:{port}/",
        "short": f"http://127.2:{port}/",
        "ipv4-mapped": f"http://[::ffff:127.0.0.2]:{port}/",
        "ipv6-loopback": f"http://[::1]:{port}/",
        "unspecified": f"http://0.0.0.0:{port}/",
        "private": "http://10.0.0.1/",
        "link-local": "http://169.254.1.1/",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "redirect": server.url(f"/redirect?status=302&to={quote(trap.url('/x'), safe='')}"),
        "redirect-307": server.url(f"/redirect?status=307&to={quote(trap.url('/x'), safe='')}"),
    }


def test_forbidden_addresses_are_refused_without_a_connection(
    client: LocalEngine, server: ContentServer, trap: Trap
) -> None:
    urls = forbidden_urls(trap, server)

    jobs = run_jobs(client, [{"image_url": url} for url in urls.values()])

    for name, job in zip(urls, jobs, strict=True):
        assert job.status == "failed", name
        assert job.error is not None
        assert job.error["code"] == "url_refused", (name, job.error)
    assert trap.accepted() == 0


def test_downloads_overlap(client: LocalEngine, server: ContentServer) -> None:
    # Each of these waits out the 1 s read timeout; one after another they would take 4 s.
    started = time.monotonic()

    jobs = run_jobs(client, [{"image_url": server.url(f"/silent?n={n}")} for n in range(4)])

    assert [job.error["code"] for job in jobs if job.error] == ["fetch_failed"] * 4
    assert time.monotonic() - started < 3


def test_engine_keeps_serving_after_bad_input(
    client: LocalEngine, server: ContentServer, trap: Trap
) -> None:
    bad = [
        {"image_url": server.url("/bad/random.bin")},
        {"image_url": trap.url()},
        {"image_url": server.url("/missing")},
        {"image_b64": "%%%"},
    ]
    good = PHOTOS[0].payload(server)

    jobs = run_jobs(client, [*bad, good, *bad, good])

    assert [job.status for job in jobs] == ["failed"] * 4 + ["done"] + ["failed"] * 4 + ["done"]
    assert jobs[4].results == jobs[-1].results
    assert [job.results[0]["identity"] for job in (jobs[4], jobs[-1])] == ["eileen_collins"] * 2
    # Bad input failed jobs; it never took a step process down.
    for spec in client.engine.steps:
        assert client.supervisor.exit_codes(spec.name) == [], spec.name
