"""The face-recognition engine: ``services.face:engine``.

Six steps, each in its own process: download an image, detect its faces, find each face's
landmarks, align it, recognize it against a gallery, write one result per face::

    blueengine run services.face:engine --input '{"image_url": "https://example.org/crew.jpg"}'

A payload names one image, by ``image_url`` (http, https or data:) or inline as ``image_b64``;
``"embedding": true`` adds each face's embedding to its result. Steps and their options are
documented in their modules under `services.face.steps`; `make_engine` builds the engine with
other options or replica counts::

    engine = make_engine({'recognize': {'gallery': '/srv/faces'}}, replicas={'recognize': 2})

Steps are named by import strings, so a step's process imports only its own module: importing
this package loads neither dlib nor the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from blueengine import BlueEngine, ConfigError

__all__ = ["STEP_NAMES", "FacePayload", "engine", "make_engine"]

STEP_NAMES = ("download", "detect", "landmarks", "align", "recognize", "write")

_STEPS = "services.face.steps"


_TINY_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGNsaGhgwAaYsI"
    "oOWgkAMBcBkGHHl6YAAAAASUVORK5CYII="
)


class FacePayload(BaseModel):
    """A job for the face engine: one image, by URL or inline, and what to report."""

    # Strict, as the download step is: "yes" is not true, 1 is not a URL. The example (what
    # `blueengine serve` prints to paste) is a tiny gray PNG: it works offline, with no faces.
    model_config = ConfigDict(
        strict=True,
        json_schema_extra={"examples": [{"image_url": _TINY_PNG}]},
    )

    image_url: str | None = None
    image_b64: str | None = None
    embedding: bool = False

    @model_validator(mode="after")
    def _one_image(self) -> FacePayload:
        if (self.image_url is None) == (self.image_b64 is None):
            raise ValueError("give exactly one of image_url and image_b64")
        return self


def make_engine(
    config: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    replicas: Mapping[str, int] | None = None,
    name: str = "face-recognition",
) -> BlueEngine:
    """The face engine with some steps' options (``{step: {option: value}}``) and replicas."""
    config = config or {}
    replicas = replicas or {}
    for step in (*config, *replicas):
        if step not in STEP_NAMES:
            raise ConfigError(f"the face engine has no step {step!r} (steps: {STEP_NAMES})")

    face = BlueEngine(name, payload_model=FacePayload)

    def add(step: str, func: str, outputs: list[str], **options: Any) -> None:
        module = f"{_STEPS}.{step}"
        face.add_step(
            step,
            f"{module}:{func}",
            input_channels=["Control"] if step == "download" else [],
            output_channels=outputs,
            replicas=replicas.get(step, 1),
            config=config.get(step, {}),
            **options,
        )

    add("download", "download", ["Status"], setup=f"{_STEPS}.download:setup", concurrency=4)
    add("detect", "detect", ["Statistic"], setup=f"{_STEPS}.detect:setup")
    add("landmarks", "landmarks", [], setup=f"{_STEPS}.landmarks:setup")
    add("align", "align_face", [])  # no model to load, so no setup hook
    add("recognize", "recognize", [], setup=f"{_STEPS}.recognize:setup")
    add("write", "write", ["Result"], setup=f"{_STEPS}.write:setup")
    return face


engine = make_engine()
