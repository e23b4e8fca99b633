"""Each step of services.face:engine in process, through blueengine.testing.run_step."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("dlib")
pytest.importorskip("skimage")

from skimage import data

from blueengine import Context
from blueengine.testing import run_step
from services.face import FacePayload, engine, make_engine
from services.face.fetch import ALLOW_NETS_ENV
from services.face.gallery import sample_face
from services.face.steps.download import Downloader
from services.face.vision import Box, Landmarker, align

from .conftest import ContentServer, Trap, encode

pytestmark = pytest.mark.timeout(30)

# Where dlib's HOG detector puts Eileen Collins' face in the 512x512 astronaut photo.
FACE = Box(175, 76, 266, 167)


def setup_step(step: str, **config: Any) -> Any:
    """What the step's setup hook returns, with some options changed."""
    spec = engine.step(step)
    context = Context(
        step=step,
        replica=0,
        config={**spec.config, **config},
        logger=logging.getLogger(f"test.{step}"),
    )
    hook = spec.load_setup()
    return None if hook is None else hook(context)


@pytest.fixture(scope="module")
def resources() -> dict[str, Any]:
    """Each model-loading step's resources, built once for the module."""
    return {step: setup_step(step) for step in ("detect", "landmarks", "recognize", "write")}


def run(step: str, inputs: Iterable[Mapping[str, Any]], resources: Any) -> dict[str, list[Any]]:
    return run_step(engine.step(step), inputs, resources=resources, last=step == "write")


def forwarded(
    steps: Sequence[str], values: Iterable[Any], resources: Mapping[str, Any]
) -> list[Any]:
    """What the last of `steps` forwards when the first is given `values` as forward input."""
    items = list(values)
    for step in steps:
        items = run(step, [{"forward": item} for item in items], resources.get(step))["forward"]
    return items


def data_uri(image: np.ndarray, fmt: str = "PNG") -> str:
    body = base64.b64encode(encode(Image.fromarray(image), fmt)).decode()
    return f"data:image/{fmt.lower()};base64,{body}"


def downloader(**config: Any) -> Downloader:
    resources: Downloader = setup_step("download", **config)
    return resources


def download_error(payload: object, **config: Any) -> Exception:
    with pytest.raises(Exception) as caught:
        run("download", [{"Control": payload}], downloader(**config))
    return caught.value


def rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).rotate(degrees, Image.Resampling.BILINEAR))


def near(box: tuple[Any, ...], expected: Box, tolerance: float) -> bool:
    return all(
        abs(a - b) <= tolerance
        for a, b in zip(box[:4], dataclasses.astuple(expected)[:4], strict=True)
    )


# -- download ---------------------------------------------------------------------------------


def test_download_decodes_a_data_uri(astronaut: np.ndarray) -> None:
    out = run("download", [{"Control": {"image_url": data_uri(astronaut)}}], downloader())

    [(image, meta)] = out["forward"]
    assert np.array_equal(image, astronaut)
    assert meta == {
        "url": "data:image/png;base64,...",
        "width": 512,
        "height": 512,
        "bytes": meta["bytes"],
        "embedding": False,
    }
    assert meta["bytes"] > 100_000
    assert out["Status"] == [
        {"type": "message", "message": f"downloaded a 512x512 image of {meta['bytes']} bytes"}
    ]


def test_download_takes_an_inline_image_and_the_embedding_flag(astronaut_jpeg: bytes) -> None:
    payload = {"image_b64": base64.b64encode(astronaut_jpeg).decode(), "embedding": True}

    [(image, meta)] = run("download", [{"Control": payload}], downloader())["forward"]

    assert image.shape == (512, 512, 3)
    assert (meta["url"], meta["bytes"], meta["embedding"]) == (
        "image_b64",
        len(astronaut_jpeg),
        True,
    )


def test_download_fetches_from_an_allowed_network(
    server: ContentServer, astronaut: np.ndarray
) -> None:
    url = server.url("/astronaut.png")
    resources = downloader(allow_nets="127.0.0.1/32")

    [(image, meta)] = run("download", [{"Control": {"image_url": url}}], resources)["forward"]

    assert np.array_equal(image, astronaut)
    assert meta["url"] == url


def test_download_refuses_loopback_unless_allowed(
    monkeypatch: pytest.MonkeyPatch, trap: Trap
) -> None:
    monkeypatch.delenv(ALLOW_NETS_ENV, raising=False)

    error = download_error({"image_url": trap.url()})

    assert getattr(error, "code", None) == "url_refused"
    assert "loopback" in str(error)
    assert trap.accepted() == 0


