"""The gallery of known faces that the recognize step matches embeddings against.

A gallery directory holds one image per identity, named by it (``eileen_collins.png`` is
``'eileen_collins'``), or a folder per identity with any number of images
(``eileen_collins/1998.jpg``). Each image is embedded once, at setup, through the same
detect, landmarks, align and embed path the engine runs, taking the largest face of the image::

    gallery = Gallery.from_directory()          # the sample gallery shipped with the engine
    identity, distance = gallery.match(embedding)

The shipped sample, ``gallery/eileen_collins.png``, is the head of the astronaut photo bundled
with scikit-image; `write_sample_gallery` makes it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from services.face.vision import EMBEDDING_SIZE, Detector, Embedder, Landmarker, align

logger = logging.getLogger(__name__)

SAMPLE_GALLERY_DIR = Path(__file__).with_name("gallery")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_THRESHOLD = 0.6

# The head of Eileen Collins in skimage.data.astronaut(), as (left, top, right, bottom).
_SAMPLE_CROP = (110, 5, 330, 225)
_SAMPLE_SIDE = 200


class Match(NamedTuple):
    """The nearest identity in a gallery, or None when none is close enough, and its distance."""

    identity: str | None
    distance: float


def embed_largest_face(
    image: np.ndarray, detector: Detector, landmarker: Landmarker, embedder: Embedder
) -> np.ndarray | None:
    """Embedding of the largest face in `image`, or None when it has no face."""
    boxes = detector.detect(image)
    if not boxes:
        return None
    box = max(boxes, key=lambda box: box.area)
    marks = landmarker.landmarks(image, box)
    return embedder.embed(align(image, box, marks.points5))


def load_image(path: Path) -> np.ndarray:
    """An image file as an RGB array, turned upright as its EXIF orientation says."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def gallery_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """``(identity, path)`` of each image in a gallery directory, in a stable order."""
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            for path in sorted(entry.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                    yield entry.name, path
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            yield entry.stem, entry


class Gallery:
    """Known faces: identities and their embeddings, one row per enrolled image.

    An identity may have several rows; `match` takes the nearest row.
    """

    def __init__(self, identities: Sequence[str], embeddings: np.ndarray) -> None:
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(-1, EMBEDDING_SIZE)
        if len(identities) != len(embeddings):
            raise ValueError(
                f"gallery has {len(identities)} identities but {len(embeddings)} embeddings"
            )
        self._identities = list(identities)
        self._embeddings = embeddings

    @classmethod
    def from_images(
        cls,
        images: Mapping[str, np.ndarray | Sequence[np.ndarray]],
        *,
        detector: Detector | None = None,
        landmarker: Landmarker | None = None,
        embedder: Embedder | None = None,
    ) -> Gallery:
        """Enroll images by identity: ``{'name': image}`` or ``{'name': [image, ...]}``.

        Models not given are loaded here. An image without a face is an error naming it.
        """
        pairs = [
            (identity, image)
            for identity, value in images.items()
            for image in ([value] if isinstance(value, np.ndarray) else value)
        ]
        return cls._enroll(pairs, detector, landmarker, embedder)

    @classmethod
    def from_directory(
        cls,
        directory: str | Path = SAMPLE_GALLERY_DIR,
        *,
        detector: Detector | None = None,
        landmarker: Landmarker | None = None,
        embedder: Embedder | None = None,
    ) -> Gallery:
        """Enroll the images of a gallery directory (see the module's docs for its layout)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"gallery directory {directory} does not exist")
        files = list(gallery_files(directory))
        if not files:
            raise ValueError(f"gallery directory {directory} holds no images")
        logger.info("Enrolling %d gallery images from %s.", len(files), directory)
        return cls._enroll(files, detector, landmarker, embedder)

    @classmethod
    def _enroll(
        cls,
        pairs: Sequence[tuple[str, np.ndarray | Path]],
        detector: Detector | None,
        landmarker: Landmarker | None,
        embedder: Embedder | None,
    ) -> Gallery:
        detector = detector or Detector()
        landmarker = landmarker or Landmarker()
        embedder = embedder or Embedder()
        vectors = []
        for identity, source in pairs:
            image = load_image(source) if isinstance(source, Path) else source
            vector = embed_largest_face(image, detector, landmarker, embedder)
            if vector is None:
                where = source if isinstance(source, Path) else "its image"
                raise ValueError(f"no face found for gallery identity {identity!r} in {where}")
            vectors.append(vector)
        return cls([identity for identity, _ in pairs], np.array(vectors, dtype=np.float32))

    @property
    def identities(self) -> list[str]:
        """The distinct identities, sorted."""
        return sorted(set(self._identities))

    def __len__(self) -> int:
        return len(self._identities)

    def match(self, embedding: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> Match:
        """The identity nearest to `embedding` if closer than `threshold`, and the distance.

        The distance is Euclidean; infinite when the gallery is empty.
        """
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.shape != (EMBEDDING_SIZE,):
            raise ValueError(f"expected a ({EMBEDDING_SIZE},) embedding, got {vector.shape}")
        if not self._identities:
            return Match(None, float("inf"))
        distances = np.linalg.norm(self._embeddings - vector, axis=1)
        nearest = int(np.argmin(distances))
        distance = float(distances[nearest])
        return Match(self._identities[nearest] if distance < threshold else None, distance)


def sample_face() -> np.ndarray:
    """The sample gallery's image: Eileen Collins' head from ``skimage.data.astronaut()``."""
    from skimage import data

    head = Image.fromarray(data.astronaut()).crop(_SAMPLE_CROP)
    side = (_SAMPLE_SIDE, _SAMPLE_SIDE)
    return np.asarray(head.resize(side, Image.Resampling.LANCZOS))


def write_sample_gallery(directory: str | Path = SAMPLE_GALLERY_DIR) -> Path:
    """Write the sample gallery's ``eileen_collins.png`` into `directory`; return its path."""
    path = Path(directory) / "eileen_collins.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample_face()).save(path, optimize=True)
    return path
