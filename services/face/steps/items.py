"""What travels between the face engine's steps, and the crop that keeps a face's item small.

download forwards ``(image, meta)``: the decoded RGB array and a dict of job-level facts
(`Meta`). From detect on, each item is one face, a dict that each step adds to and takes from:

=============  ===========  ==================================================================
key            added by     value
=============  ===========  ==================================================================
meta           detect       the job's `Meta`, passed on unchanged
index, faces   detect       this face's place in the detector's order (best score first), and
                            how many faces the image has
box            detect       ``(left, top, right, bottom, score)`` in image coordinates
crop           detect       the face with a margin around it, cut from the image (`cut_face`)
origin, scale  detect       where the crop lies: crop pixel = (image pixel - origin) * scale
crop_box       detect       the box in crop coordinates
landmarks      landmarks    the 68 points, ``(68, 2)`` int32 in image coordinates
crop_points5   landmarks    the 5 points `align` uses, in crop coordinates
chip           align        the aligned ``(150, 150, 3)`` face; replaces everything crop_*
embedding      recognize    ``(128,)`` float32; replaces the chip
identity       recognize    the gallery's name for the face, or None
distance       recognize    Euclidean distance to the nearest gallery face (inf if none)
=============  ===========  ==================================================================

Why a crop and not the image: every face of a photo is a separate item, and each crosses two hops
(detect to landmarks, landmarks to align). A 512x512 photo is 768 KiB; the crop around its
91-pixel face is 120 KiB, and a 4-face photo of 1024x1024 sends 0.5 MiB instead of 12 MiB.
Landmarks and the chip come out pixel-identical to those computed on the whole image as long
as the crop holds every pixel they read: dlib's chip covers about 1.33 times the box, so turned
by 45 degrees it reaches 0.44 box widths past the box. The default margin, 0.6 box widths on
every side, leaves room for the landmarks to disagree with the box. Where the crop is cut by the
image's border, the pixels it lacks are outside the image too, which dlib reads as black either
way.

Faces larger than ``max_side / (1 + 2 * margin)`` pixels are shrunk with their crop to at most
``max_side`` pixels a side: the chip is 150 pixels whatever the face's size, so a 1500-pixel face
in a phone photo would otherwise send 12 MiB per hop for nothing. Its landmarks are then found at
the shrunk scale and mapped back, within a pixel or two (at the original scale) of the full-size
ones.

This module needs only numpy and Pillow, so that the write step's process does not load dlib.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

import numpy as np
from PIL import Image

BoxTuple = tuple[int, int, int, int, float | None]
"""``(left, top, right, bottom, score)``, half-open bounds, as ``dataclasses.astuple(Box)``."""

DEFAULT_MARGIN = 0.6
DEFAULT_CROP_MAX_SIDE = 800


class Meta(TypedDict):
    """Facts about a job's image that every face's item carries to the write step."""

    url: str  # the image_url, shortened for data: URIs; "image_b64" for an inline image
    width: int
    height: int
    bytes: int  # size of the downloaded file
    embedding: bool  # whether results include the embedding


def cut_face(
    image: np.ndarray,
    box: BoxTuple,
    margin: float = DEFAULT_MARGIN,
    max_side: int = DEFAULT_CROP_MAX_SIDE,
) -> tuple[np.ndarray, tuple[int, int], float]:
    """The face in `box` with `margin` box widths around it: ``(crop, origin, scale)``.

    The crop is a C-contiguous copy, clipped to the image, shrunk to at most `max_side`
    pixels a side (see the module's docs). ``origin`` is its top-left corner in the image and
    ``scale`` is crop pixels per image pixel.
    """
    left, top, right, bottom = box[:4]
    pad = math.ceil(margin * max(right - left, bottom - top))
    height, width = image.shape[:2]
    x0, y0 = max(0, left - pad), max(0, top - pad)
    x1, y1 = min(width, right + pad), min(height, bottom + pad)
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])

    longest = max(x1 - x0, y1 - y0)
    if longest <= max_side:
        return crop, (x0, y0), 1.0
    scale = max_side / longest
    size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    small = Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(small), (x0, y0), scale


def box_in_crop(box: BoxTuple, origin: tuple[int, int], scale: float) -> tuple[int, int, int, int]:
    """`box` in the coordinates of a crop at `origin` and `scale` (without its score)."""
    x0, y0 = origin
    left, top, right, bottom = box[:4]
    return (
        round((left - x0) * scale),
        round((top - y0) * scale),
        round((right - x0) * scale),
        round((bottom - y0) * scale),
    )


def points_in_image(points: np.ndarray, origin: tuple[int, int], scale: float) -> np.ndarray:
    """Points found in a crop, as int32 ``(x, y)`` in the coordinates of the whole image."""
    shifted = np.asarray(points, dtype=np.float64) / scale + np.asarray(origin, dtype=np.float64)
    return np.rint(shifted).astype(np.int32)


def face_result(item: dict[str, Any]) -> dict[str, Any]:
    """The JSON `Result` of one face's item as the recognize step left it."""
    left, top, right, bottom, score = item["box"]
    meta: Meta = item["meta"]
    distance = float(item["distance"])
    result: dict[str, Any] = {
        "index": int(item["index"]),
        "faces": int(item["faces"]),
        "box": {
            "left": int(left),
            "top": int(top),
            "right": int(right),
            "bottom": int(bottom),
            "score": None if score is None else float(score),
        },
        "landmarks": np.asarray(item["landmarks"]).tolist(),
        "identity": item["identity"],
        # JSON has no infinity: an empty gallery leaves every face without a distance.
        "distance": distance if math.isfinite(distance) else None,
        "image": {"width": meta["width"], "height": meta["height"]},
    }
    if meta["embedding"]:
        result["embedding"] = np.asarray(item["embedding"], dtype=np.float64).tolist()
    return result
