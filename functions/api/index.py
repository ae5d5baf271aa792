"""The index: published versions, rolling back, and the health of the models and index."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from functions.api.context import READ, WRITE, Ctx
from shared.api_models import RollbackRequest, json_body, parse_body
from shared.errors import Conflict, NotReady
from shared.health import health
from shared.http import read_body
from shared.index import index_versions, rollback

router = APIRouter()
ROLLBACK = {"requestBody": json_body(RollbackRequest, required=False)}


@router.get("/api/health", summary="Model and index versions and counts")
async def get_health(ctx: Ctx) -> dict[str, Any]:
    return await run_in_threadpool(health, ctx.service.models, ctx.service.live)


@router.get("/api/index", summary="Published index versions, newest last, and the one queries use", dependencies=READ)
async def get_index(ctx: Ctx) -> dict[str, Any]:
    return await run_in_threadpool(index_versions, ctx.storage)


@router.post("/api/index/rollback", summary="Serve an earlier index", openapi_extra=ROLLBACK, dependencies=WRITE)
async def index_rollback(request: Request, ctx: Ctx) -> dict[str, Any]:
    body = await read_body(request, 4096)
    to = parse_body(body, RollbackRequest).to if body else None  # default: the version before
    try:
        before, after = await run_in_threadpool(rollback, ctx.storage, to)
    except NotReady as exc:  # nothing published, or nothing older: the state, not the server
        raise Conflict(exc.message, code=exc.code) from None
    return {"previous": before, "current": after}
