"""HTTP plumbing for the function app's API: bodies read bounded as they stream in (an image as a
multipart form or raw bytes, JSON validated by a model), and every error as one JSON shape with a 4xx
status and a stable code (5xx only for our own faults, never with a stack trace).

FastAPI and Starlette are imported here and in ``functions/`` only; the container job never imports
this module (its image has no web framework).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shared.access import API_KEY_HEADER
from shared.api_models import ErrorBody, M, parse_body
from shared.errors import BadRequest, ClusterlensError, PayloadTooLarge, UnsupportedMediaType
from shared.imaging import CONTENT_TYPES
from shared.web import SecurityHeaders

log = logging.getLogger(__name__)
IMAGE_TYPES = sorted(set(CONTENT_TYPES.values()))
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "bad input (the message says which)",
        401: "no valid key for this endpoint",
        403: "the key cannot do this, or write endpoints are closed",
        404: "no such image, job, report or version",
        405: "method not allowed",
        409: "the state does not allow it (no label set, nothing to roll back to, ...)",
        413: "over the upload or body size limit",
        415: "not a supported image or body type",
        503: "not built yet (model, index, classifier)",
    }.items()
}


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


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def handle_errors(app: FastAPI) -> None:
    """Answer every error of ``app`` as ``{"error": {"code", "message"}}``."""

    @app.exception_handler(ClusterlensError)
    async def _clusterlens_error(request: Request, exc: ClusterlensError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        response = error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method the path takes, not only the first matching route's
            matching = [r for r in app.routes if r.matches(request.scope)[0] != Match.NONE]
            response.headers["Allow"] = ", ".join(sorted({m for r in matching for m in getattr(r, "methods", ())}))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        code = f"invalid_{loc[-1]}" if len(loc) == 2 and loc[0] in ("query", "path") else "invalid_request"
        code = {"invalid_image_id": "invalid_id"}.get(code, code)  # the code the id checks have always used
        return error_response(400, code, f"{'.'.join(loc)}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "something went wrong on our side; it has been logged")


def protect(app: FastAPI, cors_origins: list[str]) -> None:
    """Security headers on every response; CORS only for the configured origins (off by default, so
    browsers refuse other origins' calls)."""
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Content-Type", API_KEY_HEADER, "Idempotency-Key"],
            max_age=600,
        )
    app.add_middleware(SecurityHeaders, docs_paths=("/api/docs",))