def test_download_reads_allowed_networks_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ALLOW_NETS_ENV, "127.0.0.2/32, 10.0.0.0/8")

    assert [str(net) for net in downloader().allow_nets] == ["127.0.0.2/32", "10.0.0.0/8"]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("http://example.org/a.jpg", id="not-an-object"),
        pytest.param({}, id="no-image"),
        pytest.param({"image_url": "data:,x", "image_b64": "eA=="}, id="two-images"),
        pytest.param({"image_url": 5}, id="url-not-a-string"),
        pytest.param({"image_url": "data:,x", "embedding": "yes"}, id="embedding-not-bool"),
    ],
)
def test_payload_without_one_image_is_bad_payload(payload: object) -> None:
    error = download_error(payload)

    assert getattr(error, "code", None) == "bad_payload"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        pytest.param({"image_b64": "PGh0bWw+"}, "bad_image", id="b64-html"),
        pytest.param({"image_b64": "not base64!"}, "bad_image", id="b64-invalid"),
        pytest.param({"image_url": "data:text/plain,hello"}, "bad_image", id="data-text"),
        pytest.param({"image_url": "data:image/png;base64,"}, "bad_image", id="data-empty"),
        pytest.param({"image_url": "ftp://example.org/a.png"}, "url_refused", id="ftp"),
        pytest.param({"image_url": "file:///etc/passwd"}, "url_refused", id="file"),
    ],
)
def test_bad_sources_fail_with_their_code(payload: object, code: str) -> None:
    assert getattr(download_error(payload), "code", None) == code


def test_limits_come_from_the_step_options(astronaut: np.ndarray, astronaut_png: bytes) -> None:
    inline = {"image_b64": base64.b64encode(astronaut_png).decode()}
    by_url = {"image_url": data_uri(astronaut)}

    for payload in (inline, by_url):
        error = download_error(payload, max_bytes=100_000)
        assert getattr(error, "code", None) == "too_large"
        assert "100000 bytes" in str(error)
    error = download_error(inline, max_pixels=512 * 511)
    assert getattr(error, "code", None) == "too_large"
    assert "262144 pixels" in str(error)


def test_unknown_or_bad_options_stop_the_setup() -> None:
    with pytest.raises(ValueError, match="no option 'max_byte'"):
        downloader(max_byte=10)
    with pytest.raises(ValueError, match="max_bytes"):
        downloader(max_bytes=0)
    with pytest.raises(ValueError, match="not a CIDR network"):
        downloader(allow_nets="localhost")
    with pytest.raises(ValueError, match="no option 'upsampling'"):
        setup_step("detect", upsampling=2)


# -- detect -----------------------------------------------------------------------------------


def meta_of(image: np.ndarray, embedding: bool = False) -> dict[str, Any]:
    height, width = image.shape[:2]
    return {"url": "test", "width": width, "height": height, "bytes": 0, "embedding": embedding}


def test_detect_forwards_one_item_per_face_with_a_crop(
    astronaut: np.ndarray, resources: dict[str, Any]
) -> None:
    meta = meta_of(astronaut)
    out = run("detect", [{"forward": (astronaut, meta)}], resources["detect"])

    [item] = out["forward"]
    assert out["Statistic"] == [{"faces_detected": 1}]
    assert (item["meta"], item["index"], item["faces"]) == (meta, 0, 1)
    assert near(item["box"], FACE, tolerance=4)
    assert item["box"][4] > 0.5
    # A margin of 0.6 box widths on each side.
    left, top, right, bottom = item["box"][:4]
    pad = int(np.ceil(0.6 * (right - left)))
    assert item["origin"] == (left - pad, top - pad)
    assert item["scale"] == 1.0
    crop = astronaut[top - pad : bottom + pad, left - pad : right + pad]
    assert np.array_equal(item["crop"], crop)
    assert item["crop_box"] == (pad, pad, pad + right - left, pad + bottom - top)
    assert item["crop"].nbytes < astronaut.nbytes / 4


