"""Step 1, download: fetch a job's image and decode it into an RGB array.

A job's payload names its image one of two ways:

- ``{"image_url": "https://..."}``: http, https or a ``data:`` URI, fetched by
  `services.face.fetch` (only public addresses unless ``BLUEENGINE_FETCH_ALLOW_NETS`` or the
  ``allow_nets`` option lists more networks; no credentials in URLs; redirects checked again).
- ``{"image_b64": "..."}``: the file itself, base64-encoded (a ``data:`` URI is accepted too);
  this is how a file uploaded to the gateway arrives.

``{"embedding": true}`` in the payload adds each face's 128-value embedding to its result.

Options (the step's config) and their defaults:

=================  ============  ==============================================================
max_bytes          20 MiB        file size, counted on bytes received (and decoded, for gzip)
max_pixels         40 000 000    width x height, checked from the header before decoding
max_redirects      5
connect_timeout_s  5             per address tried
read_timeout_s     10            waiting for any data
total_timeout_s    30            the whole fetch, redirects included
allow_nets         None          comma-separated CIDR networks that may be fetched although not
                                 public; None reads ``BLUEENGINE_FETCH_ALLOW_NETS``
=================  ============  ==============================================================

Failures fail the job with an error ``code``: ``url_refused`` (scheme, credentials, or an
address that is not public), ``fetch_failed`` (connection, HTTP status, timeout, redirect loop),
``too_large`` (bytes or pixels over the limit), ``bad_image`` (not a decodable image) and
``bad_payload`` (no image named, or a field of the wrong type).

The engine runs this step with ``concurrency=4``: fetching waits on the network, and Pillow
releases the GIL while it decodes, so four downloads overlap in one process.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from blueengine import Context
from services.face.fetch import ALLOW_NETS_ENV, FetchLimits, Network, fetch, parse_allow_nets
from services.face.imaging import BAD_IMAGE, TOO_LARGE, ImageError, decode_image
from services.face.steps import settings
from services.face.steps.items import Meta

logger = logging.getLogger(__name__)

BAD_PAYLOAD = "bad_payload"

DEFAULTS: Mapping[str, Any] = {
    "max_bytes": FetchLimits.max_bytes,
    "max_pixels": 40_000_000,
    "max_redirects": FetchLimits.max_redirects,
    "connect_timeout_s": FetchLimits.connect_timeout_s,
    "read_timeout_s": FetchLimits.read_timeout_s,
    "total_timeout_s": FetchLimits.total_timeout_s,
    "allow_nets": None,
}

_SHOWN_URL_CHARS = 200


class PayloadError(Exception):
    """Raised when a job's payload does not name an image the way this step reads it."""

    code = BAD_PAYLOAD


@dataclass(frozen=True)
class Downloader:
    """The step's resources: its limits, and the networks allowed beyond public ones."""

    limits: FetchLimits
    max_pixels: int
    allow_nets: tuple[Network, ...]


def setup(context: Context) -> Downloader:
    """Check the options once per process; a bad option stops the step from starting."""
    options = settings(context.step, context.config, DEFAULTS)
    limits = FetchLimits(
        max_redirects=options["max_redirects"],
        max_bytes=options["max_bytes"],
        connect_timeout_s=options["connect_timeout_s"],
        read_timeout_s=options["read_timeout_s"],
        total_timeout_s=options["total_timeout_s"],
    )
    if options["max_pixels"] < 1:
        raise ValueError(f"step {context.step!r}: max_pixels must be positive")
    nets_text = options["allow_nets"]
    if nets_text is None:
        nets_text = os.environ.get(ALLOW_NETS_ENV, "")
    nets = tuple(parse_allow_nets(nets_text))
    if nets:
        logger.info("Fetching is allowed from %s besides public addresses.", nets_text)
    return Downloader(limits, options["max_pixels"], nets)


def download(context: Context, input: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Fetch and decode the job's image; forward ``(image, meta)``."""
    resources: Downloader = context.resources
    field, source, embedding = _parse_payload(input["Control"])
    if field == "image_b64" and source.lstrip()[:5].lower() != "data:":
        shown, data = "image_b64", _decode_base64(source, resources.limits.max_bytes)
    else:
        shown, data = _shown(source), fetch(source, resources.limits, resources.allow_nets)

    image = decode_image(data, resources.max_pixels)
    height, width = image.shape[:2]
    meta: Meta = {
        "url": shown,
        "width": width,
        "height": height,
        "bytes": len(data),
        "embedding": embedding,
    }
    message = f"downloaded a {width}x{height} image of {len(data)} bytes"
    yield {"forward": (image, meta), "Status": {"type": "message", "message": message}}


def _parse_payload(payload: object) -> tuple[str, str, bool]:
    """Which field names the image, its text, and whether the embedding is wanted."""
    if not isinstance(payload, Mapping):
        raise PayloadError(
            "a job's payload must be an object with image_url or image_b64, "
            f"not {type(payload).__name__}"
        )
    url, inline = payload.get("image_url"), payload.get("image_b64")
    if (url is None) == (inline is None):
        raise PayloadError("a job's payload needs exactly one of image_url and image_b64")
    field, value = ("image_url", url) if url is not None else ("image_b64", inline)
    if not isinstance(value, str):
        raise PayloadError(f"{field} must be a string, not {type(value).__name__}")
    embedding = payload.get("embedding", False)
    if not isinstance(embedding, bool):
        raise PayloadError(f"embedding must be true or false, not {embedding!r:.40}")
    return field, value, embedding


def _decode_base64(text: str, max_bytes: int) -> bytes:
    encoded = re.sub(r"\s+", "", text)
    if len(encoded) // 4 * 3 > max_bytes:
        raise ImageError(TOO_LARGE, f"image_b64 is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as exc:
        raise ImageError(BAD_IMAGE, f"image_b64 is not valid base64 ({exc})") from None


def _shown(url: str) -> str:
    """The URL as results show it: a data: URI by its media type only, long URLs cut."""
    url = url.strip()
    if url[:5].lower() == "data:":
        return url.partition(",")[0] + ",..."
    return url if len(url) <= _SHOWN_URL_CHARS else url[: _SHOWN_URL_CHARS - 3] + "..."
