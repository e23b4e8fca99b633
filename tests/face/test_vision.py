"""The face engine's vision core on the photos bundled with scikit-image, with the real models."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageEnhance

pytest.importorskip("dlib")
pytest.importorskip("skimage")

from skimage import data

from services.face.gallery import (
    SAMPLE_GALLERY_DIR,
    Gallery,
    Match,
    embed_largest_face,
    sample_face,
)
from services.face.vision import (
    CHIP_SIZE,
    EMBEDDING_SIZE,
    Box,
    Detector,
    Embedder,
    Landmarker,
    align,
    as_rgb,
)

# Where dlib's HOG detector puts Eileen Collins' face in the 512x512 astronaut photo.
FACE = Box(175, 76, 266, 167)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector()


@pytest.fixture(scope="module")
def landmarker() -> Landmarker:
    return Landmarker()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def gallery(detector: Detector, landmarker: Landmarker, embedder: Embedder) -> Gallery:
    return Gallery.from_directory(detector=detector, landmarker=landmarker, embedder=embedder)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


def recognize(
    image: np.ndarray,
    detector: Detector,
    landmarker: Landmarker,
    embedder: Embedder,
    gallery: Gallery,
) -> list[tuple[Box, Match]]:
    found = []
    for box in detector.detect(image):
        marks = landmarker.landmarks(image, box)
        found.append((box, gallery.match(embedder.embed(align(image, box, marks.points5)))))
    return found


def near(box: Box, expected: Box, tolerance: float) -> bool:
    pairs = zip(dataclasses.astuple(box)[:4], dataclasses.astuple(expected)[:4], strict=True)
    return all(abs(a - b) <= tolerance for a, b in pairs)


def rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).rotate(degrees, Image.Resampling.BILINEAR))


def brightened(image: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))


def grayscale(image: np.ndarray) -> np.ndarray:
    gray = np.asarray(Image.fromarray(image).convert("L"))
    return np.stack([gray] * 3, axis=2)


def test_astronaut_is_one_face_recognized_as_eileen_collins(
    astronaut: np.ndarray,
    detector: Detector,
    landmarker: Landmarker,
    embedder: Embedder,
    gallery: Gallery,
) -> None:
    [(box, match)] = recognize(astronaut, detector, landmarker, embedder, gallery)

    assert near(box, FACE, tolerance=4)
    assert box.score is not None and box.score > 0.5
    assert match.identity == "eileen_collins"
    assert match.distance < 0.6


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(np.fliplr, id="mirrored-view"),
        pytest.param(lambda image: rotated(image, 8), id="rotated-8"),
        pytest.param(lambda image: rotated(image, -8), id="rotated-minus-8"),
        pytest.param(lambda image: brightened(image, 1.4), id="brighter"),
        pytest.param(lambda image: brightened(image, 0.6), id="darker"),
        pytest.param(grayscale, id="grayscale-as-rgb"),
        pytest.param(lambda image: grayscale(image)[:, :, 0], id="grayscale-2d"),
    ],
)
def test_changed_astronaut_still_matches(
    change: Any,
    astronaut: np.ndarray,
    detector: Detector,
    landmarker: Landmarker,
    embedder: Embedder,
    gallery: Gallery,
) -> None:
    [(_, match)] = recognize(change(astronaut), detector, landmarker, embedder, gallery)

    assert match.identity == "eileen_collins"
    assert match.distance < 0.6


def test_mirrored_face_box_is_mirrored(astronaut: np.ndarray, detector: Detector) -> None:
    [box] = detector.detect(np.fliplr(astronaut))

    assert near(box, Box(512 - FACE.right, FACE.top, 512 - FACE.left, FACE.bottom), 6)


def test_views_find_the_face_every_time(astronaut: np.ndarray, detector: Detector) -> None:
    # Handed views that are not C-contiguous, dlib-bin's detector now and then finds nothing;
    # how often depends on the process's allocations, so this guards without always catching.
    views = [np.fliplr(astronaut), astronaut[10:, 10:], astronaut[:, :, ::-1]]

    counts = [len(detector.detect(view)) for view in views for _ in range(4)]

    assert counts == [1] * len(counts)


def test_tiled_photo_finds_a_face_in_each_quadrant(
    astronaut: np.ndarray,
    detector: Detector,
    landmarker: Landmarker,
    embedder: Embedder,
    gallery: Gallery,
) -> None:
    found = recognize(np.tile(astronaut, (2, 2, 1)), detector, landmarker, embedder, gallery)

    quadrants = sorted((box.top // 512, box.left // 512) for box, _ in found)
    assert quadrants == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for box, match in found:
        local = Box(box.left % 512, box.top % 512, box.right % 512, box.bottom % 512)
        assert near(local, FACE, tolerance=15)
        assert match.identity == "eileen_collins"


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_photos_without_people_have_no_faces(name: str, detector: Detector) -> None:
    assert detector.detect(getattr(data, name)()) == []


class RecordingDetector:
    """Wraps dlib's detector to record the sizes of the images it is given."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.shapes: list[tuple[int, ...]] = []

    def run(self, image: np.ndarray, *args: Any) -> Any:
        self.shapes.append(image.shape)
        return self.wrapped.run(image, *args)


