"""Unit-test one step function in process, the way the engine would call it.

Example::

    from blueengine.testing import run_step

    def test_detect_finds_one_face():
        out = run_step(engine.step('detect'), [{'forward': (image, meta)}])
        assert len(out['forward']) == 1
        assert out['Statistic'] == [{'faces_detected': 1}]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from blueengine import codec, outputs
from blueengine.context import Context
from blueengine.engine import StepSpec
from blueengine.types import FORWARD, OUTPUT_CHANNELS, StepFunc


def run_step(
    step: StepSpec | StepFunc,
    inputs: Iterable[Mapping[str, Any]],
    *,
    config: Mapping[str, Any] | None = None,
    resources: Any = None,
    last: bool = False,
    encode: bool = True,
    allow_pickle: bool = False,
) -> dict[str, list[Any]]:
    """Call the step on each input and return what it wrote, per channel, in order.

    A `StepSpec` (from `engine.step(name)`) brings its config, runs its setup hook once and checks
    channels as the engine does; a bare function may write any channel. With `encode`, forwarded
    values make the round trip through the wire codec, so a value the engine could not send fails
    here too. `last` makes 'forward' an error, as in an engine's last step.
    """
    spec = step if isinstance(step, StepSpec) else _open_spec(step)
    context = Context(
        step=spec.name,
        replica=0,
        config=dict(spec.config) if config is None else config,
        logger=logging.getLogger(f"blueengine.step.{spec.name}"),
        resources=resources,
    )
    setup = spec.load_setup()
    if setup is not None and resources is None:
        context.resources = setup(context)
    func = spec.load_func()
    written: dict[str, list[Any]] = {FORWARD: [], **{c: [] for c in OUTPUT_CHANNELS}}
    for number, data in enumerate(inputs, start=1):
        context.job_id, context.attempt = f"test-{number}", 1
        for output in outputs.iterate(func(context, dict(data))):
            for channel, value in outputs.check(spec, output, last).items():
                written[channel].append(_carry(spec, channel, value, encode, allow_pickle))
    return written


def _carry(spec: StepSpec, channel: str, value: Any, encode: bool, allow_pickle: bool) -> Any:
    if channel != FORWARD:
        outputs.to_json(spec.name, channel, value)
        return value
    if not encode:
        return value
    return codec.decode(codec.encode(value, allow_pickle=allow_pickle), allow_pickle=allow_pickle)


def _open_spec(func: StepFunc) -> StepSpec:
    name = getattr(func, "__name__", "step")
    return StepSpec(name, func, (), tuple(sorted(OUTPUT_CHANNELS)))
