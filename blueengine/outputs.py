"""What a step function may write, checked the same way in a replica, inline and in tests."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from blueengine.engine import StepSpec
from blueengine.errors import ChannelError
from blueengine.types import FORWARD


def iterate(result: object) -> Iterator[Any]:
    """The outputs of one call: a returned dict, a generator's dicts, or nothing."""
    if result is None:
        return iter(())
    if isinstance(result, Mapping):
        return iter((result,))
    if isinstance(result, Iterator):
        return result
    if isinstance(result, list | tuple):
        return iter(result)
    raise ChannelError(
        f"a step returned {type(result).__name__}; return a dict, a list of dicts, or yield dicts"
    )


def check(spec: StepSpec, output: object, last: bool) -> Mapping[str, Any]:
    """Refuse an output that is not a dict of declared channels, naming the step."""
    if not isinstance(output, Mapping):
        raise ChannelError(
            f"step {spec.name!r} produced {type(output).__name__}; a step returns or "
            "yields dicts of channel name to value"
        )
    for channel in output:
        if channel == FORWARD:
            if last:
                raise ChannelError(
                    f"step {spec.name!r} is the last step, so it cannot write 'forward': "
                    "nothing comes after it"
                )
        elif channel not in spec.output_channels:
            declared = ", ".join(spec.output_channels) or "none"
            raise ChannelError(
                f"step {spec.name!r} wrote to channel {channel!r}, which it did not declare in "
                f"output_channels (declared: {declared})"
            )
    return output


def to_json(step: str, channel: str, value: Any) -> str:
    """The JSON text of a value leaving the engine; refuses what JSON cannot carry."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ChannelError(
            f"step {step!r} wrote a value to {channel!r} that is not JSON-serialisable: {exc}"
        ) from None
