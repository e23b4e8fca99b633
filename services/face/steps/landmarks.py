"""Step 3, landmarks: find each face's 68 landmarks and the 5 that alignment uses.

dlib's shape predictors run on the face's crop; the 68 points go on in the coordinates of the
whole image (they are part of the result), the 5 points in the crop's (only align reads them).
The step has no options; its setup loads both models (about 100 MB) once per process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from blueengine import Context
from services.face.steps.items import points_in_image
from services.face.vision import Box, Landmarker

logger = logging.getLogger(__name__)


def setup(context: Context) -> Landmarker:
    """Load the 68-point and 5-point models once per process."""
    started = time.perf_counter()
    landmarker = Landmarker()
    logger.info("Loaded the landmark models in %.2f s.", time.perf_counter() - started)
    return landmarker


def landmarks(context: Context, input: dict[str, Any]) -> dict[str, Any]:
    """Add ``landmarks`` (image coordinates) and ``crop_points5`` to the face's item."""
    landmarker: Landmarker = context.resources
    item: dict[str, Any] = input["forward"]
    marks = landmarker.landmarks(item["crop"], Box(*item["crop_box"]))
    item["landmarks"] = points_in_image(marks.points68, item["origin"], item["scale"])
    item["crop_points5"] = marks.points5
    return {"forward": item}
