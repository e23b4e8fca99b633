"""Step 5, recognize: embed each face and name it from the gallery.

dlib's ResNet model maps the chip to 128 values; the nearest face of the gallery names it when
closer than ``threshold`` (Euclidean distance; 0.6 is the model's documented operating point).
The gallery is embedded at setup, through the same detect, landmarks, align and embed path.

Options and their defaults:

===========  ================================================================================
gallery      a directory of known faces (`services.face.gallery` describes its layout); None
             reads ``BLUEENGINE_FACE_GALLERY``, and without it the sample gallery shipped with
             the engine (``eileen_collins``) is used
threshold    0.6; a face farther than this from every gallery face gets identity None
num_jitters  0; above 1, each embedding averages that many jittered copies (that many times
             slower)
===========  ================================================================================

This is the slowest step (about 90 ms per face on one core): give it replicas first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blueengine import Context
from services.face.gallery import DEFAULT_THRESHOLD, SAMPLE_GALLERY_DIR, Gallery
from services.face.steps import settings
from services.face.vision import Detector, Embedder, Landmarker

logger = logging.getLogger(__name__)

GALLERY_ENV = "BLUEENGINE_FACE_GALLERY"

DEFAULTS: Mapping[str, Any] = {"gallery": None, "threshold": DEFAULT_THRESHOLD, "num_jitters": 0}


@dataclass(frozen=True)
class Recognition:
    """The step's resources: the embedding model, the enrolled gallery and the threshold."""

    embedder: Embedder
    gallery: Gallery
    threshold: float


def setup(context: Context) -> Recognition:
    """Load the embedding model and enroll the gallery, once per process."""
    options = settings(context.step, context.config, DEFAULTS)
    if not options["threshold"] > 0:
        raise ValueError(f"step {context.step!r}: threshold must be positive")
    directory = options["gallery"] or os.environ.get(GALLERY_ENV) or SAMPLE_GALLERY_DIR

    started = time.perf_counter()
    embedder = Embedder(options["num_jitters"])
    # The detector and landmarker serve enrollment only and are dropped once it is done.
    gallery = Gallery.from_directory(
        directory, detector=Detector(), landmarker=Landmarker(), embedder=embedder
    )
    logger.info(
        "Enrolled %d gallery faces of %d identities from %s in %.2f s.",
        len(gallery),
        len(gallery.identities),
        directory,
        time.perf_counter() - started,
    )
    return Recognition(embedder, gallery, float(options["threshold"]))


def recognize(context: Context, input: dict[str, Any]) -> dict[str, Any]:
    """Replace the face's chip by its embedding, identity and distance."""
    resources: Recognition = context.resources
    item: dict[str, Any] = input["forward"]
    embedding = resources.embedder.embed(item.pop("chip"))
    match = resources.gallery.match(embedding, resources.threshold)
    item.update(embedding=embedding, identity=match.identity, distance=match.distance)
    return {"forward": item}