def test_detect_finds_the_four_faces_of_a_tiled_photo(
    astronaut: np.ndarray, resources: dict[str, Any]
) -> None:
    tiled = np.tile(astronaut, (2, 2, 1))

    out = run("detect", [{"forward": (tiled, meta_of(tiled))}], resources["detect"])

    items = out["forward"]
    assert out["Statistic"] == [{"faces_detected": 4}]
    assert [(item["index"], item["faces"]) for item in items] == [(i, 4) for i in range(4)]
    assert sorted((item["box"][1] // 512, item["box"][0] // 512) for item in items) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    # Four crops cost less than one copy of the photo, instead of four.
    assert sum(item["crop"].nbytes for item in items) < tiled.nbytes / 4


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_detect_forwards_nothing_without_faces(name: str, resources: dict[str, Any]) -> None:
    image = getattr(data, name)()

    out = run("detect", [{"forward": (image, meta_of(image))}], resources["detect"])

    assert out["forward"] == []
    assert out["Statistic"] == [{"faces_detected": 0}]


def test_upsample_option_finds_smaller_faces(astronaut: np.ndarray) -> None:
    small = np.asarray(Image.fromarray(astronaut).resize((256, 256)))
    found = {}
    for upsample in (0, 1):
        detection = setup_step("detect", upsample=upsample)
        out = run("detect", [{"forward": (small, meta_of(small))}], detection)
        found[upsample] = out["Statistic"][0]["faces_detected"]

    assert found == {0: 0, 1: 1}


# -- landmarks and align: the crop changes nothing ----------------------------------------------


def shifted_to_the_edge(image: np.ndarray) -> np.ndarray:
    # The face's box starts 8 pixels from the left edge: the crop is cut by the border.
    return np.ascontiguousarray(image[:, FACE.left - 8 :])


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda image: image, id="astronaut"),
        pytest.param(lambda image: rotated(image, 25), id="rotated-25"),
        pytest.param(lambda image: rotated(image, -20), id="rotated-minus-20"),
        pytest.param(lambda image: np.tile(image, (2, 2, 1)), id="tiled"),
        pytest.param(shifted_to_the_edge, id="at-the-edge"),
    ],
)
def test_landmarks_and_chip_from_the_crop_equal_those_from_the_photo(
    change: Any, astronaut: np.ndarray, resources: dict[str, Any]
) -> None:
    image = change(astronaut)
    landmarker: Landmarker = resources["landmarks"]

    marked = forwarded(["detect", "landmarks"], [(image, meta_of(image))], resources)
    aligned = forwarded(["align"], marked, resources)

    assert marked
    for item, after in zip(marked, aligned, strict=True):
        box = Box(*item["box"])
        whole = landmarker.landmarks(image, box)
        assert np.array_equal(item["landmarks"], whole.points68)
        assert np.array_equal(after["chip"], align(image, box, whole.points5))
        assert "crop" not in after and "crop_points5" not in after


def test_large_face_travels_shrunk_and_its_landmarks_are_mapped_back(
    astronaut: np.ndarray, resources: dict[str, Any]
) -> None:
    large = np.asarray(Image.fromarray(astronaut).resize((1024, 1024)))
    detection = setup_step("detect", crop_max_side=300)

    [item] = run("detect", [{"forward": (large, meta_of(large))}], detection)["forward"]
    [marked] = forwarded(["landmarks"], [item], resources)
    [named] = forwarded(["align", "recognize"], [marked], resources)

    assert max(item["crop"].shape[:2]) == 300
    assert 0.7 < item["scale"] < 0.8
    box = Box(*item["box"])
    whole = resources["landmarks"].landmarks(large, box)
    error = np.abs(marked["landmarks"] - whole.points68).max()
    assert error <= 0.02 * box.width
    assert named["identity"] == "eileen_collins"


# -- recognize --------------------------------------------------------------------------------


def chip_items(image: np.ndarray, resources: Mapping[str, Any]) -> list[dict[str, Any]]:
    return forwarded(["detect", "landmarks", "align"], [(image, meta_of(image))], resources)


def test_recognize_names_the_astronaut(astronaut: np.ndarray, resources: dict[str, Any]) -> None:
    [item] = forwarded(["recognize"], chip_items(astronaut, resources), resources)

    assert item["identity"] == "eileen_collins"
    assert item["distance"] < 0.6
    assert item["embedding"].shape == (128,)
    assert item["embedding"].dtype == np.float32
    assert "chip" not in item


def test_threshold_option_decides_who_is_named(
    astronaut: np.ndarray, resources: dict[str, Any]
) -> None:
    [chip] = chip_items(astronaut, resources)
    strict = setup_step("recognize", threshold=0.01)

    [item] = run("recognize", [{"forward": dict(chip)}], strict)["forward"]

    assert item["identity"] is None
    assert 0.01 < item["distance"] < 0.6


