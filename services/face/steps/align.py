"""Step 4, align: cut each face out upright and to scale, as the embedding model expects.

dlib's ``get_face_chip`` maps the 5 landmarks onto a fixed template: a 150x150 chip with 25 %
padding. The chip replaces the crop in the item, so the next hop carries 66 KiB per face.
The step has no options and no models to load.
"""

from __future__ import annotations

from typing import Any

from blueengine import Context
from services.face.vision import Box, align

_CROP_KEYS = ("crop", "crop_box", "crop_points5", "origin", "scale")


def align_face(context: Context, input: dict[str, Any]) -> dict[str, Any]:
    """Replace the face's crop and everything in crop coordinates by its aligned chip."""
    item: dict[str, Any] = input["forward"]
    chip = align(item["crop"], Box(*item["crop_box"]), item["crop_points5"])
    for key in _CROP_KEYS:
        del item[key]
    item["chip"] = chip
    return {"forward": item}
