"""The HTTP API: one FastAPI app, served by ``func.AsgiFunctionApp`` in Azure and uvicorn locally.

Routes live in :mod:`functions.api`, one router per resource; errors leave as one JSON shape
(:func:`shared.http.handle_errors`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from functions.api import duplicates, images, index, jobs, labels, reports, search
from shared import __version__
from shared.access import API_KEY_HEADER
from shared.http import ERROR_RESPONSES, handle_errors, protect
from shared.queues import JobQueues
from shared.runtime import Runtime
from shared.search import SearchService
from shared.settings import Settings, get_settings
from shared.web import page_csp

STATIC = Path(__file__).parent / "static"


def create_app(
    service: SearchService | None = None, settings: Settings | None = None, queues: JobQueues | None = None
) -> FastAPI:
    """Build the API. ``service``, ``settings`` and ``queues`` are injectable; by default they load lazily."""
    configured = settings or (service.settings if service else get_settings())
    app = FastAPI(
        title="clusterlens",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        description="Search, map and label a large image collection. Write endpoints need the write key in the "
        f"`{API_KEY_HEADER}` header; read endpoints need the read key only where one is configured.",
        responses=ERROR_RESPONSES,
    )
    app.state.runtime = Runtime(configured, queues=queues, service=service)
    protect(app, configured.cors_origins)
    for router in (index.router, search.router(configured), images.router(configured), jobs.router, labels.router):
        app.include_router(router)
    app.include_router(reports.router)
    app.include_router(duplicates.router)
    handle_errors(app)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = _page_html()
        return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html), "Cache-Control": "no-cache"})

    return app


@lru_cache(maxsize=1)
def _page_html() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")
