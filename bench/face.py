"""The face engine on photos of 0 to 9 faces: the pipeline against inline, per-step times.

    python -m bench.face [--images 44] [--tile 200] [--seed 7] [--rounds 1] [--no-wait]

Each photo is a 3x3 grid of tiles: k of them Eileen Collins' head from scikit-image's astronaut
(mirrored, lit and turned at random), the others pieces of scikit-image's photos without faces,
with k = 0..9 spread evenly and shuffled. They are served as JPEG by an HTTP server on loopback
in this process (allowed with BLUEENGINE_FETCH_ALLOW_NETS) and run three ways, the same photos in
the same order:

1. inline: every step in this process, one after another (`blueengine.inline`), with each step
   function timed: these times give each step's mean time per item and the ideal speedup;
2. the pipeline, one process per step;
3. the pipeline with two replicas of the slowest step.

On a shared machine other work only ever adds time: before each run the benchmark waits (up to
``--max-wait-s``) until other processes leave the CPUs idle, prints the cores other processes
used during each run, and with ``--rounds N`` runs everything N times and reports the fastest
run of each kind.

The ideal speedup of a pipeline over inline is the inline total divided by the longest of:
each step's inline total divided by its replicas (at most the cores), and the inline total
divided by the cores. dlib is not linked to a BLAS library and runs each call on one thread,
and the steps use numpy only for small arrays; the step processes are started with OMP,
OpenBLAS and MKL limited to one thread all the same. The cores each run kept busy (CPU time
over wall time) are printed as evidence: inline must show 1.0, or its baseline was parallel.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import psutil
from PIL import Image, ImageEnhance

from bench.report import check, machine, table
from blueengine import BlueEngine, Context
from blueengine.inline import InlineEngine
from blueengine.outputs import iterate
from blueengine.types import StepFunc
from services.face import STEP_NAMES, make_engine
from services.face.fetch import ALLOW_NETS_ENV

CORES = 2
TARGET_SPEEDUP = 1.8
TARGET_OF_IDEAL = 0.85
GRID = 3
JOB_TIMEOUT_S = 300.0
THREAD_LIMITS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
STATS_DELAY_S = 1.5  # a replica's stats reach the hub with its heartbeat, once a second
IDLE_BUSY_PERCENT = 10.0
IDLE_SAMPLE_S = 2.0


# -- photos ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    name: str
    jpeg: bytes
    faces: int


def make_photos(count: int, tile: int, seed: int) -> list[Photo]:
    """`count` grids of tiles with 0..9 faces each, shuffled; see the module's docs."""
    from skimage import data

    from services.face.gallery import sample_face

    rng = np.random.default_rng(seed)
    head = Image.fromarray(sample_face())
    scenes = [
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        np.stack([data.camera()] * 3, axis=2),
        data.immunohistochemistry(),
        data.hubble_deep_field(),
    ]
    faces = [index % (GRID * GRID + 1) for index in range(count)]
    rng.shuffle(faces)
    photos = []
    for number, k in enumerate(faces):
        with_face = set(rng.permutation(GRID * GRID)[:k].tolist())
        grid = np.zeros((GRID * tile, GRID * tile, 3), dtype=np.uint8)
        for slot in range(GRID * GRID):
            row, column = divmod(slot, GRID)
            piece = _face_tile(head, tile, rng) if slot in with_face else None
            if piece is None:
                piece = _scene_tile(scenes, tile, rng)
            grid[row * tile : (row + 1) * tile, column * tile : (column + 1) * tile] = piece
        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, "JPEG", quality=90)
        photos.append(Photo(f"photo-{number:03d}.jpg", buffer.getvalue(), k))
    return photos


def _face_tile(head: Image.Image, tile: int, rng: np.random.Generator) -> np.ndarray:
    image = head.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else head
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    image = image.rotate(rng.uniform(-6, 6), Image.Resampling.BILINEAR, fillcolor=(90, 90, 90))
    return np.asarray(image.resize((tile, tile)))


