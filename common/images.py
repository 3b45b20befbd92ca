"""Images sent with a request: checked by the API, carried in the job, opened by the worker.

Ollama's API sends images as base64 (``images``); OpenAI's as ``image_url`` content parts,
whose URL is a ``data:`` URL (or an http(s) URL the API fetches first, when allowed: see
api/images.py). The API decodes each one, checks it looks like an image and that the request's
images fit the limits (413 beyond), and puts the base64 text in the job spec, so a job stays
plain JSON in Redis. The worker opens them (Pillow) and hands them to vLLM.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from common.errors import BadRequest

_DATA_URL = re.compile(r"data:(?:image/[\w.+-]+)?;base64,", re.IGNORECASE)
# The first bytes of the formats Pillow reads that people send (WebP: RIFF....WEBP).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
KINDS = "PNG, JPEG, WebP, GIF or BMP"


def _looks_like_an_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def checked(text: str, where: str) -> tuple[str, int]:
    """(the base64 of ``text``, a ``data:`` URL's prefix taken off; the image's size in bytes),
    or a 400 that names ``where`` the image was in the request."""
    if not isinstance(text, str):
        raise BadRequest(f"{where} must be a base64 string")
    match = _DATA_URL.match(text)
    payload = text[match.end():] if match else text
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64; send the image file's bytes base64-encoded") from None
    if not _looks_like_an_image(data):
        raise BadRequest(f"{where} is not a {KINDS} image")
    return payload, len(data)


def is_data_url(url: str) -> bool:
    return bool(_DATA_URL.match(url))


def data_url(data: bytes) -> str:
    return "data:;base64," + base64.b64encode(data).decode("ascii")


def open_image(text: str, index: int) -> Any:
    """A job's image (base64, checked by the API) as a Pillow image, read whole now, so a
    broken file is a 400 here rather than a failure inside the engine."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(base64.b64decode(text)))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"image {index + 1} of the request could not be read ({exc}); send a {KINDS} "
                         "file") from None
    return image.convert("RGB") if image.mode != "RGB" else image
