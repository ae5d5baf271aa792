"""Reading request bodies: bounded as they stream in, an image as a multipart form or as raw bytes."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from shared.api_models import M, parse_body
from shared.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from shared.imaging import CONTENT_TYPES

IMAGE_TYPES = sorted(set(CONTENT_TYPES.values()))


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it passes ``max_bytes`` (chunked bodies have no length).

    Raises:
        PayloadTooLarge: if the body is longer.
    """
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the request body is over the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, model: type[M], max_bytes: int) -> M:
    """A JSON body of at most ``max_bytes``, validated by ``model`` (see :func:`shared.api_models.parse_body`)."""
    return parse_body(await read_body(request, max_bytes), model)


async def read_image(
    request: Request, limit: int, max_fields: int, *, empty_ok: bool = False
) -> tuple[bytes, dict[str, Any]]:
    """An image sent as a multipart ``image`` field (with the form's other fields) or as the raw body
    (with the query parameters as fields). ``empty_ok``: an empty image is left to the decoder to refuse.

    Raises:
        PayloadTooLarge, UnsupportedMediaType, BadRequest: an upload too large, of another type, or empty.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 65536:
        raise PayloadTooLarge(f"the request is over the {limit}-byte upload limit")
    ctype = content_type(request)
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=max_fields)
        except Exception:  # noqa: BLE001 - malformed multipart bodies raise assorted parser errors
            raise BadRequest("the multipart body cannot be parsed", code="invalid_multipart") from None
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise BadRequest("the form needs a file in the `image` field", code="missing_image")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"the image is over the {limit}-byte upload limit")
        fields: dict[str, Any] = {k: v for k, v in form.items() if k != "image"}
    elif ctype in IMAGE_TYPES or ctype == "application/octet-stream":
        data, fields = await read_body(request, limit), dict(request.query_params)
    else:
        raise UnsupportedMediaType("send multipart/form-data with an `image` file, or the image bytes")
    if not data and not empty_ok:
        raise BadRequest("the upload is empty", code="empty_upload")
    return data, fields
