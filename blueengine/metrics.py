"""Prometheus metrics of an engine and its gateway, on a registry of their own.

Every series carries the label ``engine``; per-step series also carry ``step``. No label ever
holds a job id or another value without a small fixed set of values.

Built in, read from the hub at scrape time (replicas report with their heartbeats, about once a
second; counters of replicas that died or were replaced are kept, so no counter goes down):

=========================================== ========= =============================================
``blueengine_step_items_in_total``          counter   items the step took in
``blueengine_step_items_out_total``         counter   items it forwarded to the next step
``blueengine_step_errors_total``            counter   items whose step function raised
``blueengine_step_items_dropped_total``     counter   items dropped because their job had ended
``blueengine_step_processing_seconds``      histogram time in the step function, per item
``blueengine_step_waiting_seconds_total``   counter   time its replicas waited for work
``blueengine_step_blocked_seconds_total``   counter   time they waited for the next step to take
``blueengine_step_items_in_flight``         gauge     items being processed now
``blueengine_step_credits``                 gauge     credits the next step has granted it
``blueengine_step_replicas``                gauge     live replicas
``blueengine_step_replicas_desired``        gauge     replicas the engine asks for
``blueengine_jobs_queued``                  gauge     accepted jobs waiting for the first step
``blueengine_jobs_in_flight``               gauge     jobs inside the engine
``blueengine_jobs_limit``                   gauge     unfinished jobs the engine takes before 429
=========================================== ========= =============================================

The gateway's own: ``blueengine_jobs_accepted_total``, ``blueengine_jobs_rejected_total{reason}``
(``full``, ``stopped``, ``invalid``), ``blueengine_jobs_total{outcome}`` (``done``, ``failed``,
``cancelled``), ``blueengine_job_duration_seconds{outcome}`` (from acceptance to the end),
``blueengine_job_retries_total``, ``blueengine_http_requests_total{method,route,code}`` and
``blueengine_http_request_duration_seconds{method,route}`` (``route`` is the route's template,
such as ``/jobs/{job_id}``), and the ``process_*`` series of the gateway process.

**Statistic rule.** A step that writes ``{'Statistic': {key: value, ...}}`` gets one series per
key, labelled with engine and step. The key is turned into words (``facesDetected`` and
``faces-detected`` both give ``faces_detected``), then:

1. a bool or a finite number is kept; anything else (text, lists, None, NaN) is not a metric
   and is counted in ``blueengine_statistic_values_ignored_total``;
2. a key ending in a time unit (``_seconds``, ``_s``, ``_ms``, ``_us``, ``_ns`` and their long
   forms) is converted to seconds and named ``..._seconds``;
3. a key ending in ``_total`` is a **counter**: each value (0 or more) is added to
   ``blueengine_statistic_<key>`` (so ``cpu_ms_total: 12`` adds 0.012 to
   ``blueengine_statistic_cpu_seconds_total``);
4. otherwise a time (rule 2) is a **histogram** of the values, with the buckets of
   ``blueengine_step_processing_seconds``: ``decode_ms: 12`` observes 0.012 in
   ``blueengine_statistic_decode_seconds``;
5. and any other number is a **counter** too: ``faces_detected: 3`` adds 3 to
   ``blueengine_statistic_faces_detected_total``. A bool counts as 1 or 0.

Negative values cannot go into a counter or a time and are ignored (and counted). A name keeps
the type it was first seen with. There are no gauges: a value that several replicas each set has
no single meaning, and the built-in gauges already say how each step is doing. At most
`MAX_STATISTIC_SERIES` series are made; values of further keys are ignored (and counted), so a
step writing job ids as keys cannot flood Prometheus.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from blueengine.hub import Hub
from blueengine.jobs import Job
from blueengine.stats import BUCKETS_S

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MAX_STATISTIC_SERIES = 500
JOB_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
HTTP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_TIME_UNITS_S = {
    "seconds": 1.0,
    "second": 1.0,
    "secs": 1.0,
    "sec": 1.0,
    "s": 1.0,
    "milliseconds": 1e-3,
    "millis": 1e-3,
    "ms": 1e-3,
    "microseconds": 1e-6,
    "us": 1e-6,
    "nanoseconds": 1e-9,
    "ns": 1e-9,
}
_HELP = "What steps wrote to Statistic under this key (see blueengine.metrics)."
_LABELS = ["engine", "step"]
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NOT_A_WORD = re.compile(r"[^a-z0-9]+")

# (name, help, field of the step's stats) for the built-in per-step counters.
_STEP_COUNTERS = (
    ("blueengine_step_items_in", "Items the step took in.", "items_in"),
    ("blueengine_step_items_out", "Items the step forwarded to the next step.", "items_out"),
    ("blueengine_step_errors", "Items whose step function raised.", "errors"),
    ("blueengine_step_items_dropped", "Items dropped because their job had ended.", "dropped"),
    ("blueengine_step_waiting_seconds", "Time the step's replicas waited for work.", "waiting_s"),
    (
        "blueengine_step_blocked_seconds",
        "Time the step's replicas waited for the next step to take an item.",
        "blocked_s",
    ),
)
_STEP_GAUGES = (
    ("blueengine_step_items_in_flight", "Items the step is processing now.", "in_flight"),
    ("blueengine_step_credits", "Credits the next step has granted this step.", "credits"),
)


class GatewayMetrics:
    """Every metric of one engine and its gateway, on its own `CollectorRegistry`.

    Example::

        metrics = GatewayMetrics(hub)
        hub.listeners.append(metrics.on_job_event)   # under hub.lock
        text = metrics.exposition()                  # what GET /metrics answers
    """

    def __init__(self, hub: Hub, registry: CollectorRegistry | None = None) -> None:
        self.hub = hub
        self.engine = hub.engine.name
        self.registry = registry if registry is not None else CollectorRegistry()
        self.statistics = StatisticSeries(self.engine)
        self.registry.register(EngineCollector(hub, self.statistics))
        ProcessCollector(registry=self.registry)
        self._outcomes: dict[str, tuple[Counter, Histogram]] = {}
        self._http_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._jobs_metrics()
        self._http_metrics()

    def _jobs_metrics(self) -> None:
        engine = ["engine"]
        self.accepted = Counter(
            "blueengine_jobs_accepted", "Jobs accepted.", engine, registry=self.registry
        )
        self.rejected = Counter(
            "blueengine_jobs_rejected",
            "Jobs refused: engine full (429), stopping (503) or payload invalid (422).",
            [*engine, "reason"],
            registry=self.registry,
        )
        self.finished = Counter(
            "blueengine_jobs",
            "Jobs that ended, by outcome.",
            [*engine, "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "blueengine_job_duration_seconds",
            "Time from a job's acceptance to its end.",
            [*engine, "outcome"],
            buckets=JOB_BUCKETS_S,
            registry=self.registry,
        )
        self.retries = Counter(
            "blueengine_job_retries", "Job attempts started again.", engine, registry=self.registry
        )
        self._accepted = self.accepted.labels(self.engine)

    def _http_metrics(self) -> None:
        self.http_requests = Counter(
            "blueengine_http_requests",
            "HTTP requests answered by the gateway.",
            ["engine", "method", "route", "code"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "blueengine_http_request_duration_seconds",
            "Time to answer an HTTP request, to the end of its response.",
            ["engine", "method", "route"],
            buckets=HTTP_BUCKETS_S,
            registry=self.registry,
        )

    def on_job_event(self, job: Job, event: str, data: Any) -> None:
        """A hub listener: runs on the hub thread, so it only counts."""
        if event == "final":
            finished, duration = self._outcome_series(job.status.value)
            finished.inc()
            if job.finished_at is not None:
                duration.observe(max(0.0, job.finished_at - job.created_at))
        elif event == "statistic":
            step, message = data
            self.statistics.add(step, message)
        elif event == "retry":
            self.retries.labels(self.engine).inc()

    def count_accepted(self) -> None:
        self._accepted.inc()

    def count_rejected(self, reason: str) -> None:
        self.rejected.labels(self.engine, reason).inc()

    def observe_http(self, method: str, route: str, code: int, elapsed_s: float) -> None:
        key = (method, route, code)
        series = self._http_series.get(key)
        if series is None:
            series = self._http_series[key] = (
                self.http_requests.labels(self.engine, method, route, str(code)),
                self.http_duration.labels(self.engine, method, route),
            )
        series[0].inc()
        series[1].observe(elapsed_s)

    def _outcome_series(self, outcome: str) -> tuple[Counter, Histogram]:
        # Labelled children are looked up once: `labels()` costs more than the count itself.
        series = self._outcomes.get(outcome)
        if series is None:
            series = self._outcomes[outcome] = (
                self.finished.labels(self.engine, outcome),
                self.duration.labels(self.engine, outcome),
            )
        return series

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Reads the hub's per-step stats and job counts at scrape time."""

    def __init__(self, hub: Hub, statistics: StatisticSeries) -> None:
        self.hub = hub
        self.statistics = statistics

    def describe(self) -> Iterable[Metric]:
        return []  # the step series are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        engine = self.hub.engine.name
        stats = self.hub.step_stats()
        yield from _step_counters(engine, stats)
        yield _step_histogram(engine, stats)
        yield from _step_gauges(engine, stats)
        yield from self._replicas(engine)
        yield from self._jobs(engine)
        yield from self.statistics.collect()

    def _replicas(self, engine: str) -> Iterator[Metric]:
        live = self.hub.live_replicas()
        desired = {spec.name: spec.replicas for spec in self.hub.engine.steps}
        for name, values, text in (
            ("blueengine_step_replicas", live, "Live replicas of the step."),
            ("blueengine_step_replicas_desired", desired, "Replicas the engine asks for."),
        ):
            family = GaugeMetricFamily(name, text, labels=["engine", "step"])
            for step, count in values.items():
                family.add_metric([engine, step], count)
            yield family

    def _jobs(self, engine: str) -> Iterator[Metric]:
        with self.hub.lock:
            unfinished, in_flight = self.hub.unfinished, self.hub.in_flight
        for name, value, text in (
            ("blueengine_jobs_queued", unfinished - in_flight, "Jobs waiting for the first step."),
            ("blueengine_jobs_in_flight", in_flight, "Jobs inside the engine."),
            ("blueengine_jobs_limit", self.hub.max_jobs, "Unfinished jobs taken before a 429."),
        ):
            family = GaugeMetricFamily(name, text, labels=["engine"])
            family.add_metric([engine], value)
            yield family


