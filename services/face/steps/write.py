"""Step 6, write: one ``Result`` per face, optionally appended to a JSON Lines file too.

A result is::

    {"index": 0, "faces": 1,
     "box": {"left": 175, "top": 76, "right": 266, "bottom": 167, "score": 1.2},
     "landmarks": [[x, y], ...],            # 68 points, image coordinates
     "identity": "eileen_collins",          # or null
     "distance": 0.31,                      # to the nearest gallery face; null if none
     "image": {"width": 512, "height": 512},
     "embedding": [...]}                    # 128 values, only with {"embedding": true}

Boxes are half-open (``right`` and ``bottom`` are one past the face) and, like landmarks, in
pixels of the image as downloaded (after its EXIF orientation is applied).

Option ``sink`` (default None): a file path; each result is also appended to it as one line,
with ``job_id``, ``attempt`` and ``url`` added. The file gets at-least-once lines: a job run
again after a step process died writes its faces again, under a higher ``attempt``.

This step never sends ``Status`` ``finish``: a job has a result per face, each its own item,
and finishing the job on the first would drop the others. A job ends when all its faces are
written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blueengine import Context
from services.face.steps import settings
from services.face.steps.items import face_result

logger = logging.getLogger(__name__)

DEFAULTS: Mapping[str, Any] = {"sink": None}


def setup(context: Context) -> Path | None:
    """Check that the sink, if any, can be appended to."""
    sink = settings(context.step, context.config, DEFAULTS)["sink"]
    if sink is None:
        return None
    path = Path(sink)
    with path.open("a", encoding="utf-8"):
        pass
    logger.info("Results are appended to %s.", path)
    return path


def write(context: Context, input: dict[str, Any]) -> dict[str, Any]:
    """The face's Result; its line in the sink first, when there is one."""
    item: dict[str, Any] = input["forward"]
    result = face_result(item)
    sink: Path | None = context.resources
    if sink is not None:
        line = {
            "job_id": context.job_id,
            "attempt": context.attempt,
            "url": item["meta"]["url"],
            **result,
        }
        data = (json.dumps(line, allow_nan=False) + "\n").encode()
        # Unbuffered append: one write call per line, so lines of replicas sharing the file
        # do not interleave.
        with sink.open("ab", buffering=0) as lines:
            lines.write(data)
    return {"Result": result}