def _scene_tile(scenes: Sequence[np.ndarray], tile: int, rng: np.random.Generator) -> np.ndarray:
    scene = scenes[int(rng.integers(len(scenes)))]
    height, width = scene.shape[:2]
    side = int(rng.integers(min(height, width) // 3, min(height, width)))
    top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    piece = Image.fromarray(scene[top : top + side, left : left + side])
    return np.asarray(piece.resize((tile, tile)))


@contextmanager
def serving(photos: Sequence[Photo]) -> Iterator[str]:
    """An HTTP server on loopback with every photo; yields its base URL."""
    bodies = {f"/{photo.name}": photo.jpeg for photo in photos}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- runs -----------------------------------------------------------------------------------


@dataclass
class Run:
    """One way of running the photos: wall and CPU seconds, per-step times, the results."""

    label: str
    wall_s: float
    cpu_s: float  # CPU time of this process and the engine's processes
    others_s: float  # CPU time of every other process on the machine meanwhile
    step_s: dict[str, float]  # seconds in each step function, summed over items
    step_items: dict[str, int]
    results: list[list[dict[str, Any]]] = field(default_factory=list)
    replicas: Mapping[str, int] = field(default_factory=dict)

    def mean_ms(self, step: str) -> float:
        return 1000 * self.step_s[step] / max(1, self.step_items[step])

    def busy(self, step: str) -> float:
        """The share of the run that the step's replicas spent in the step function."""
        return self.step_s[step] / (self.wall_s * self.replicas.get(step, 1))


def timed_engine(engine: BlueEngine, step_s: dict[str, float], items: dict[str, int]) -> BlueEngine:
    """A copy of `engine` whose step functions add their time to `step_s` (inline only)."""
    clone = BlueEngine(engine.name)
    for spec in engine.steps:
        clone.add_step(
            spec.name,
            _timed(spec.load_func(), step_s, items),
            spec.input_channels,
            spec.output_channels,
            setup=spec.setup,
            config=spec.config,
        )
    return clone


def _timed(func: StepFunc, step_s: dict[str, float], items: dict[str, int]) -> StepFunc:
    def step(context: Context, input: dict[str, Any]) -> Iterator[Any]:
        started = time.perf_counter()
        outputs = list(iterate(func(context, input)))  # a generator's work happens here
        step_s[context.step] += time.perf_counter() - started
        items[context.step] += 1
        return iter(outputs)

    return step


def run_inline(engine: BlueEngine, payloads: Sequence[dict[str, Any]]) -> Run:
    step_s: dict[str, float] = defaultdict(float)
    items: dict[str, int] = defaultdict(int)
    inline = InlineEngine(timed_engine(engine, step_s, items))
    inline.run_one(payloads[0])  # warm up: first calls into dlib are slower
    step_s.clear()
    items.clear()

    meter = Meter([])
    jobs = list(inline.run(payloads))
    wall_s, cpu_s, others_s = meter.read()
    results = [_faces(job) for job in jobs]
    return Run("inline", wall_s, cpu_s, others_s, dict(step_s), dict(items), results)


def run_pipeline(engine: BlueEngine, payloads: Sequence[dict[str, Any]], label: str) -> Run:
    with engine.run_local(ready_timeout_s=120) as client:
        client.wait(client.submit(payloads[0]), JOB_TIMEOUT_S)  # warm up every step
        time.sleep(STATS_DELAY_S)
        before = client.hub.step_stats()
        meter = Meter([pid for s in engine.steps for pid in client.supervisor.pids(s.name)])
        job_ids = [client.submit(payload) for payload in payloads]
        jobs = [client.wait(job_id, JOB_TIMEOUT_S) for job_id in job_ids]
        wall_s, cpu_s, others_s = meter.read()
        time.sleep(STATS_DELAY_S)
        after = client.hub.step_stats()
    step_s = {s: after[s]["processing_s"] - before[s]["processing_s"] for s in STEP_NAMES}
    items = {s: after[s]["items_in"] - before[s]["items_in"] for s in STEP_NAMES}
    replicas = {spec.name: spec.replicas for spec in engine.steps}
    results = [_faces(job) for job in jobs]
    return Run(label, wall_s, cpu_s, others_s, step_s, items, results, replicas)


def _faces(job: Any) -> list[dict[str, Any]]:
    if job.status != "done":
        raise RuntimeError(f"job {job.job_id} ended {job.status}: {job.error}")
    return sorted(job.results, key=lambda result: result["index"])


class Meter:
    """Wall time, and CPU time of our processes and of every other, from now to `read`.

    Other sessions share this machine at times; their CPU time is printed with each run, so
    that a slow run can be told from a run slowed by others.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]
        self.started = time.perf_counter()
        self.ours = self._ours_s()
        self.machine = self._machine_s()

    def read(self) -> tuple[float, float, float]:
        """Seconds since the start: wall, our CPU, others' CPU."""
        wall_s = time.perf_counter() - self.started
        ours_s = self._ours_s() - self.ours
        return wall_s, ours_s, max(0.0, self._machine_s() - self.machine - ours_s)

    def _ours_s(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        children = sum(sum(p.cpu_times()[:2]) for p in self.processes)
        return usage.ru_utime + usage.ru_stime + children

    @staticmethod
    def _machine_s() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


# -- figures --------------------------------------------------------------------------------


def ideal_speedup(inline: Run, replicas: Mapping[str, int]) -> float:
    """The speedup the inline step times and the cores allow (see the module's docs)."""
    total = sum(inline.step_s.values())
    slowest = max(s / min(replicas.get(step, 1), CORES) for step, s in inline.step_s.items())
    return total / max(slowest, total / CORES)


def step_table(inline: Run, pipelines: Sequence[Run]) -> str:
    total = sum(inline.step_s.values())
    headers = [
        "step",
        "items",
        "inline ms/item",
        "share",
        *(f"{p.label} ms/item (busy)" for p in pipelines),
    ]
    rows = [
        [
            step,
            str(inline.step_items[step]),
            f"{inline.mean_ms(step):.1f}",
            f"{100 * inline.step_s[step] / total:.0f} %",
            *(f"{p.mean_ms(step):.1f} ({100 * p.busy(step):.0f} %)" for p in pipelines),
        ]
        for step in STEP_NAMES
    ]
    return table(headers, rows)


def run_table(inline: Run, runs: Sequence[Run], images: int) -> str:
    headers = [
        "run",
        "wall s",
        "images/s",
        "cores used",
        "others' cores",
        "speedup",
        "ideal",
        "of ideal",
    ]
    rows = []
    for run in runs:
        speedup = inline.wall_s / run.wall_s
        ideal = ideal_speedup(inline, run.replicas)
        rows.append(
            [
                run.label,
                f"{run.wall_s:.2f}",
                f"{images / run.wall_s:.2f}",
                f"{run.cpu_s / run.wall_s:.2f}",
                f"{run.others_s / run.wall_s:.2f}",
                f"{speedup:.2f}x",
                f"{ideal:.2f}x" if run is not inline else "",
                f"{100 * speedup / ideal:.0f} %" if run is not inline else "",
            ]
        )
    return table(headers, rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.face", description=__doc__)
    parser.add_argument("--images", type=int, default=44)
    parser.add_argument("--tile", type=int, default=200, help="side of a grid tile, in pixels")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run everything this often; report each best run"
    )
    parser.add_argument(
        "--max-wait-s",
        type=float,
        default=600.0,
        help="before each run, wait up to this long for other processes to leave the CPUs idle",
    )
    parser.add_argument("--no-wait", action="store_true", help="do not wait for idle CPUs")
    args = parser.parse_args(argv)
    os.environ[ALLOW_NETS_ENV] = "127.0.0.1/32"
    for name in THREAD_LIMITS:
        os.environ[name] = "1"  # step processes inherit it

    photos = make_photos(args.images, args.tile, args.seed)
    side = GRID * args.tile
    faces = sum(photo.faces for photo in photos)
    print(f"bench.face: {len(photos)} photos of {side}x{side}, {faces} faces (0-9 per photo)")
    print(f"machine: {machine()}\n", flush=True)

    wait_s = 0.0 if args.no_wait else args.max_wait_s
    with serving(photos) as base:
        payloads = [{"image_url": f"{base}/{photo.name}"} for photo in photos]
        runs, slowest = run_all(make_engine(), payloads, args.rounds, wait_s)
    best = {run.label: run for run in sorted(runs, key=lambda run: -run.wall_s)}
    labels = dict.fromkeys(run.label for run in runs if run.label != "inline")
    report(photos, best["inline"], [best[label] for label in labels], slowest)


def run_all(
    engine: BlueEngine, payloads: Sequence[dict[str, Any]], rounds: int, wait_s: float
) -> tuple[list[Run], str]:
    """Every run of every round, inline first; and the slowest step, which gets two replicas."""
    wait_for_idle(wait_s)
    runs = [run_inline(engine, payloads)]
    slowest = max(STEP_NAMES, key=lambda step: runs[0].step_s[step])
    engines = {
        "pipeline": engine,
        f"pipeline, {slowest} x2": engine.with_replicas({slowest: 2}),
    }
    for round_ in range(rounds):
        if round_:
            wait_for_idle(wait_s)
            runs.append(run_inline(engine, payloads))
        for label, variant in engines.items():
            wait_for_idle(wait_s)
            runs.append(run_pipeline(variant, payloads, label))
    return runs, slowest


def wait_for_idle(max_wait_s: float) -> None:
    """Wait until other processes leave the cores idle, for at most `max_wait_s`."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        if psutil.cpu_percent(interval=IDLE_SAMPLE_S) < IDLE_BUSY_PERCENT:
            return
    if max_wait_s > 0:
        print(f"(the machine stayed busy for {max_wait_s:g} s; running anyway)", flush=True)


def report(photos: Sequence[Photo], inline: Run, pipelines: Sequence[Run], slowest: str) -> None:
    found = [len(faces) for faces in inline.results]
    missed = sum(f != photo.faces for f, photo in zip(found, photos, strict=True))
    named = sum(r["identity"] == "eileen_collins" for faces in inline.results for r in faces)
    same = all(run.results == inline.results for run in pipelines)
    print(f"faces found as expected in {len(photos) - missed} of {len(photos)} photos; ", end="")
    print(f"{named} of {sum(found)} faces named eileen_collins; ", end="")
    print(f"pipeline results {'identical to' if same else 'DIFFERENT from'} inline\n")

    print("mean time per item in each step; in a pipeline that includes waiting for a core,")
    print("and busy is the share of the run its replicas spent in the step function:")
    print(step_table(inline, pipelines), end="\n\n")
    print(run_table(inline, [inline, *pipelines], len(photos)), end="\n\n")

    print("targets:")
    for run in pipelines:
        speedup = inline.wall_s / run.wall_s
        of_ideal = speedup / ideal_speedup(inline, run.replicas)
        print(check(f"{run.label} vs inline", speedup, TARGET_SPEEDUP, at_least=True))
        print(
            check(
                f"{run.label} share of ideal",
                100 * of_ideal,
                100 * TARGET_OF_IDEAL,
                at_least=True,
                unit=" %",
                digits=0,
            )
        )
    print(f"\nslowest step inline: {slowest}; machine afterwards: {machine()}")


if __name__ == "__main__":
    main()
