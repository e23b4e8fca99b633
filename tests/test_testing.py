"""The harness that unit-tests one step in process, and the inline runner."""

from __future__ import annotations

import numpy as np
import pytest

from blueengine import ChannelError, CodecError, JobStatus
from blueengine.inline import InlineEngine
from blueengine.testing import run_step
from tests import engines


def test_run_step_returns_what_the_step_wrote_per_channel():
    engine = engines.fan_out_engine()
    written = run_step(engine.step("work"), [{"forward": {"index": 4}}])

    assert written["forward"] == [{"index": 4}]
    assert written["Status"] == [{"type": "message", "message": "item 4"}]
    assert written["Result"] == []


def test_run_step_runs_setup_once_and_passes_config():
    written = run_step(engines.setup_engine().step("scale"), [{"Control": {"x": 2}}] * 3)

    assert [r["value"] for r in written["Result"]] == [6, 6, 6]
    assert len({r["loaded_at"] for r in written["Result"]}) == 1


def test_run_step_checks_channels_and_encoding_as_the_engine_does():
    with pytest.raises(ChannelError, match="did not declare"):
        run_step(engines.output_engine().step("check"), [{"Control": {"kind": "undeclared"}}])
    with pytest.raises(CodecError, match="Opaque"):
        run_step(engines.send_opaque, [{"Control": {}}])
    with pytest.raises(ChannelError, match="last step"):
        run_step(engines.hop, [{"forward": 1}], last=True)


def test_run_step_round_trips_forwards_through_the_codec():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]
    written = run_step(engines.hop, [{"forward": (array, b"raw")}])

    (forwarded,) = written["forward"]
    assert isinstance(forwarded, tuple)
    np.testing.assert_array_equal(forwarded[0], array)


def test_inline_runs_jobs_in_order_with_fan_out_finish_and_failures():
    inline = InlineEngine(engines.fan_out_engine())
    fan, finished = inline.run([{"items": 5}, {"items": 5, "finish_at": 2}])

    assert fan.status is JobStatus.DONE
    assert [r["index"] for r in fan.results] == [0, 1, 2, 3, 4]
    assert finished.status is JobStatus.DONE
    assert [r["index"] for r in finished.results] == [0, 1]

    failed = InlineEngine(engines.three_steps()).run_one({"n": 2, "fail_on": 2})
    assert failed.status is JobStatus.FAILED
    assert failed.error["step"] == "square"
