"""Similar images by uploaded image, stored id or text; the classes of an uploaded image."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from functions.api.context import READ, Ctx, linked
from shared.api_models import ImageForm, SearchForm, form_body, json_body, parse_body, search_query
from shared.errors import BadRequest, UnsupportedMediaType
from shared.http import IMAGE_TYPES, content_type, read_body, read_image
from shared.settings import Settings

NO_BODY = 'send a multipart form with an `image` file, JSON with an "id" or a "text", or the image bytes'


def router(settings: Settings) -> APIRouter:
    api = APIRouter(dependencies=READ)
    query = search_query(settings.max_k, settings.max_text_chars)
    body = form_body(SearchForm, IMAGE_TYPES, form=SearchForm.form_schema(), json=json_body(query))
    classify_body = {"requestBody": form_body(ImageForm, IMAGE_TYPES)}

    @api.post("/api/search", summary="Similar images by image, stored id or text", openapi_extra={"requestBody": body})
    async def search(request: Request, ctx: Ctx) -> dict[str, Any]:
        ctype, svc = content_type(request), ctx.service
        if ctype == "application/json":
            q = parse_body(await read_body(request, 64 * 1024), query)
            run = svc.search_text if q.text is not None else svc.search_id
            out = await run_in_threadpool(run, q.text or str(q.id), q.k, q.search_filters)
        elif ctype == "multipart/form-data" or ctype in IMAGE_TYPES:
            data, fields = await read_image(request, settings.max_upload_bytes, max_fields=16, empty_ok=True)
            out = await run_in_threadpool(svc.search_image, data, *SearchForm.read(fields))
        elif not ctype and not await read_body(request, 64 * 1024):
            raise BadRequest(NO_BODY, code="empty_request")
        else:
            raise UnsupportedMediaType(NO_BODY)
        return {**out, "results": linked(out["results"])}

    @api.post("/api/classify", summary="Top classes of an image", openapi_extra=classify_body)
    async def classify(request: Request, ctx: Ctx, top: Annotated[int, Query(ge=1, le=100)] = 5) -> dict[str, Any]:
        data, _ = await read_image(request, settings.max_upload_bytes, max_fields=4)
        out = await run_in_threadpool(ctx.classifier.classify, ctx.service.models, ctx.service.live, data, top)
        return {**out, "neighbours": linked(out["neighbours"])}

    return api
