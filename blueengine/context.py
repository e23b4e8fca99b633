"""What a step function sees of the engine while it processes one item."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any


class Context:
    """The job and step an item belongs to, the step's config and resources.

    `resources` is what the step's `setup` hook returned, loaded once per process:
    `context.resources.model.predict(...)`. `cancelled` turns true when the job was cancelled or
    finished elsewhere while this item was running; long loops should check it.
    """

    __slots__ = (
        "_is_cancelled",
        "attempt",
        "config",
        "job_id",
        "logger",
        "replica",
        "resources",
        "step",
    )

    def __init__(
        self,
        *,
        step: str,
        replica: int,
        config: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        resources: Any = None,
        is_cancelled: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.step = step
        self.replica = replica
        self.config = config
        self.logger = logger
        self.resources = resources
        self.job_id: str | None = None
        self.attempt = 0
        self._is_cancelled = is_cancelled

    @property
    def cancelled(self) -> bool:
        """Whether the current job was cancelled or ended while this item ran."""
        if self.job_id is None or self._is_cancelled is None:
            return False
        return self._is_cancelled(self.job_id, self.attempt)

    def for_job(self, job_id: str | None, attempt: int) -> Context:
        """A copy of this context bound to one job (for steps that run items concurrently)."""
        other = Context(
            step=self.step,
            replica=self.replica,
            config=self.config,
            logger=self.logger,
            resources=self.resources,
            is_cancelled=self._is_cancelled,
        )
        other.job_id = job_id
        other.attempt = attempt
        return other