def _step_counters(engine: str, stats: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    for name, text, key in _STEP_COUNTERS:
        family = CounterMetricFamily(name, text, labels=["engine", "step"])
        for step, values in stats.items():
            family.add_metric([engine, step], values[key])
        yield family


def _step_gauges(engine: str, stats: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    for name, text, key in _STEP_GAUGES:
        family = GaugeMetricFamily(name, text, labels=["engine", "step"])
        for step, values in stats.items():
            family.add_metric([engine, step], values[key])
        yield family


def _step_histogram(engine: str, stats: Mapping[str, Mapping[str, Any]]) -> Metric:
    family = HistogramMetricFamily(
        "blueengine_step_processing_seconds",
        "Time in the step function per item.",
        labels=["engine", "step"],
    )
    for step, values in stats.items():
        family.add_metric(
            [engine, step], _cumulative(values["buckets"]), sum_value=values["processing_s"]
        )
    return family


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    # Replicas count items per bucket; Prometheus wants each bucket to include those below it.
    bounds = [*(_float_text(b) for b in BUCKETS_S), "+Inf"]
    running, buckets = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        running += count
        buckets.append((bound, float(running)))
    return buckets


def _float_text(value: float) -> str:
    return repr(float(value))


# -- Statistic --------------------------------------------------------------------------------


@dataclass
class _Series:
    kind: str  # "counter" or "histogram"
    total: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))


