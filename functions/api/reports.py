"""Analysis reports: metrics and files, and the review lists (anomalies, likely mislabels)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from functions.api.context import READ, Ctx, linked
from shared.errors import NotReady
from shared.reports import CONTENT_TYPES, report_file, report_summary, review_list

router = APIRouter(dependencies=READ)
ReportVersion = Annotated[str, PathParam(pattern="^(latest|v[0-9]{6})$")]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]


@router.get(
    "/api/reports/{version}", summary="An analysis report's metrics and links to its files (`latest` or vNNNNNN)"
)
async def report(version: ReportVersion, ctx: Ctx) -> dict[str, Any]:
    out = await run_in_threadpool(report_summary, ctx.service.storage, version)
    base = f"/api/reports/{out['version']}"
    return {**out, "files": {n: f"{base}/{n}" for n in out["files"]}, "html": f"{base}/report.html"}


@router.get(
    "/api/reports/{version}/{name:path}",
    summary="A file of an analysis report: report.html, metrics.json, maps/<pca|umap|tsne>.json, figures",
    responses={200: {"content": {t: {} for t in sorted(set(CONTENT_TYPES.values()))}}},
)
async def report_file_(version: ReportVersion, name: Annotated[str, PathParam(max_length=200)], ctx: Ctx) -> Response:
    data, media_type = await run_in_threadpool(report_file, ctx.service.storage, version, name)
    return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})


def _review(ctx: Ctx, kind: str, limit: int, offset: int) -> dict[str, Any]:
    try:
        ctx.service.index()  # the labels now, where an index is served
        label_of: Any = ctx.service.live.label_of
    except NotReady:
        label_of = None
    out = review_list(ctx.service.storage, kind, limit, offset, label_of)
    return {**out, "items": linked(out["items"])}


@router.get("/api/anomalies", summary="The latest report's most isolated images, most isolated first")
async def anomalies(ctx: Ctx, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    return await run_in_threadpool(_review, ctx, "anomalies", limit, offset)


@router.get("/api/mislabels", summary="Labels the 10 nearest labelled neighbours confidently disagree with")
async def mislabels(ctx: Ctx, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    return await run_in_threadpool(_review, ctx, "mislabels", limit, offset)
