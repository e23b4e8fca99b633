"""Step runtime features on real processes: setup hooks, concurrency, codec and channel errors."""

from __future__ import annotations

from blueengine import JobStatus
from tests import engines
from tests.conftest import wait_until


def test_setup_runs_once_per_process_and_its_resources_reach_the_step(run_engine):
    client = run_engine(engines.setup_engine())
    jobs = list(client.run([{"x": x} for x in range(20)], timeout_s=30))

    assert sorted(job.results[0]["value"] for job in jobs) == [3 * x for x in range(20)]
    assert len({(j.results[0]["model_pid"], j.results[0]["loaded_at"]) for j in jobs}) == 1


def test_concurrency_runs_io_bound_items_of_one_replica_at_once(run_engine):
    count = 8
    client = run_engine(engines.concurrent_engine(concurrency=count))
    jobs = list(client.run([{"i": i, "sleep_s": 0.3} for i in range(count)], timeout_s=30))
    results = [job.results[0] for job in jobs]

    assert sorted(r["i"] for r in results) == list(range(count))
    # How many items were inside the step function at the moment the last one started.
    last_start = max(r["started"] for r in results)
    overlapping = sum(r["started"] <= last_start < r["ended"] for r in results)
    assert overlapping >= count // 2, f"only {overlapping} items ran at once"


def test_a_value_the_codec_refuses_fails_its_job_naming_step_and_type(run_engine):
    client = run_engine(engines.codec_engine())
    job = client.wait(client.submit({}), timeout_s=30)

    assert job.status is JobStatus.FAILED
    assert job.error["step"] == "make"
    assert "'Opaque'" in job.error["message"]
    assert "allow_pickle" in job.error["message"]


def test_allow_pickle_lets_any_picklable_object_through(run_engine):
    client = run_engine(engines.codec_engine(allow_pickle=True))
    job = client.wait(client.submit({}), timeout_s=30)

    assert job.status is JobStatus.DONE
    assert job.results == [{"type": "Opaque"}]


def test_undeclared_channels_and_non_json_outputs_fail_the_job_with_the_step_named(run_engine):
    client = run_engine(engines.output_engine())
    undeclared = client.wait(client.submit({"kind": "undeclared"}), timeout_s=30)
    not_json = client.wait(client.submit({"kind": "not-json"}), timeout_s=30)
    fine = client.wait(client.submit({"kind": "fine"}), timeout_s=30)

    assert undeclared.status is JobStatus.FAILED
    assert undeclared.error["type"] == "ChannelError"
    assert "step 'check' wrote to channel 'Result'" in undeclared.error["message"]
    assert not_json.status is JobStatus.FAILED
    assert "not JSON-serialisable" in not_json.error["message"]
    assert fine.status is JobStatus.DONE


def test_running_code_sees_its_job_cancelled(run_engine, tmp_path):
    client = run_engine(engines.cancel_engine())
    log = tmp_path / "outcome"
    job_id = client.submit({"log": str(log)})
    wait_until((tmp_path / "outcome.started").exists, what="the step to start")
    assert client.cancel(job_id)

    wait_until(log.exists, what="the step to notice")
    assert log.read_text() == "cancelled"


def test_a_job_that_misses_its_deadline_is_retried_as_a_new_attempt(run_engine, tmp_path):
    client = run_engine(engines.deadline_engine())
    job = client.wait(client.submit({"marker": str(tmp_path / "seen")}), timeout_s=30)

    assert job.status is JobStatus.DONE
    assert job.attempts == 2
    assert job.results == [{"attempt": 2}]
