"""The chain as a BlueEngine engine: one replica per step, credit-based ZeroMQ hops."""

from __future__ import annotations

import time

from bench.chain import JOB_TIMEOUT_S, Closing
from bench.steps import chain_engine
from blueengine import BlueEngineError, JobStatus
from blueengine.client import LocalEngine


class BlueEngineChain(Closing):
    """A running engine ``source -> hop1 .. hopN -> sink``, driven through its local client."""

    name = "BlueEngine"

    def __init__(self, hops: int) -> None:
        self.engine = chain_engine("bench-transport", hops)
        self.client: LocalEngine = self.engine.run_local(ready_timeout_s=60)
        self.client.start()

    def run_jobs(self, kind: str, jobs: int, items_per_job: int) -> float:
        payload = {"kind": kind, "items": items_per_job}
        start = time.perf_counter()
        job_ids = [self.client.submit(payload) for _ in range(jobs)]
        for job in self.client.as_completed(job_ids, timeout_s=JOB_TIMEOUT_S):
            _check_done(job.status, job.error)
        return time.perf_counter() - start

    def one_item(self, kind: str) -> tuple[int, int]:
        start = time.perf_counter_ns()
        job_id = self.client.submit({"kind": kind, "items": 1})
        job = self.client.wait(job_id, timeout_s=JOB_TIMEOUT_S)
        end_to_end = time.perf_counter_ns() - start
        _check_done(job.status, job.error)
        return int(job.results[0]["latency_ns"]), end_to_end

    def pids(self) -> list[int]:
        return [pid for spec in self.engine.steps for pid in self.client.supervisor.pids(spec.name)]

    def close(self) -> None:
        self.client.stop()


def _check_done(status: JobStatus, error: object) -> None:
    if status is not JobStatus.DONE:
        raise BlueEngineError(f"a benchmark job ended {status}: {error}")
