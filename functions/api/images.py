"""The stored images: read one, add one (the blob trigger's path), delete one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from functions.api.context import READ, WRITE, Ctx, image_url, job_url
from shared.api_models import IMAGE_ID_PATTERN, form_body, parse_fields, upload_form
from shared.catalog import Catalog
from shared.duplicates import ThresholdCache, near_duplicate_of
from shared.http import IMAGE_TYPES, read_image
from shared.imaging import CONTENT_TYPES
from shared.settings import Settings
from shared.uploads import accept_upload, refuse_quarantined

ImageId = Annotated[str, PathParam(pattern=IMAGE_ID_PATTERN, description="an image id (sha256 of its bytes)")]
Responses = dict[int | str, dict[str, Any]]
BYTES: Responses = {200: {"content": {t: {} for t in IMAGE_TYPES}}}
ADDED: Responses = {200: {"description": "already known (same bytes)"}, 201: {"description": "added"}}
FOREVER = {"Cache-Control": "public, max-age=31536000, immutable"}


def router(settings: Settings) -> APIRouter:
    api, writes = APIRouter(), APIRouter(dependencies=WRITE)
    form = upload_form(settings.max_text_chars)
    thresholds = ThresholdCache(settings.index_refresh_seconds)  # the near-duplicate check's threshold
    upload = {"requestBody": form_body(form, IMAGE_TYPES)}

    @api.get("/api/images/{image_id}", summary="The stored image bytes", responses=BYTES, dependencies=READ)
    async def image(image_id: ImageId, ctx: Ctx) -> Response:
        record = await run_in_threadpool(Catalog(ctx.storage).get, image_id)
        data = await run_in_threadpool(Catalog(ctx.storage).image_bytes, record)  # uploads, or its own container
        media_type = CONTENT_TYPES.get(record.format, "application/octet-stream")
        return Response(data, media_type=media_type, headers={**FOREVER, "ETag": f'"{image_id}"'})

    @api.delete("/api/images/{image_id}", summary="Delete an image from storage and search", dependencies=WRITE)
    async def delete_image(image_id: ImageId, ctx: Ctx) -> dict[str, Any]:
        record = await run_in_threadpool(ctx.service.live.delete, image_id)
        return {"deleted": record.id, "source": record.source}

    @writes.post("/api/images", status_code=201, summary="Add an image", openapi_extra=upload, responses=ADDED)
    async def upload_image(request: Request, ctx: Ctx) -> JSONResponse:
        data, fields = await read_image(request, settings.max_upload_bytes, max_fields=8)
        meta = parse_fields(fields, form)
        accepted = await run_in_threadpool(
            accept_upload, ctx.storage, ctx.queues, settings, data, source="api", label=meta.label, caption=meta.caption
        )
        result = refuse_quarantined(accepted.result)
        body: dict[str, Any] = {"id": result.id, "status": result.status, "url": image_url(result.id)}
        if accepted.job is not None:
            body["job"] = {"id": accepted.job.job_id, "url": job_url(accepted.job.job_id)}
        if result.status == "added":
            near = await run_in_threadpool(near_duplicate_of, ctx.service, thresholds, data, result.id)
            if near is not None:  # a warning, not a refusal: the image is stored all the same
                body["near_duplicate"] = {**near, "url": image_url(near["id"])}
        return JSONResponse(body, status_code=201 if result.status == "added" else 200)

    api.include_router(writes)
    return api
