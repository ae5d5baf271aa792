"""Analysis reports: metrics and files, and the review lists (anomalies, likely mislabels)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from functions.api.context import READ, Ctx, linked
from shared.reports import CONTENT_TYPES, report_file, report_summary, review

router = APIRouter(dependencies=READ)
Version = Annotated[str, PathParam(pattern="^(latest|v[0-9]{6})$")]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]
FILE_TYPES: dict[int | str, dict[str, Any]] = {200: {"content": {t: {} for t in sorted(set(CONTENT_TYPES.values()))}}}


@router.get("/api/reports/{version}", summary="An analysis report's metrics and links to its files")
async def report(version: Version, ctx: Ctx) -> dict[str, Any]:
    out = await run_in_threadpool(report_summary, ctx.storage, version)
    base = f"/api/reports/{out['version']}"
    return {**out, "files": {n: f"{base}/{n}" for n in out["files"]}, "html": f"{base}/report.html"}


@router.get("/api/reports/{version}/{name:path}", summary="A file of an analysis report", responses=FILE_TYPES)
async def report_file_(version: Version, name: Annotated[str, PathParam(max_length=200)], ctx: Ctx) -> Response:
    data, media_type = await run_in_threadpool(report_file, ctx.storage, version, name)
    return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/api/anomalies", summary="The latest report's most isolated images, most isolated first")
async def anomalies(ctx: Ctx, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    out = await run_in_threadpool(review, ctx.service.live, "anomalies", limit, offset)
    return {**out, "items": linked(out["items"])}


@router.get("/api/mislabels", summary="Labels the 10 nearest labelled neighbours confidently disagree with")
async def mislabels(ctx: Ctx, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    out = await run_in_threadpool(review, ctx.service.live, "mislabels", limit, offset)
    return {**out, "items": linked(out["items"])}
