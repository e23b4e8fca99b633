"""Face detection, landmarks, alignment and embedding over numpy images, with dlib's models.

Each stage is a small class that loads its model once and then serves many calls, so that a
pipeline step builds it in its per-process setup hook::

    detector, landmarker, embedder = Detector(), Landmarker(), Embedder()
    for box in detector.detect(image):
        marks = landmarker.landmarks(image, box)
        chip = align(image, box, marks.points5)
        vector = embedder.embed(chip)

Everything these functions return (`Box`, landmark arrays, chips, embeddings) is plain Python or
numpy, so that it can travel between steps through msgpack; dlib objects are made and dropped
inside each call. Images are ``(height, width, 3)`` uint8 RGB arrays; grayscale and RGBA arrays
are converted on the way in.

The model files come from the ``face_recognition_models`` package, so nothing is downloaded at
run time. The detector is dlib's HOG detector, which needs no model file.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import dlib
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CHIP_SIZE = 150
EMBEDDING_SIZE = 128

LANDMARKS_68_MODEL = "shape_predictor_68_face_landmarks.dat"
LANDMARKS_5_MODEL = "shape_predictor_5_face_landmarks.dat"
EMBEDDING_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


def model_path(filename: str) -> Path:
    """Path of a dlib model file shipped in the ``face_recognition_models`` package.

    The package is located without importing it: its ``__init__`` imports ``pkg_resources``,
    which recent setuptools deprecate with a warning and newer ones no longer ship.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "face_recognition_models is not installed; install blueengine[face] to get it"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not path.is_file():
        raise FileNotFoundError(f"dlib model {filename!r} is missing: expected it at {path}")
    return path


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Return `image` as a C-contiguous ``(height, width, 3)`` uint8 RGB array.

    Grayscale ``(h, w)`` and ``(h, w, 1)`` arrays are repeated into three channels and an alpha
    channel is dropped. dlib must get C-contiguous memory: handed a view such as ``np.fliplr``
    or a crop, dlib-bin 20.0.1's detector now and then finds nothing (typically on its first
    call in a process), and ``get_face_chip`` and ``compute_face_descriptor`` refuse it with a
    TypeError. Every entry point therefore goes through here; contiguous arrays are not copied.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape:
        raise ValueError(f"expected an (height, width, 3) image, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


@dataclass(frozen=True, slots=True)
class Box:
    """A face's bounding box in pixel coordinates of the image it was found in.

    Bounds are half-open, as in Python slices: the face is
    ``image[box.top:box.bottom, box.left:box.right]``. `score` is the detector's confidence
    (higher is surer; dlib's HOG scores are around 0 to 3), or None for a box made by hand.
    ``dataclasses.astuple(box)`` and ``Box(*values)`` convert it to and from a plain tuple.
    """

    left: int
    top: int
    right: int
    bottom: int
    score: float | None = None

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def area(self) -> int:
        return self.width * self.height

    def to_rectangle(self) -> dlib.rectangle:
        # dlib's rectangles include their right and bottom edges.
        return dlib.rectangle(self.left, self.top, self.right - 1, self.bottom - 1)


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(small)


def _box_from_rectangle(
    rect: dlib.rectangle, score: float, small_shape: tuple[int, ...], shape: tuple[int, ...]
) -> Box:
    scale_y = shape[0] / small_shape[0]
    scale_x = shape[1] / small_shape[1]
    return Box(
        left=max(0, math.floor(rect.left() * scale_x)),
        top=max(0, math.floor(rect.top() * scale_y)),
        right=min(shape[1], math.ceil((rect.right() + 1) * scale_x)),
        bottom=min(shape[0], math.ceil((rect.bottom() + 1) * scale_y)),
        score=float(score),
    )


class Detector:
    """Finds frontal faces with dlib's HOG detector.

    `upsample` doubles the image that many times before detecting: the detector's smallest face
    is about 80 pixels, 40 after one upsampling. Photos whose longer side exceeds `max_side` are
    detected on a copy shrunk to that size, and the boxes mapped back: at full size and one
    upsampling, a 24-megapixel photo took dlib 14 s and 1.2 GB on 2 cores; shrunk, under 1 s.
    The boxes dlib finds move by about a tenth of the face's size from one scale to another,
    so a shrunk photo's boxes are as good as dlib's, not pixel-exact. Detections scoring below
    `min_score` are dropped; dlib's own threshold is 0, which in the astronaut sample photo also
    reports the mission patch on the suit (it scores 0.0 to 0.25, the faces 0.8 to 1.5).

    >>> detector = Detector()
    >>> boxes = detector.detect(image)  # doctest: +SKIP
    """

    def __init__(self, upsample: int = 1, max_side: int = 1600, min_score: float = 0.5) -> None:
        if upsample < 0:
            raise ValueError(f"upsample must be 0 or more, got {upsample}")
        if max_side < 80:
            raise ValueError(f"max_side must be at least 80 pixels, got {max_side}")
        self.upsample = upsample
        self.max_side = max_side
        self.min_score = min_score
        self._detector = dlib.get_frontal_face_detector()

    def detect(self, image: np.ndarray) -> list[Box]:
        """Boxes of the faces in `image`, in its own coordinates, best score first."""
        rgb = as_rgb(image)
        small = _shrink(rgb, self.max_side)
        rects, scores, _ = self._detector.run(small, self.upsample, self.min_score)
        boxes = [
            _box_from_rectangle(rect, score, small.shape, rgb.shape)
            for rect, score in zip(rects, scores, strict=True)
        ]
        boxes = [box for box in boxes if box.width > 0 and box.height > 0]
        return sorted(boxes, key=lambda box: -(box.score or 0.0))


class Landmarks(NamedTuple):
    """Landmarks of one face as ``(n, 2)`` int32 arrays of ``(x, y)`` image coordinates."""

    points68: np.ndarray
    points5: np.ndarray


def _points(shape: dlib.full_object_detection) -> np.ndarray:
    return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.int32)


