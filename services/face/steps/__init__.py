"""The face engine's steps, one module each, in pipeline order.

download -> detect -> landmarks -> align -> recognize -> write. A step process imports only its
own module (the engine names functions as ``"module:function"`` strings), so this package and
`services.face.steps.items` import nothing heavier than numpy: the write step needs no dlib.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def settings(step: str, config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A step's config over its defaults; an unknown key is an error naming the step and key.

    Setup hooks call this, so that a misspelt option stops the engine from starting instead of
    being ignored.
    """
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults))
        raise ValueError(f"step {step!r} has no option {unknown[0]!r} (options: {known})")
    return {**defaults, **config}
