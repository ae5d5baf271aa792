"""Near-duplicates: the latest groups, resolving one (keep an image, hide the rest from search), undoing it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from functions.api.context import READ, WRITE, Ctx, linked
from shared.api_models import ResolveRequest, json_body, parse_body
from shared.duplicates import groups_page, resolve, unresolve
from shared.http import read_body
from shared.labels import check_user

router = APIRouter()
Group = Annotated[str, PathParam(max_length=64)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]
RESOLVE = {"requestBody": json_body(ResolveRequest, required=False)}


@router.get("/api/duplicates", summary="Groups of near-duplicate images, largest first", dependencies=READ)
async def duplicates(ctx: Ctx, limit: Limit = 20, offset: Offset = 0) -> dict[str, Any]:
    out = await run_in_threadpool(groups_page, ctx.storage, limit, offset)
    return {**out, "items": [{**g, "images": linked(g["images"])} for g in out["items"]]}


@router.post(
    "/api/duplicates/{group}/resolve",
    summary="Keep one image, hide the others",
    openapi_extra=RESOLVE,
    dependencies=WRITE,
)
async def resolve_group(group: Group, request: Request, ctx: Ctx) -> dict[str, Any]:
    data = await read_body(request, 4096)
    body = parse_body(data, ResolveRequest) if data.strip() else ResolveRequest()
    out = await run_in_threadpool(resolve, ctx.storage, group, body.keep, check_user(body.user))
    await run_in_threadpool(ctx.service.live.refresh_hidden)
    return out


@router.post("/api/duplicates/{group}/unresolve", summary="Show a resolved group's images again", dependencies=WRITE)
async def unresolve_group(group: Group, ctx: Ctx) -> dict[str, Any]:
    out = await run_in_threadpool(unresolve, ctx.storage, group)
    await run_in_threadpool(ctx.service.live.refresh_hidden)
    return out
