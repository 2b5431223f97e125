"""What an HTTP request to ``POST /predict`` may hold, checked in one sentence each (no web framework here).

The HTTP front ends (LitServe, Ray Serve) read the body (``serve.http``) and hand this module raw bytes or
parsed JSON; everything that can be refused is refused here, before any image is decoded where possible:

- :func:`match_budget`: the operating point a request asks for (one of the artefact's calibrated budgets, or
  ``full`` for the whole network without early exits);
- :func:`images_from_json`: the JSON batch ``{"images": ["<base64>", ...], "budget": 0.5}``;
- :func:`decode_image`: bytes -> the model's input tensor, with the pixel limit checked from the image header
  before the pixels are decoded, then the package's one image decoder (16-bit and float images scaled to the
  training range, non-finite pixels refused) and the artefact's preprocessing.

Every refusal is a :class:`BadRequest` with the HTTP status to answer and one sentence.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from dmpo_lightning import images
from dmpo_lightning.images import DEFAULT_MAX_PIXELS, ImageError

__all__ = [
    "FULL",
    "BadRequest",
    "Limits",
    "Payload",
    "decode_image",
    "images_from_json",
    "match_budget",
    "parse_budget",
]

FULL = "full"
"""The budget name that runs the whole network (every block, last exit only): the baseline to compare with."""


class BadRequest(ValueError):
    """A request the server refuses: ``status`` is the HTTP status, the message one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may hold.

    Attributes:
        max_body_bytes: Largest request body (the body is refused before it is read past this size).
        max_images: Most images in one request (a JSON batch or a multipart form).
        max_pixels: Largest width x height of one image, checked from the header before decoding.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Payload:
    """A request as the inference worker receives it (picklable): the encoded images and the budget.

    Attributes:
        images: The encoded image files (PNG, JPEG, ...), in request order.
        budget: A calibrated budget of the artefact, :data:`FULL`, or ``None`` for the server's default.
        names: A name per image (the multipart file name), ``None`` where there is none.
    """

    images: list[bytes]
    budget: float | str | None = None
    names: list[str | None] | None = None


def parse_budget(value: Any) -> float | str:
    """A budget as a request writes it (a number, or a string such as ``"0.5"`` or ``"full"``).

    Raises:
        BadRequest: 400 if it is neither a number nor ``full``.
    """
    if isinstance(value, str) and value.strip().lower() == FULL:
        return FULL
    if isinstance(value, bool):
        raise BadRequest(400, f"budget must be a number or {FULL!r}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(400, f"budget must be a number or {FULL!r}, got {value!r}") from None
    if not math.isfinite(number):
        raise BadRequest(400, f"budget must be a finite number or {FULL!r}, got {value!r}")
    return number


def match_budget(value: Any, budgets: Sequence[float]) -> float | str:
    """The artefact's budget that ``value`` names (equal up to float rounding), or :data:`FULL`.

    Raises:
        BadRequest: 400 naming the budgets the artefact has thresholds for.
    """
    wanted = parse_budget(value)
    if wanted == FULL:
        return FULL
    assert isinstance(wanted, float)
    for b in budgets:
        if abs(float(b) - wanted) <= 1e-9 * max(1.0, abs(wanted)):
            return float(b)
    raise BadRequest(
        400,
        f"the artefact has no thresholds for budget {value!r}; ask for one of "
        f"{[float(b) for b in budgets]} or {FULL!r} (the whole network)",
    )


def images_from_json(body: Any, limits: Limits) -> tuple[list[bytes], Any]:
    """``{"images": ["<base64>", ...], "budget": b}`` (or ``"image": "<base64>"``) -> (image bytes, budget).

    Raises:
        BadRequest: 400 for another structure, an entry that is not base64 or an empty list; 413 for more
            than ``limits.max_images`` images.
    """
    if not isinstance(body, Mapping):
        raise BadRequest(
            400,
            'a JSON request must be an object {"images": ["<base64 image file>", ...], "budget": 0.5}, '
            f"got a JSON {type(body).__name__}",
        )
    unknown = sorted(set(body) - {"images", "image", "budget"})
    if unknown:
        raise BadRequest(
            400, f'unknown JSON field(s) {unknown}; a request holds "images" (or "image") and "budget"'
        )
    if "images" in body and "image" in body:
        raise BadRequest(400, 'give either "images" (a list) or "image" (one), not both')
    if "image" in body:
        items: Any = [body["image"]]
    elif "images" in body:
        items = body["images"]
    else:
        raise BadRequest(400, 'the JSON request has no "images" list of base64-encoded image files')
    if not isinstance(items, list) or not items:
        raise BadRequest(400, '"images" must be a non-empty list of base64-encoded image files')
    if len(items) > limits.max_images:
        raise BadRequest(
            413, f"the request holds {len(items)} images; at most {limits.max_images} are allowed per request"
        )
    images = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadRequest(400, f"image {i} is a JSON {type(item).__name__}, not a base64 string")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"image {i} is not valid base64 (standard alphabet, padded)") from None
    return images, body.get("budget")


def _check_header(data: bytes, where: str, max_pixels: int) -> None:
    """Refuse what is not an image at all (400) or has too many pixels (413), from the header alone."""
    if not data:
        raise BadRequest(400, f"{where} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit follows
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                width, height = probe.size
    except UnidentifiedImageError:
        raise BadRequest(
            400, f"{where} is not an image file PIL can read (send PNG, JPEG, BMP, GIF, TIFF or WebP)"
        ) from None
    except Image.DecompressionBombError:
        raise BadRequest(
            413, f"{where} has more pixels than PIL decodes; at most {max_pixels:,} are allowed"
        ) from None
    except Exception:  # a broken header: the decoder below says what is wrong
        return
    if width * height > max_pixels:
        raise BadRequest(
            413,
            f"{where} is {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} are allowed "
            "(resize it first)",
        )


def decode_image(
    data: bytes,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    max_pixels: int,
    where: str = "the image",
) -> torch.Tensor:
    """Bytes of one image file -> the model's normalised input ``[C, H, W]`` (the artefact's transform).

    Decoding is the package's one image decoder (:func:`dmpo_lightning.images.decode_image`: 16-bit and
    float images scaled to the training range, non-finite pixels refused), as for ``dmpo predict``.

    Raises:
        BadRequest: 400 (not an image), 413 (more than ``max_pixels`` pixels, from the header) or 422 (a
            truncated file, pixels outside the range a mode allows, non-finite pixels, a size the model
            cannot take).
    """
    _check_header(data, where, max_pixels)
    try:
        image, _ = images.decode_image(data, max_pixels=max_pixels)
        x = transform(image)
    except ImageError as err:
        text = str(err)
        for start in ("the image ", "image ", "the file ", "the upload "):
            if text.startswith(start):
                text = text[len(start) :]
                break
        raise BadRequest(422, f"{where} {text}") from None
    if not bool(torch.isfinite(x).all()):
        raise BadRequest(422, f"{where} gives non-finite model inputs (NaN or infinity)")
    return x
