"""The vocabulary every module speaks: channels, job states, the step function's shape."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from blueengine.context import Context

CONTROL = "Control"
FORWARD = "forward"
STATUS = "Status"
RESULT = "Result"
STATISTIC = "Statistic"

INPUT_CHANNELS = frozenset({CONTROL})
OUTPUT_CHANNELS = frozenset({STATUS, RESULT, STATISTIC})

Output: TypeAlias = Mapping[str, Any]
"""What a step function returns or yields: channel name to value."""

StepFunc: TypeAlias = Callable[["Context", dict[str, Any]], "Output | Iterator[Output] | None"]
SetupFunc: TypeAlias = Callable[["Context"], Any]


class JobStatus(enum.StrEnum):
    """Where a job is in its life; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)
