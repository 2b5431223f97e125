"""Read a ``POST /predict`` request (Starlette, as under LitServe's FastAPI and Ray Serve) into a Payload.

Accepted bodies:

- one image file as the raw body: ``Content-Type: image/png`` (any ``image/*``) or
  ``application/octet-stream`` (``curl --data-binary @x.png -H 'Content-Type: image/png'``);
- a multipart form with one or more files in the field ``image`` (``curl -F image=@x.png``) and an optional
  text field ``budget``;
- JSON ``{"images": ["<base64>", ...], "budget": 0.5}`` (``Content-Type: application/json``).

The budget may also be a query parameter (``/predict?budget=0.5``). The body is refused from its
``Content-Length`` before it is read, and while it is read, once it passes ``Limits.max_body_bytes``; form
files are kept in memory (nothing is written to disk).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from dmpo_lightning.serve.payload import BadRequest, Limits, Payload, images_from_json, match_budget

__all__ = ["IMAGE_FIELD", "read_body", "read_payload"]

IMAGE_FIELD = "image"
"""Multipart field of the image files."""

_FORM_FIELDS = (IMAGE_FIELD, "budget")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) from its ``Content-Length`` or as soon as it passes ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(400, f"Content-Length {declared!r} is not a number") from None
        if size > max_bytes:
            raise BadRequest(413, f"the request body is {size:,} bytes; at most {max_bytes:,} are allowed")
    chunks = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise BadRequest(413, f"the request body is over {max_bytes:,} bytes, the most allowed")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_form(request: Request, body: bytes, limits: Limits) -> tuple[list[bytes], list[Any], Any]:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        request.headers, stream(), max_files=limits.max_images, max_fields=len(_FORM_FIELDS)
    )
    parser.spool_max_size = max(limits.max_body_bytes, 1)  # form files stay in memory, never on disk
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise BadRequest(400, f"the multipart form cannot be read: {err}") from None
    except Exception as err:  # python-multipart raises its own types on a malformed body
        raise BadRequest(400, f"the multipart form cannot be read ({type(err).__name__}: {err})") from None
    unknown = sorted({k for k in form if k not in _FORM_FIELDS})
    if unknown:
        raise BadRequest(
            400,
            f"unknown form field(s) {unknown}; send the files in {IMAGE_FIELD!r} (and optionally 'budget')",
        )
    files = form.getlist(IMAGE_FIELD)
    if not files:
        raise BadRequest(
            400, f"the form has no {IMAGE_FIELD!r} file field (curl -F {IMAGE_FIELD}=@photo.png)"
        )
    images, names = [], []
    for item in files:
        if not isinstance(item, UploadFile):
            raise BadRequest(400, f"the form field {IMAGE_FIELD!r} must be a file, not a text value")
        images.append(await item.read())
        names.append(item.filename)
    budgets = form.getlist("budget")
    if len(budgets) > 1:
        raise BadRequest(400, "the form gives 'budget' more than once")
    return images, names, (budgets[0] if budgets else None)


async def read_payload(request: Request, limits: Limits, budgets: Sequence[float]) -> Payload:
    """Check and read one request; raises :class:`BadRequest` (status + one sentence) for anything wrong."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    raw = kind.startswith("image/") or kind == "application/octet-stream"
    if not (raw or kind in ("multipart/form-data", "application/json")):
        shown = f"Content-Type {kind!r}" if kind else "no Content-Type"
        raise BadRequest(
            415,
            f"the request has {shown}; send an image file (image/png, image/jpeg, ... or "
            "application/octet-stream), a multipart form with an 'image' file, or application/json",
        )
    body = await read_body(request, limits.max_body_bytes)
    names: list[Any] | None = None
    budget: Any = None
    if raw:
        images = [body]
    elif kind == "multipart/form-data":
        images, names, budget = await _parse_form(request, body, limits)
    else:
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadRequest(400, f"the body is not valid JSON ({err})") from None
        images, budget = images_from_json(parsed, limits)
    if len(images) > limits.max_images:
        raise BadRequest(
            413,
            f"the request holds {len(images)} images; at most {limits.max_images} are allowed per request",
        )
    query = request.query_params.getlist("budget")
    unknown = sorted(set(request.query_params) - {"budget"})
    if unknown:
        raise BadRequest(400, f"unknown query parameter(s) {unknown}; only 'budget' is read")
    if len(query) > 1 or (query and budget is not None and str(budget) != query[0]):
        raise BadRequest(400, "the budget is given twice (query and body); give it once")
    if query:
        budget = query[0]
    chosen = None if budget is None else match_budget(budget, budgets)
    return Payload(images=images, budget=chosen, names=names)