class StatisticSeries:
    """Series made from what steps write to `Statistic`, by the rule in this module's doc."""

    def __init__(self, engine: str, max_series: int = MAX_STATISTIC_SERIES) -> None:
        self.engine = engine
        self.max_series = max_series
        self._lock = threading.Lock()
        self._kinds: dict[str, str] = {}  # name -> the type it was first seen with
        self._series: dict[tuple[str, str], _Series] = {}  # (name, step) -> its values
        self._ignored: dict[str, int] = {}

    def add(self, step: str, message: Any) -> None:
        """Count one `Statistic` message of a step."""
        items = message.items() if isinstance(message, Mapping) else [("", message)]
        with self._lock:
            for key, value in items:
                if not self._add_value(step, str(key), value):
                    self._ignored[step] = self._ignored.get(step, 0) + 1

    def _add_value(self, step: str, key: str, value: Any) -> bool:
        parsed = _parse(key, value)
        if parsed is None:
            return False
        name, kind, amount = parsed
        if self._kinds.setdefault(name, kind) != kind:
            return False
        series = self._series.get((name, step))
        if series is None:
            if len(self._series) >= self.max_series:
                return False
            series = self._series[(name, step)] = _Series(kind)
        series.total += amount
        if kind == "histogram":
            series.buckets[bisect.bisect_left(BUCKETS_S, amount)] += 1
        return True

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = [
                (name, step, s.kind, s.total, list(s.buckets))
                for (name, step), s in sorted(self._series.items())
            ]
            ignored = dict(self._ignored)
        counters: dict[str, CounterMetricFamily] = {}
        histograms: dict[str, HistogramMetricFamily] = {}
        for name, step, kind, total, buckets in snapshot:
            labels = [self.engine, step]
            if kind == "counter":
                counters.setdefault(name, CounterMetricFamily(name, _HELP, labels=_LABELS))
                counters[name].add_metric(labels, total)
            else:
                histograms.setdefault(name, HistogramMetricFamily(name, _HELP, labels=_LABELS))
                histograms[name].add_metric(labels, _cumulative(buckets), sum_value=total)
        yield from counters.values()
        yield from histograms.values()
        yield _ignored_family(self.engine, ignored)


def _ignored_family(engine: str, ignored: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(
        "blueengine_statistic_values_ignored",
        "Statistic values that could not become a series (see blueengine.metrics).",
        labels=["engine", "step"],
    )
    for step, count in sorted(ignored.items()):
        family.add_metric([engine, step], count)
    return family


def _parse(key: str, value: Any) -> tuple[str, str, float] | None:
    """(series name, type, amount) of one Statistic value, or None if it makes no series."""
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    words = _words(key)
    counted = bool(words) and words[-1] == "total"
    if counted:
        words = words[:-1]
    scale = _TIME_UNITS_S.get(words[-1]) if words else None
    if scale is not None:
        words = [*words[:-1], "seconds"]
    if len(words) < 1 + (scale is not None):
        return None  # nothing but a unit: no name to give the series
    kind = "histogram" if scale is not None and not counted else "counter"
    return "blueengine_statistic_" + "_".join(words), kind, float(value) * (scale or 1.0)


def _words(key: str) -> list[str]:
    return [word for word in _NOT_A_WORD.split(_CAMEL_HUMP.sub("_", key).lower()) if word]
