"""Labels: the next images to label, taking labels, the counts, the label set, the classifier's metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from functions.api.context import READ, WRITE, Ctx, linked
from shared.api_models import LabelSetRequest, LabelsRequest, json_body, load_object
from shared.http import read_body, read_json
from shared.labelling import MAX_QUEUE_N, classifier_summary, label_queue, label_summary, submit_labels
from shared.labels import Strategy, check_user

router = APIRouter()
QueueN = Annotated[int, Query(ge=1, le=MAX_QUEUE_N)]
LABELS, LABEL_SET = {"requestBody": json_body(LabelsRequest)}, {"requestBody": json_body(LabelSetRequest)}


@router.get("/api/label-queue", summary="The next images to label: least certain first", dependencies=READ)
async def get_label_queue(ctx: Ctx, n: QueueN = 20, strategy: Strategy | None = None) -> dict[str, Any]:
    out = await run_in_threadpool(label_queue, ctx.service.live, n, strategy)
    return {**out, "items": linked(out["items"])}


@router.post("/api/labels", summary="Label a batch of images", openapi_extra=LABELS, dependencies=WRITE)
async def post_labels(request: Request, ctx: Ctx) -> JSONResponse:
    body = load_object(await read_body(request, 1024 * 1024))  # each item is checked on its own
    status, out = await run_in_threadpool(submit_labels, ctx.service.live, ctx.queues, body)
    return JSONResponse(out, status_code=status)


@router.get("/api/labels", summary="Label counts per class and the latest labels given", dependencies=READ)
async def get_labels(ctx: Ctx, limit: Annotated[int, Query(ge=0, le=1000)] = 20) -> dict[str, Any]:
    return await run_in_threadpool(label_summary, ctx.service.live, limit)


@router.get("/api/label-set", summary="The classes images may be labelled with", dependencies=READ)
async def get_label_set(ctx: Ctx) -> dict[str, Any]:
    current = await run_in_threadpool(ctx.service.labels.label_set)
    return {"label_set": current.to_json() if current else None}


@router.put("/api/label-set", summary="Define the classes", openapi_extra=LABEL_SET, dependencies=WRITE)
async def put_label_set(request: Request, ctx: Ctx) -> dict[str, Any]:
    body = await read_json(request, LabelSetRequest, 256 * 1024)
    made = await run_in_threadpool(ctx.service.labels.define, body.classes, user=check_user(body.user), source="user")
    return {"label_set": made.to_json()}


@router.get("/api/classifier", summary="The label classifier's metrics, and every retrain's", dependencies=READ)
async def classifier(ctx: Ctx) -> dict[str, Any]:
    return await run_in_threadpool(classifier_summary, ctx.service.live)