def test_large_photo_is_detected_shrunk_and_boxes_mapped_back(
    astronaut: np.ndarray,
    landmarker: Landmarker,
    embedder: Embedder,
    gallery: Gallery,
) -> None:
    side, offset = 3000, 700
    large = np.full((side, 4000, 3), 128, dtype=np.uint8)
    large[:, offset : offset + side] = np.asarray(Image.fromarray(astronaut).resize((side, side)))
    detector = Detector(max_side=1600)
    recording = RecordingDetector(detector._detector)
    detector._detector = recording

    [(box, match)] = recognize(large, detector, landmarker, embedder, gallery)

    assert recording.shapes == [(1200, 1600, 3)]
    [small] = Detector().detect(np.asarray(Image.fromarray(large).resize((1600, 1200))))
    assert near(box, Box(*(round(2.5 * value) for value in dataclasses.astuple(small)[:4])), 3)
    # dlib's boxes shift by about a tenth of the face between scales.
    scale = side / 512
    expected = Box(
        round(FACE.left * scale) + offset,
        round(FACE.top * scale),
        round(FACE.right * scale) + offset,
        round(FACE.bottom * scale),
    )
    assert near(box, expected, tolerance=0.2 * expected.width)
    assert match.identity == "eileen_collins"


def test_boxes_are_clipped_to_the_image(astronaut: np.ndarray, detector: Detector) -> None:
    # Cut through the face: dlib still finds it, with a box reaching outside the image.
    cut = astronaut[FACE.top + 10 :, FACE.left + 10 :]

    boxes = detector.detect(cut)

    assert boxes
    for box in boxes:
        assert 0 <= box.left < box.right <= cut.shape[1]
        assert 0 <= box.top < box.bottom <= cut.shape[0]


def test_landmarks_lie_on_the_face(astronaut: np.ndarray, landmarker: Landmarker) -> None:
    marks = landmarker.landmarks(astronaut, FACE)

    assert marks.points68.shape == (68, 2)
    assert marks.points5.shape == (5, 2)
    assert marks.points68.dtype == np.int32
    margin = 0.15 * FACE.width
    for points in marks:
        assert np.all(points[:, 0] >= FACE.left - margin)
        assert np.all(points[:, 0] <= FACE.right + margin)
        assert np.all(points[:, 1] >= FACE.top - margin)
        assert np.all(points[:, 1] <= FACE.bottom + margin)
    # The 68-point layout lists the jaw first, the right eye at 36-41 and the left at 42-47.
    right_eye, left_eye = marks.points68[36:42].mean(axis=0), marks.points68[42:48].mean(axis=0)
    assert right_eye[0] < left_eye[0]
    assert abs(right_eye[1] - left_eye[1]) < 0.1 * FACE.height


