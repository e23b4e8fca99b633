"""What the transport benchmark pushes through every chain, the same for each system.

An item is the tuple ``(stamp_ns, last, payload)``: the source stamps it with
`time.perf_counter_ns()` (CLOCK_MONOTONIC on Linux, one clock for every process of the machine)
just before handing it on, and the sink reports ``perf_counter_ns() - stamp_ns`` for the last
item of each job. That is the in-chain latency; the driver also times each job end to end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from blueengine import codec

Item = tuple[int, bool, Any]
"""(stamp_ns, last item of its job, payload)."""


@dataclass(frozen=True)
class Kind:
    """One payload size and how to run it.

    `items_per_job` is how many items one job fans out into; `depth` bounds the baselines'
    queues (ZeroMQ high-water marks, `multiprocessing.Queue` maxsize) so that no chain buffers
    more than a few large items per hop; `probe_items` sizes the first, unmeasured run.
    """

    name: str
    items_per_job: int
    depth: int
    probe_items: int

    @property
    def large(self) -> bool:
        return self.name != "small"


SMALL = Kind("small", items_per_job=1000, depth=1000, probe_items=1000)
MIB_1 = Kind("1MiB", items_per_job=20, depth=4, probe_items=100)
MIB_16 = Kind("16MiB", items_per_job=4, depth=2, probe_items=16)
KINDS: dict[str, Kind] = {kind.name: kind for kind in (SMALL, MIB_1, MIB_16)}

_ARRAY_BYTES = {"1MiB": 1 << 20, "16MiB": 16 << 20}
_cache: dict[str, Any] = {}


def payload(kind: str) -> Any:
    """The payload of `kind`, built once per process: every item carries the same object."""
    if kind not in _cache:
        _cache[kind] = _build(kind)
    return _cache[kind]


def _build(kind: str) -> Any:
    if kind == "small":
        return {
            "id": 1234567,
            "sensor": "line-3/camera-07",
            "score": 0.8125,
            "boxes": [[12, 40, 96, 128], [200, 18, 64, 64]],
            "labels": ["face", "face"],
            "ok": True,
        }
    # np.full writes every page, so the benchmark moves real memory, not shared zero pages.
    return np.full(_ARRAY_BYTES[kind], 7, dtype=np.uint8)


def payload_bytes(kind: str) -> int:
    """The size of one payload: its encoded size when small, its data when an array."""
    value = payload(kind)
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return sum(len(memoryview(frame)) for frame in codec.encode(value))


def new_item(kind: str, last: bool) -> Item:
    """An item stamped now."""
    return (time.perf_counter_ns(), last, payload(kind))


def latency_ns(item: Item) -> int:
    """Nanoseconds since the item was stamped."""
    return time.perf_counter_ns() - item[0]
