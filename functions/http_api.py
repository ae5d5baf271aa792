"""The HTTP API: one FastAPI app, served by ``func.AsgiFunctionApp`` in Azure and uvicorn locally.

The routes live in :mod:`functions.api`, one router per resource; this module assembles them with
the middleware and the error handlers. Every error leaves as ``{"error": {"code": ..., "message": ...}}``
with a 4xx status (5xx only for our own faults, and never with a stack trace).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from functions.api import images, index, jobs, labels, reports, search
from functions.api.context import Context
from shared import __version__
from shared.access import API_KEY_HEADER
from shared.api_models import ErrorBody
from shared.errors import ClusterlensError
from shared.queues import JobQueue
from shared.search import SearchService
from shared.settings import Settings, get_settings
from shared.web import SecurityHeaders, page_csp

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
ERRORS = {
    400: "bad input (the message says which)",
    401: "no valid key for this endpoint",
    403: "the key cannot do this, or write endpoints are closed",
    404: "no such image, job, report or version",
    405: "method not allowed",
    409: "the state does not allow it (no label set, nothing to roll back to, ...)",
    413: "over the upload or body size limit",
    415: "not a supported image or body type",
    503: "not built yet (model, index, classifier)",
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(
    service: SearchService | None = None, settings: Settings | None = None, queue: JobQueue | None = None
) -> FastAPI:
    """Build the API. ``service``, ``settings`` and ``queue`` are injectable; by default they load lazily."""
    configured = settings or (service.settings if service else get_settings())
    app = FastAPI(
        title="clusterlens",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        description="Search, map and label a large image collection. Write endpoints need the write key in the "
        f"`{API_KEY_HEADER}` header; read endpoints need the read key only where one is configured.",
        responses={status: {"model": ErrorBody, "description": text} for status, text in ERRORS.items()},
    )
    app.state.context = Context(configured, service, queue)
    if configured.cors_origins:  # off unless configured: browsers then refuse other origins' calls
        app.add_middleware(
            CORSMiddleware,
            allow_origins=configured.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Content-Type", API_KEY_HEADER, "Idempotency-Key"],
            max_age=600,
        )
    app.add_middleware(SecurityHeaders, docs_paths=("/api/docs",))
    for router in (index.router, search.router(configured), images.router(configured), jobs.router):
        app.include_router(router)
    app.include_router(labels.router)
    app.include_router(reports.router)
    _handle_errors(app)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = _page_html()
        return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html), "Cache-Control": "no-cache"})

    return app


def _handle_errors(app: FastAPI) -> None:
    """Every error as the one JSON shape with a stable code."""

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


@lru_cache(maxsize=1)
def _page_html() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")
