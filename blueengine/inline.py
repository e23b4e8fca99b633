"""Every step of an engine in the calling process, one after another.

This is the sequential baseline the pipeline is measured against, and the way to stop inside a
step with a debugger. Items pass between steps as Python objects, without encoding.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from blueengine import outputs
from blueengine.context import Context
from blueengine.engine import BlueEngine, StepSpec
from blueengine.jobs import Job, new_job_id
from blueengine.types import CONTROL, FORWARD, RESULT, STATUS, JobStatus, StepFunc

logger = logging.getLogger(__name__)


class _Finished(Exception):
    """A step sent Status 'finish': the job ends now."""


class InlineEngine:
    """Runs jobs through an engine's steps sequentially; set-up hooks run once."""

    def __init__(self, engine: BlueEngine) -> None:
        engine.validate()
        self.engine = engine
        self.steps: list[tuple[StepSpec, StepFunc, Context]] = []
        for index, spec in enumerate(engine.steps):
            context = Context(
                step=spec.name,
                replica=0,
                config=spec.config,
                logger=logging.getLogger(f"blueengine.step.{spec.name}"),
            )
            setup = spec.load_setup()
            if setup is not None:
                context.resources = setup(context)
            self.steps.append((spec, spec.load_func(), context))
            logger.debug("Step %d, %s, is set up.", index, spec.name)

    def run(self, payloads: Iterable[Any]) -> Iterator[Job]:
        """Run each payload as a job, in order, and yield it finished."""
        for payload in payloads:
            yield self.run_one(payload)

    def run_one(self, payload: Any) -> Job:
        job = Job(new_job_id(), payload, status=JobStatus.RUNNING, attempts=1)
        try:
            self._run_items(job)
        except _Finished:
            pass
        except Exception as exc:  # user code: the job fails, the next one runs.
            step = getattr(exc, "blueengine_step", None)
            job.status = JobStatus.FAILED
            code = getattr(exc, "code", None)
            job.error = {
                "step": step,
                "type": type(exc).__name__,
                "message": str(exc) or repr(exc),
                "code": code if isinstance(code, str) else None,
            }
            logger.warning("Step %s failed job %s: %s", step, job.job_id, exc)
        if job.status is JobStatus.RUNNING:
            job.status = JobStatus.DONE
        return job

    def _run_items(self, job: Job) -> None:
        # Depth first, so one item's children finish before its siblings start: a debugger
        # follows one face (say) all the way through.
        pending: deque[tuple[int, dict[str, Any]]] = deque([(0, {CONTROL: job.payload})])
        while pending:
            index, data = pending.pop()
            children = self._run_step(job, index, data)
            pending.extend((index + 1, {FORWARD: child}) for child in reversed(children))

    def _run_step(self, job: Job, index: int, data: dict[str, Any]) -> list[Any]:
        spec, func, context = self.steps[index]
        context.job_id, context.attempt = job.job_id, 1
        last = index == len(self.steps) - 1
        children: list[Any] = []
        try:
            for output in outputs.iterate(func(context, data)):
                for channel, value in outputs.check(spec, output, last).items():
                    self._deliver(job, spec, channel, value, children)
        except _Finished:
            raise
        except Exception as exc:
            exc.blueengine_step = spec.name  # type: ignore[attr-defined]
            raise
        return children

    def _deliver(
        self, job: Job, spec: StepSpec, channel: str, value: Any, children: list[Any]
    ) -> None:
        if channel == FORWARD:
            children.append(value)
            return
        outputs.to_json(spec.name, channel, value)
        if channel == RESULT:
            job.results.append(value)
        elif channel == STATUS:
            job.statuses.append(value)
            if isinstance(value, dict) and value.get("type") == "finish":
                raise _Finished
