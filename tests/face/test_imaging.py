"""services.face.imaging: bytes in, an upright RGB uint8 array out, or a clear ImageError."""

from __future__ import annotations

import io
import json
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from services.face.imaging import ImageError, decode_image

from .conftest import encode

pytestmark = pytest.mark.timeout(20)


def image_error(data: bytes, **kwargs: int) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image(data, **kwargs)
    return caught.value


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels and holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


# -- real photos ------------------------------------------------------------------------------


def test_png_decodes_exactly(astronaut: np.ndarray, astronaut_png: bytes) -> None:
    pixels = decode_image(astronaut_png)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (512, 512, 3)
    assert (pixels == astronaut).all()
    assert pixels.flags.writeable


def test_jpeg_decodes_close_to_the_original(astronaut: np.ndarray, astronaut_jpeg: bytes) -> None:
    pixels = decode_image(astronaut_jpeg)
    assert pixels.shape == (512, 512, 3)
    assert np.abs(pixels.astype(int) - astronaut).mean() < 5


@pytest.mark.parametrize(("fmt", "params"), [("GIF", {}), ("BMP", {}), ("WEBP", {"quality": 90})])
def test_other_formats_decode(astronaut: np.ndarray, fmt: str, params: dict[str, int]) -> None:
    pixels = decode_image(encode(Image.fromarray(astronaut), fmt, **params))
    assert pixels.shape == (512, 512, 3)
    assert pixels.dtype == np.uint8


# -- modes ------------------------------------------------------------------------------------


def _palette_image(transparent: bool) -> bytes:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putpixel((1, 0), 1)
    return encode(image, "PNG", **({"transparency": 0} if transparent else {}))


def _image(mode: str, pixels: list[object], fmt: str = "PNG") -> bytes:
    image = Image.new(mode, (len(pixels), 1))
    image.putdata(pixels)  # type: ignore[arg-type]
    return encode(image, fmt)


def _array_image(values: list[float], dtype: type, fmt: str) -> bytes:
    return encode(Image.fromarray(np.array([values], dtype=dtype)), fmt)


MODES = [
    # (mode Pillow opens the file in, file, expected RGB pixels of the first row)
    ("L", _image("L", [0, 100, 255]), [(0, 0, 0), (100, 100, 100), (255, 255, 255)]),
    ("1", _image("1", [0, 1]), [(0, 0, 0), (255, 255, 255)]),
    ("P", _palette_image(transparent=False), [(10, 20, 30), (200, 100, 50)]),
    ("P", _palette_image(transparent=True), [(255, 255, 255), (200, 100, 50)]),
    (
        "RGBA",
        _image("RGBA", [(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)]),
        [(255, 255, 255), (0, 0, 255), (127, 127, 127)],
    ),
    ("LA", _image("LA", [(0, 0), (50, 255)]), [(255, 255, 255), (50, 50, 50)]),
    (
        "CMYK",
        _image("CMYK", [(0, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)], "TIFF"),
        [(255, 255, 255), (255, 0, 0), (0, 0, 0)],
    ),
    (
        "I;16",
        _array_image([0, 65535, 128 * 257, 1000], np.uint16, "PNG"),
        [(0, 0, 0), (255, 255, 255), (128, 128, 128), (4, 4, 4)],
    ),
    (
        "I",
        _array_image([0, 65535, 128 * 257, -5], np.int32, "TIFF"),
        [(0, 0, 0), (255, 255, 255), (128, 128, 128), (0, 0, 0)],
    ),
    (
        "F",
        _array_image([0.0, 300.5, 100.4], np.float32, "TIFF"),
        [(0, 0, 0), (255, 255, 255), (100, 100, 100)],
    ),
]


@pytest.mark.parametrize(("mode", "data", "expected"), MODES, ids=[m[0] for m in MODES])
def test_every_mode_becomes_8_bit_rgb(mode: str, data: bytes, expected: list[object]) -> None:
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really is in that mode

    pixels = decode_image(data)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (1, len(expected), 3)
    assert np.abs(pixels[0].astype(int) - np.array(expected)).max() <= 1


def test_cmyk_jpeg_decodes(astronaut: np.ndarray) -> None:
    data = encode(Image.fromarray(astronaut).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(decode_image(data).astype(int) - astronaut).mean() < 8


# -- orientation ------------------------------------------------------------------------------


def _left_red_right_blue(orientation: int | None) -> bytes:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    if orientation is None:
        return encode(image, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


def test_exif_orientation_is_applied() -> None:
    # Orientation 6: the stored picture is shown turned a quarter clockwise, so its left
    # half (red) is on top and its right half (blue) at the bottom.
    pixels = decode_image(_left_red_right_blue(orientation=6))
    assert pixels.shape == (40, 20, 3)
    top, bottom = pixels[:15].mean(axis=(0, 1)), pixels[25:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2]
    assert bottom[2] > 200 > bottom[0]


def test_picture_without_orientation_stays_as_stored() -> None:
    pixels = decode_image(_left_red_right_blue(orientation=None))
    assert pixels.shape == (20, 40, 3)
    assert pixels[:, :15].mean(axis=(0, 1))[0] > 200


# -- not images -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!doctype html><html><body>Not found</body></html>",
        json.dumps({"error": "not found"}).encode(),
        np.random.default_rng(0).bytes(4096),
    ],
    ids=["empty", "html", "json", "random"],
)
def test_non_images_are_bad_images(data: bytes) -> None:
    error = image_error(data)
    assert error.code == "bad_image"
    assert str(error).startswith("not")


def test_formats_outside_the_list_are_not_opened() -> None:
    # Pillow would open this as EPS and try to run Ghostscript to draw it.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    error = image_error(eps)
    assert error.code == "bad_image"
    assert "cannot identify image file" in str(error)


@pytest.mark.parametrize("fixture", ["astronaut_jpeg", "astronaut_png"])
def test_truncated_images_are_bad_images(fixture: str, request: pytest.FixtureRequest) -> None:
    data: bytes = request.getfixturevalue(fixture)
    error = image_error(data[: len(data) // 2])
    assert error.code == "bad_image"


# -- too many pixels --------------------------------------------------------------------------


def test_header_over_the_limit_is_refused_before_decoding() -> None:
    started = time.monotonic()
    error = image_error(png_header_only(7000, 6000))
    assert error.code == "too_large"
    assert str(error) == (
        "image too large: 7000x6000 is 42000000 pixels, over the limit of 40000000"
    )
    assert time.monotonic() - started < 1


def test_real_blank_image_compressed_small_is_refused() -> None:
    data = encode(Image.new("L", (2000, 2000)), "PNG", optimize=True)
    assert len(data) < 20_000
    assert image_error(data, max_pixels=1_000_000).code == "too_large"
    assert decode_image(data, max_pixels=4_000_000).shape == (2000, 2000, 3)


@pytest.mark.parametrize(
    "size",
    [(100_000, 100_000), (10_000, 10_000)],
    ids=["pillow-bomb-error", "pillow-bomb-warning"],
)
def test_pillow_decompression_bomb_checks_become_image_errors(size: tuple[int, int]) -> None:
    # A limit above Pillow's own lets Pillow's check fire first: its error (over twice its
    # limit) and its warning (over its limit) both come out as too_large, never as a warning.
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as emitted:
        warnings.simplefilter("always")  # as in production, where warnings are not errors
        error = image_error(png_header_only(*size), max_pixels=100_000_000_000)
    assert error.code == "too_large"
    assert "decompression bomb" in str(error)
    assert emitted == []
    assert time.monotonic() - started < 1
