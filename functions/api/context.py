"""What every route gets: the app's runtime, the access guards, and links (the one place URLs are built)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from shared.access import API_KEY_HEADER, check_access
from shared.runtime import Runtime

KEY_COOKIE = "clusterlens-key"  # the page's key for <img> requests; read level only
WRITE_KEY = APIKeyHeader(name=API_KEY_HEADER, scheme_name="writeKey", auto_error=False, description="The write key")


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


Ctx = Annotated[Runtime, Depends(_runtime)]


async def _read(request: Request, ctx: Ctx) -> None:
    check_access(ctx.settings, request.headers, "read", request.cookies.get(KEY_COOKIE))


async def _write(request: Request, ctx: Ctx, _key: str | None = Security(WRITE_KEY)) -> None:
    check_access(ctx.settings, request.headers, "write")  # Security() documents the key in the schema


READ, WRITE = [Depends(_read)], [Depends(_write)]


def image_url(image_id: str) -> str:
    return f"/api/images/{image_id}"


def job_url(job_id: str) -> str:
    return f"/api/jobs/{job_id}"


def linked(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items that name an image (``id``), each with the image's ``url``."""
    return [{**item, "url": image_url(item["id"])} for item in items]
