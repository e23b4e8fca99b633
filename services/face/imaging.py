"""Turn downloaded bytes into the RGB array that the face engine works on.

:func:`decode_image` returns a ``numpy.ndarray`` of shape (height, width, 3) and dtype uint8,
as the detector expects, whatever the file held:

- Formats: JPEG (MPO included), PNG, GIF, BMP, TIFF and WebP only. Pillow knows more formats, some
  of which run external programs (EPS runs Ghostscript); a downloaded file has no business there.
  Of an animation or a multi-page file, the first frame is decoded.
- Size: the pixel count is read from the header and checked against ``max_pixels`` before any
  pixel is decoded. Pillow's own decompression-bomb warning and error become ``too_large``.
- Orientation: the EXIF Orientation tag is applied, so the array is upright as a viewer shows it.
- Colour: grayscale (L, 1), palette (P), CMYK and YCbCr become RGB. Transparency (RGBA, LA, PA
  and palettes with a transparent colour) is composited onto white: dropping the alpha channel
  instead would show whatever colour the transparent pixels happen to store, often black.
  16-bit gray (I;16 and the I mode that Pillow uses for 16-bit files) is scaled from 0-65535
  down to 0-255; floating point (F) is clipped to 0-255. ICC profiles are ignored.

Failures raise :class:`ImageError` with ``code`` ``bad_image`` (not an image, truncated or
corrupt) or ``too_large`` (over the pixel limit).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BAD_IMAGE", "DECODED_FORMATS", "TOO_LARGE", "ImageError", "decode_image"]

BAD_IMAGE = "bad_image"
TOO_LARGE = "too_large"

DECODED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

# Pillow reports a corrupt or truncated file through any of these, depending on the format.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
)


class ImageError(Exception):
    """Raised when bytes are not a decodable image or hold too many pixels."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode ``data`` into an upright RGB uint8 array of shape (height, width, 3).

    Example::

        rgb = decode_image(fetch(job["image_url"]))
        height, width, _ = rgb.shape
    """
    if not data:
        raise ImageError(BAD_IMAGE, "not an image: no bytes")

    # catch_warnings swaps the process-wide filter list: a thread decoding alongside may see
    # this filter too, which only turns another decompression-bomb warning into an error.
    with warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning):
        try:
            return _decode(data, max_pixels)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageError(TOO_LARGE, f"image too large: {exc}") from None
        except UnidentifiedImageError:
            # Pillow's own message names the BytesIO object by its address: noise in a job error.
            formats = ", ".join(DECODED_FORMATS)
            reason = f"cannot identify image file as one of {formats}"
            raise ImageError(BAD_IMAGE, f"not a decodable image: {reason}") from None
        except _DECODE_ERRORS as exc:
            raise ImageError(BAD_IMAGE, f"not a decodable image: {exc}") from None


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=DECODED_FORMATS) as image:
        width, height = image.size
        if width * height > max_pixels:
            reason = f"{width}x{height} is {width * height} pixels, over the limit of {max_pixels}"
            raise ImageError(TOO_LARGE, f"image too large: {reason}")
        if width == 0 or height == 0:
            raise ImageError(BAD_IMAGE, f"image has no pixels ({width}x{height})")
        image.load()
        upright = ImageOps.exif_transpose(image)
        return np.array(_to_rgb(upright), dtype=np.uint8)  # a writable copy, unlike asarray


def _to_rgb(image: Image.Image) -> Image.Image:
    """The same picture in mode RGB, with 8 bits per channel."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((gray + 128) // 257).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return image.convert("L").convert("RGB")
    if image.mode == "P" and image.has_transparency_data:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