class Landmarker:
    """Finds a face's 68 landmarks (the iBUG 300-W layout) and the 5 that `align` uses.

    The 5-point model (eye corners and the base of the nose) is the one dlib's face-embedding
    network was trained with; the 68 points serve display and analysis.
    """

    def __init__(self) -> None:
        self._predictor68 = dlib.shape_predictor(str(model_path(LANDMARKS_68_MODEL)))
        self._predictor5 = dlib.shape_predictor(str(model_path(LANDMARKS_5_MODEL)))

    def landmarks(self, image: np.ndarray, box: Box) -> Landmarks:
        rgb = as_rgb(image)
        rect = box.to_rectangle()
        return Landmarks(
            points68=_points(self._predictor68(rgb, rect)),
            points5=_points(self._predictor5(rgb, rect)),
        )


def align(
    image: np.ndarray,
    box: Box,
    points5: np.ndarray,
    size: int = CHIP_SIZE,
    padding: float = 0.25,
) -> np.ndarray:
    """Cut the face out of `image`, upright and scaled: a ``(size, size, 3)`` uint8 chip.

    `points5` are the 5 landmarks from `Landmarker.landmarks`. `Embedder` needs the defaults.
    """
    points = np.asarray(points5)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks as a (5, 2) array, got shape {points.shape}")
    parts = [dlib.point(int(x), int(y)) for x, y in points]
    shape = dlib.full_object_detection(box.to_rectangle(), parts)
    chip: np.ndarray = dlib.get_face_chip(as_rgb(image), shape, size=size, padding=padding)
    return chip


class Embedder:
    """Maps an aligned face chip to a 128-value vector with dlib's ResNet model.

    Two chips of the same person lie closer than about 0.6 in Euclidean distance (the model's
    documented operating point). `num_jitters` above 1 averages that many randomly jittered
    copies: slightly more robust, that many times slower.
    """

    def __init__(self, num_jitters: int = 0) -> None:
        self.num_jitters = num_jitters
        self._model = dlib.face_recognition_model_v1(str(model_path(EMBEDDING_MODEL)))

    def embed(self, chip: np.ndarray) -> np.ndarray:
        """The ``(128,)`` float32 embedding of a chip made by `align` with its defaults."""
        rgb = as_rgb(chip)
        if rgb.shape != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(
                f"expected a {CHIP_SIZE}x{CHIP_SIZE} chip from align(), got shape {rgb.shape}"
            )
        vector = self._model.compute_face_descriptor(rgb, num_jitters=self.num_jitters)
        return np.asarray(vector, dtype=np.float32)