def test_gallery_comes_from_the_option_or_the_environment(
    astronaut: np.ndarray,
    resources: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ImageOps.mirror(Image.fromarray(sample_face())).save(tmp_path / "mirror.png")
    [chip] = chip_items(astronaut, resources)
    by_option = setup_step("recognize", gallery=str(tmp_path))
    monkeypatch.setenv("BLUEENGINE_FACE_GALLERY", str(tmp_path))
    by_environment = setup_step("recognize")

    for recognition in (by_option, by_environment):
        [item] = run("recognize", [{"forward": dict(chip)}], recognition)["forward"]
        assert item["identity"] == "mirror"


def test_gallery_without_a_face_stops_the_setup(tmp_path: Path) -> None:
    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")

    with pytest.raises(ValueError, match="'cat'"):
        setup_step("recognize", gallery=str(tmp_path))


# -- write ------------------------------------------------------------------------------------


def recognized(
    image: np.ndarray, resources: Mapping[str, Any], embedding: bool = False
) -> list[dict[str, Any]]:
    return forwarded(
        ["detect", "landmarks", "align", "recognize"],
        [(image, meta_of(image, embedding))],
        resources,
    )


def test_write_makes_one_json_result_per_face(
    astronaut: np.ndarray, resources: dict[str, Any]
) -> None:
    [item] = recognized(astronaut, resources)

    out = run("write", [{"forward": item}], resources["write"])

    [result] = out["Result"]
    assert out["Status"] == []
    assert set(result) == {"index", "faces", "box", "landmarks", "identity", "distance", "image"}
    assert (result["index"], result["faces"], result["identity"]) == (0, 1, "eileen_collins")
    assert near(tuple(result["box"][k] for k in ("left", "top", "right", "bottom")), FACE, 4)
    assert result["box"]["score"] > 0.5
    assert np.array_equal(result["landmarks"], item["landmarks"])
    assert len(result["landmarks"]) == 68
    assert result["distance"] == pytest.approx(item["distance"])
    assert result["image"] == {"width": 512, "height": 512}
    assert json.loads(json.dumps(result)) == result


def test_write_adds_the_embedding_when_the_job_asks(
    astronaut: np.ndarray, resources: dict[str, Any]
) -> None:
    [item] = recognized(astronaut, resources, embedding=True)

    [result] = run("write", [{"forward": item}], resources["write"])["Result"]

    assert len(result["embedding"]) == 128
    assert np.array_equal(np.asarray(result["embedding"], dtype=np.float32), item["embedding"])


def test_write_appends_each_result_to_the_sink(
    astronaut: np.ndarray, resources: dict[str, Any], tmp_path: Path
) -> None:
    items = recognized(np.tile(astronaut, (1, 2, 1)), resources)
    sink = tmp_path / "results.jsonl"
    writer = setup_step("write", sink=str(sink))

    out = run("write", [{"forward": item} for item in items], writer)

    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert len(lines) == len(out["Result"]) == 2
    for number, (line, result) in enumerate(zip(lines, out["Result"], strict=True), start=1):
        assert line == {"job_id": f"test-{number}", "attempt": 1, "url": "test", **result}


def test_empty_gallery_distance_is_null(astronaut: np.ndarray, resources: dict[str, Any]) -> None:
    [item] = recognized(astronaut, resources)
    item.update(identity=None, distance=float("inf"))

    [result] = run("write", [{"forward": item}], resources["write"])["Result"]

    assert (result["identity"], result["distance"]) == (None, None)


# -- the engine definition ----------------------------------------------------------------------


def test_every_step_from_payload_to_result(
    astronaut_jpeg: bytes, resources: dict[str, Any]
) -> None:
    payload = {"image_b64": base64.b64encode(astronaut_jpeg).decode()}
    [first] = run("download", [{"Control": payload}], downloader())["forward"]

    items = forwarded(["detect", "landmarks", "align", "recognize"], [first], resources)
    results = run("write", [{"forward": item} for item in items], None)["Result"]

    assert [(r["identity"], r["distance"] < 0.6) for r in results] == [("eileen_collins", True)]


def test_engine_names_steps_by_import_string() -> None:
    assert [spec.name for spec in engine.steps] == [
        "download",
        "detect",
        "landmarks",
        "align",
        "recognize",
        "write",
    ]
    for spec in engine.steps:
        assert isinstance(spec.process_func, str)
        assert spec.setup is None or isinstance(spec.setup, str)
    assert engine.step("download").concurrency == 4


def test_make_engine_sets_options_and_replicas() -> None:
    custom = make_engine({"detect": {"upsample": 2}}, replicas={"recognize": 2})

    assert custom.step("detect").config == {"upsample": 2}
    assert custom.step("recognize").replicas == 2
    with pytest.raises(Exception, match="no step 'detection'"):
        make_engine({"detection": {}})


def test_payload_model_wants_exactly_one_image() -> None:
    assert FacePayload(image_url="https://example.org/a.jpg").embedding is False
    for fields in ({}, {"image_url": "a", "image_b64": "b"}):
        with pytest.raises(ValueError, match="exactly one"):
            FacePayload.model_validate(fields)
    with pytest.raises(ValueError, match="bool"):
        FacePayload.model_validate({"image_url": "a", "embedding": "yes"})
    # What the gateway hands on (model_dump) is a payload the download step takes.
    dumped = FacePayload(image_b64="eA==").model_dump(mode="json")
    assert download_error(dumped).code == "bad_image"  # type: ignore[attr-defined]