def test_chip_and_embedding(
    astronaut: np.ndarray, landmarker: Landmarker, embedder: Embedder
) -> None:
    marks = landmarker.landmarks(astronaut, FACE)

    chip = align(astronaut, FACE, marks.points5)
    embedding = embedder.embed(chip)

    assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3)
    assert chip.dtype == np.uint8
    assert chip.std() > 20
    assert embedding.shape == (EMBEDDING_SIZE,)
    assert embedding.dtype == np.float32
    assert np.all(np.isfinite(embedding))
    assert np.linalg.norm(embedding) > 0.1


def test_results_survive_a_plain_round_trip(
    astronaut: np.ndarray, detector: Detector, landmarker: Landmarker
) -> None:
    # Steps pass boxes and points between processes as plain tuples and arrays.
    [box] = detector.detect(astronaut)
    marks = landmarker.landmarks(astronaut, box)

    again = Box(*dataclasses.astuple(box))
    points = np.array(marks.points5.tolist())

    assert again == box
    assert np.array_equal(align(astronaut, again, points), align(astronaut, box, marks.points5))


def test_another_person_is_not_matched(
    landmarker: Landmarker, embedder: Embedder, gallery: Gallery
) -> None:
    # The cameraman's face, given by hand: the detector scores it below zero.
    cameraman = data.camera()
    box = Box(216, 130, 269, 183)
    marks = landmarker.landmarks(cameraman, box)

    match = gallery.match(embedder.embed(align(cameraman, box, marks.points5)))

    assert match.identity is None
    assert match.distance > 0.6


def test_gallery_from_images_and_folders(
    astronaut: np.ndarray,
    detector: Detector,
    landmarker: Landmarker,
    embedder: Embedder,
    tmp_path: Path,
) -> None:
    models = {"detector": detector, "landmarker": landmarker, "embedder": embedder}
    face = sample_face()
    (tmp_path / "collins").mkdir()
    Image.fromarray(face).save(tmp_path / "collins" / "a.png")
    Image.fromarray(np.fliplr(face)).save(tmp_path / "collins" / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")

    from_folders = Gallery.from_directory(tmp_path, **models)
    from_arrays = Gallery.from_images({"collins": [face, np.fliplr(face)]}, **models)
    probe = embed_largest_face(astronaut, detector, landmarker, embedder)

    assert probe is not None
    for gallery in (from_folders, from_arrays):
        assert len(gallery) == 2
        assert gallery.identities == ["collins"]
        assert gallery.match(probe).identity == "collins"
        assert gallery.match(probe, threshold=0.01) == (None, gallery.match(probe).distance)


def test_gallery_image_without_a_face_is_an_error(
    detector: Detector, landmarker: Landmarker, embedder: Embedder
) -> None:
    models = {"detector": detector, "landmarker": landmarker, "embedder": embedder}

    with pytest.raises(ValueError, match="'cat'"):
        Gallery.from_images({"cat": data.chelsea()}, **models)


def test_empty_gallery_matches_nobody() -> None:
    gallery = Gallery([], np.empty((0, EMBEDDING_SIZE)))

    assert gallery.match(np.zeros(EMBEDDING_SIZE)) == (None, math.inf)


def test_wrong_inputs_are_named(gallery: Gallery, embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="uint8"):
        as_rgb(np.zeros((10, 10, 3)))
    with pytest.raises(ValueError, match=r"\(10, 10, 2\)"):
        as_rgb(np.zeros((10, 10, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="150x150"):
        embedder.embed(np.zeros((100, 100, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(128,\)"):
        gallery.match(np.zeros(64))


def test_shipped_sample_gallery_is_reproducible() -> None:
    with Image.open(SAMPLE_GALLERY_DIR / "eileen_collins.png") as shipped:
        assert np.array_equal(np.asarray(shipped.convert("RGB")), sample_face())
