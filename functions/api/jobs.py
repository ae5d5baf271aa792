"""Jobs: start one (reindex, retrain, train_head, analyse, embed, ingest_container, dedupe), follow it, list
the recent ones."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from functions.api.context import READ, WRITE, Ctx, job_url
from shared.api_models import json_body
from shared.http import read_json
from shared.jobs import JOB_ID_PATTERN, JobRecord, JobRequest, JobStore, check_job, enqueue

router = APIRouter()
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, max_length=120)]
JOB = {"requestBody": json_body(JobRequest)}


def _job(record: JobRecord) -> dict[str, Any]:
    return {**record.model_dump(mode="json"), "url": job_url(record.job_id)}


@router.post("/api/jobs", status_code=202, summary="Start a job", openapi_extra=JOB, dependencies=WRITE)
async def start_job(request: Request, ctx: Ctx) -> JSONResponse:
    message = (await read_json(request, JobRequest, 16 * 1024)).message(request.headers.get("idempotency-key"))
    await run_in_threadpool(check_job, ctx.storage, message)  # e.g. 400 for one of our own containers, now
    record, queued = await run_in_threadpool(enqueue, ctx.storage, ctx.queues, message)
    body = {"job": _job(record), "queued": queued}
    return JSONResponse(body, status_code=202, headers={"Location": job_url(record.job_id)})


@router.get("/api/jobs/{job_id}", summary="A job's status, progress, timings and errors", dependencies=READ)
async def job_status(job_id: JobId, ctx: Ctx) -> dict[str, Any]:
    return _job(await run_in_threadpool(JobStore(ctx.storage).get, job_id))


@router.get("/api/jobs", summary="Recent jobs, newest first", dependencies=READ)
async def jobs(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    return {"jobs": [_job(r) for r in await run_in_threadpool(JobStore(ctx.storage).recent, limit)]}
