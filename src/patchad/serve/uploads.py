"""Reading a multipart request of ``patchad serve``: the body bounded in size, uploads kept in
memory (never spooled to disk), and the OpenAPI schemas of the multipart routes."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

#: Most files (and most text fields) in one request.
MAX_FILES = 256


class _InMemoryParser(MultiPartParser):
    """Starlette's multipart parser with uploads kept in memory: the body is already bounded by
    ``max_upload_mb``, and an upload is never spooled to disk."""

    spool_max_size = 1 << 62


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """The request body, refused with 413 past ``limit`` bytes."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise HTTPException(413, f"upload larger than {limit / 2**20:g} MB (--max-upload-mb)")
        yield chunk


async def read_form(request: Request, limit: int) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """The uploads (name, bytes) and text fields of a multipart body of at most ``limit``
    bytes: 413 past it, 422 when not multipart or without a file."""
    too_big = f"upload larger than {limit / 2**20:g} MB (--max-upload-mb)"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPException(413, too_big)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(422, "send the images as multipart/form-data files")
    try:
        form = await _InMemoryParser(
            request.headers,
            _limited(request.stream(), limit),
            max_files=MAX_FILES,
            max_fields=MAX_FILES,
        ).parse()
    except MultiPartException as exc:
        raise HTTPException(422, f"bad multipart body: {exc.message}") from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    if not files:
        raise HTTPException(422, "no image in the request (send multipart/form-data files)")
    uploads = [(f.filename or f"image_{i}", await f.read()) for i, f in enumerate(files)]
    await form.close()
    return uploads, fields


def _form(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": schema}},
        }
    }


IMAGES_SCHEMA = {"type": "array", "items": {"type": "string", "format": "binary"}}
MULTIPART = _form({"files": IMAGES_SCHEMA}, ["files"])
FEEDBACK = _form(
    {
        "files": {"type": "string", "format": "binary"},
        "label": {"type": "string", "enum": ["good", "defect"]},
        "note": {"type": "string"},
    },
    ["files", "label"],
)
