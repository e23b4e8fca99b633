"""The built-in numbers every replica keeps about itself, sent to the hub with each heartbeat."""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any

# Upper bounds of the processing-time histogram, in seconds; the last bucket is +Inf.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ReplicaStats:
    """Counters only grow; gauges (`in_flight`, `credits`) say how things are now."""

    items_in: int = 0
    items_out: int = 0
    errors: int = 0
    dropped: int = 0
    processing_s: float = 0.0  # in the step function, not counting `blocked_s`
    waiting_s: float = 0.0  # idle, waiting for an item
    blocked_s: float = 0.0  # waiting for the next step to take a forwarded item
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    in_flight: int = 0
    credits: int = 0
    recent_item_s: float = 0.0  # moving average of processing time, for sizing windows

    def observe(self, seconds: float) -> None:
        """Count one item's processing time."""
        self.processing_s += seconds
        self.buckets[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        if self.recent_item_s == 0.0:
            self.recent_item_s = seconds
        else:
            self.recent_item_s += (seconds - self.recent_item_s) * 0.1

    def snapshot(self) -> dict[str, Any]:
        snap = asdict(self)
        snap["buckets"] = list(self.buckets)
        del snap["recent_item_s"]
        return snap


def combine(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several replicas' snapshots (gauges summed too)."""
    total = ReplicaStats().snapshot()
    for snap in snapshots:
        for key, value in snap.items():
            if key == "buckets":
                total[key] = [a + b for a, b in zip(total[key], value, strict=True)]
            elif key in total:
                total[key] += value
    return total
