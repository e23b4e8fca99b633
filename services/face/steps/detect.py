"""Step 2, detect: find the faces of an image; forward one item per face.

dlib's HOG detector (`services.face.vision.Detector`) runs on the whole image, or on a copy
shrunk to ``max_side`` pixels when the image is larger; boxes are always in the coordinates of
the image as downloaded. Each face goes on as its own item carrying a crop of the image around
it instead of the image (see `services.face.steps.items` for the item and why a crop).

Every image writes ``Statistic`` ``{"faces_detected": n}``. An image without faces forwards
nothing, so its job is done with no results as soon as this step has finished it.

Options and their defaults:

==============  =====  ============================================================
upsample        1      times the image is doubled before detecting; the smallest face
                       found is about 80 pixels at 0, 40 at 1, 20 at 2 (each costs 4x)
max_side        1600   larger images are detected on a copy shrunk to this size
min_score       0.5    detections scoring lower are dropped (dlib's own threshold is 0)
crop_margin     0.6    margin around each face's crop, in box widths
crop_max_side   800    crops larger than this are shrunk to it
==============  =====  ============================================================
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from blueengine import Context
from services.face.steps import settings
from services.face.steps.items import (
    DEFAULT_CROP_MAX_SIDE,
    DEFAULT_MARGIN,
    Meta,
    box_in_crop,
    cut_face,
)
from services.face.vision import Detector

logger = logging.getLogger(__name__)

DEFAULTS: Mapping[str, Any] = {
    "upsample": 1,
    "max_side": 1600,
    "min_score": 0.5,
    "crop_margin": DEFAULT_MARGIN,
    "crop_max_side": DEFAULT_CROP_MAX_SIDE,
}


@dataclass(frozen=True)
class Detection:
    """The step's resources: the detector and how faces are cut out."""

    detector: Detector
    crop_margin: float
    crop_max_side: int


def setup(context: Context) -> Detection:
    """Build the detector once per process."""
    options = settings(context.step, context.config, DEFAULTS)
    if options["crop_margin"] < 0 or options["crop_max_side"] < 150:
        raise ValueError(
            f"step {context.step!r}: crop_margin must be 0 or more and crop_max_side at least "
            f"150, not {options['crop_margin']} and {options['crop_max_side']}"
        )
    started = time.perf_counter()
    detector = Detector(options["upsample"], options["max_side"], options["min_score"])
    logger.info("Built the face detector in %.2f s.", time.perf_counter() - started)
    return Detection(detector, options["crop_margin"], options["crop_max_side"])


def detect(context: Context, input: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Forward one item per face found, best score first, then the count as a Statistic."""
    resources: Detection = context.resources
    image: np.ndarray
    meta: Meta
    image, meta = input["forward"]
    boxes = resources.detector.detect(image)
    for index, found in enumerate(boxes):
        box = dataclasses.astuple(found)
        crop, origin, scale = cut_face(image, box, resources.crop_margin, resources.crop_max_side)
        item = {
            "meta": meta,
            "index": index,
            "faces": len(boxes),
            "box": box,
            "crop": crop,
            "origin": origin,
            "scale": scale,
            "crop_box": box_in_crop(box, origin, scale),
        }
        yield {"forward": item}
    yield {"Statistic": {"faces_detected": len(boxes)}}
