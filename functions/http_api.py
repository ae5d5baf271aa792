"""The HTTP API: one FastAPI app, served by ``func.AsgiFunctionApp`` in Azure and uvicorn locally.

Handlers parse and validate input, call ``shared``, and shape the response. Every error leaves as
``{"error": {"code": ..., "message": ...}}`` with a 4xx status (5xx only for our own faults).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import __version__
from shared.catalog import Catalog, check_image_id
from shared.errors import BadRequest, ClusterlensError, NotReady, PayloadTooLarge, UnsupportedMediaType
from shared.filters import FIELDS, SearchFilters, parse_filters
from shared.imaging import CONTENT_TYPES
from shared.jobs import JobRecord, JobStore, api_job, check_job_id, enqueue
from shared.labelling import classifier_summary, label_queue, label_summary, submit_labels
from shared.labels import check_user
from shared.queues import JobQueue, open_queue
from shared.reports import CONTENT_TYPES as REPORT_TYPES
from shared.reports import Classifier, report_file, report_summary, review_list
from shared.search import SearchService
from shared.settings import Settings, get_settings
from shared.storage import UPLOADS
from shared.uploads import accept_upload, clean_label

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

FILTERS_SCHEMA = {
    "type": "object",
    "description": "only results meeting every condition",
    "properties": {
        "label": {"type": "string", "description": "the image's label"},
        "labelled": {"type": "boolean", "description": "true: labelled images only; false: unlabelled only"},
        "predicted": {"type": "string", "description": "the label classifier's predicted class"},
        "cluster": {"type": "integer", "minimum": 0, "description": "the image's cluster"},
        "imagenet_class": {"type": "integer", "minimum": 0, "maximum": 999, "description": "predicted top-1 class"},
        "ingested_after": {"type": "string", "format": "date-time"},
        "ingested_before": {"type": "string", "format": "date-time"},
    },
}


def _image_body(**fields: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI request body: a multipart form with an ``image`` file and ``fields``, or raw image bytes."""
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "the image"},
                        **fields,
                    },
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(set(CONTENT_TYPES.values()))},
        },
    }


UPLOAD_BODY = _image_body(
    label={"type": "string", "maxLength": 100, "description": "its label (optional)"},
    caption={"type": "string", "maxLength": 2000, "description": "a caption (optional)"},
)
CLASSIFY_BODY = _image_body()
SEARCH_BODY = _image_body(
    k={"type": "integer", "minimum": 1, "description": "number of results"},
    **{name: {"type": "string", "description": f"filter: {name}"} for name in FIELDS},
)
SEARCH_BODY["content"]["application/json"] = {
    "schema": {
        "type": "object",
        "description": "exactly one of `id` (similar images) or `text` (text-to-image)",
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "a stored image id"},
            "text": {"type": "string", "maxLength": 500, "description": "a text query"},
            "k": {"type": "integer", "minimum": 1},
            "filters": FILTERS_SCHEMA,
        },
    }
}
# Parameters each job kind takes over HTTP: name -> (type, min, max).
API_JOB_PARAMS: dict[str, dict[str, tuple[type, float, float]]] = {
    "reindex": {"force": (bool, 0, 1)},
    "retrain": {"epochs": (int, 1, 200), "seed": (int, 0, 2**31 - 1)},
    "train_head": {
        "epochs": (int, 1, 200),
        "batch_size": (int, 8, 8192),
        "lr": (float, 1e-6, 1.0),
        "seed": (int, 0, 2**31 - 1),
    },
    "analyse": {"k": (int, 0, 4096), "map_sample": (int, 100, 200_000)},
    "embed": {"all": (bool, 0, 1)},
}


LABELS_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["labels"],
                "properties": {
                    "labels": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["id", "label"],
                            "properties": {
                                "id": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                "label": {"type": "string", "maxLength": 100},
                            },
                        },
                    },
                    "user": {"type": "string", "maxLength": 64, "description": "who labels (default anonymous)"},
                },
            }
        }
    },
}
LABEL_SET_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["classes"],
                "properties": {
                    "classes": {"type": "array", "items": {"type": "string", "maxLength": 100}, "minItems": 1},
                    "user": {"type": "string", "maxLength": 64},
                },
            }
        }
    },
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(
    service: SearchService | None = None, settings: Settings | None = None, queue: JobQueue | None = None
) -> FastAPI:
    """Build the API. ``service``, ``settings`` and ``queue`` are injectable; by default they load lazily."""
    app = FastAPI(
        title="clusterlens",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        description="Search, map and label a large image collection.",
    )

    @lru_cache(maxsize=1)
    def get_service() -> SearchService:
        return service or SearchService(settings or get_settings())

    @lru_cache(maxsize=1)
    def get_classifier() -> Classifier:
        return Classifier(get_service().storage, get_service().settings)

    @lru_cache(maxsize=1)
    def get_queue() -> JobQueue:
        svc = get_service()
        return queue or open_queue(svc.settings, svc.settings.queue_name)

    @app.exception_handler(ClusterlensError)
    async def _clusterlens_error(request: Request, exc: ClusterlensError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "something went wrong on our side; it has been logged")

    @app.get("/api/health", summary="Model and index versions and counts")
    async def health() -> dict[str, Any]:
        return await run_in_threadpool(get_service().health)

    @app.post(
        "/api/search",
        summary="Similar images by uploaded image or stored id",
        openapi_extra={"requestBody": SEARCH_BODY},
    )
    async def search(request: Request) -> dict[str, Any]:
        svc = get_service()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > svc.settings.max_upload_bytes + 65536:
            raise PayloadTooLarge(f"the request is over the {svc.settings.max_upload_bytes}-byte upload limit")
        if ctype == "multipart/form-data":
            data, k, filters = await _read_multipart(request, svc.settings.max_upload_bytes)
            return await run_in_threadpool(svc.search_image, data, k, filters)
        if ctype == "application/json":
            kind, value, k, filters = _read_json_query(await _read_body(request, 64 * 1024))
            if kind == "text":
                return await run_in_threadpool(svc.search_text, value, k, filters)
            return await run_in_threadpool(svc.search_id, value, k, filters)
        if ctype in CONTENT_TYPES.values():
            filters = parse_filters({n: v for n, v in request.query_params.items() if n in FIELDS})
            data = await _read_body(request, svc.settings.max_upload_bytes)
            return await run_in_threadpool(svc.search_image, data, _parse_k(request.query_params.get("k")), filters)
        if not ctype and not await _read_body(request, 64 * 1024):
            raise BadRequest(
                'empty request: send a multipart form with an `image` file, or JSON {"id": ...}', code="empty_request"
            )
        raise UnsupportedMediaType(
            "send multipart/form-data with an `image` file, application/json with an `id`, or raw image bytes"
        )

    @app.get(
        "/api/images/{image_id}",
        summary="The stored image bytes",
        responses={200: {"content": {t: {} for t in CONTENT_TYPES.values()}}},
    )
    async def image(image_id: str) -> Response:
        check_image_id(image_id)
        svc = get_service()
        record = await run_in_threadpool(Catalog(svc.storage).get, image_id)
        data = await run_in_threadpool(svc.storage.get, UPLOADS, record.blob)
        return Response(
            data,
            media_type=CONTENT_TYPES.get(record.format, "application/octet-stream"),
            headers={"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{image_id}"'},
        )

    @app.delete("/api/images/{image_id}", summary="Delete an image from storage and search, for good")
    async def delete_image(image_id: str) -> dict[str, Any]:
        check_image_id(image_id)
        record = await run_in_threadpool(get_service().delete, image_id)
        return {"deleted": record.id, "source": record.source}

    @app.post(
        "/api/images",
        status_code=201,
        summary="Add an image (the blob trigger's path): stored, deduplicated, queued for embedding",
        openapi_extra={"requestBody": UPLOAD_BODY},
        responses={200: {"description": "already known (same bytes)"}, 201: {"description": "added"}},
    )
    async def upload_image(request: Request) -> Response:
        svc = get_service()
        data, fields = await _read_image_upload(request, svc.settings.max_upload_bytes, max_fields=8)
        label = clean_label(_text_field(fields, "label"))
        caption = _text_field(fields, "caption")
        accepted = await run_in_threadpool(
            accept_upload, svc.storage, get_queue(), svc.settings, data, source="api", label=label, caption=caption
        )
        result = accepted.result
        if result.status == "quarantined":
            err = result.error
            raise ClusterlensError(
                f"{err.message if err else result.reason} (kept in quarantine for review)",
                code=err.code if err else "invalid_image",
                status=err.status if err else 400,
            )
        body: dict[str, Any] = {"id": result.id, "status": result.status, "url": f"/api/images/{result.id}"}
        if accepted.job is not None:
            body["job"] = {"id": accepted.job.job_id, "url": f"/api/jobs/{accepted.job.job_id}"}
        return JSONResponse(body, status_code=201 if result.status == "added" else 200)

    @app.post("/api/jobs", status_code=202, summary="Start a job: reindex, retrain, train_head, analyse or embed")
    async def start_job(request: Request) -> JSONResponse:
        payload = _json_object(await _read_body(request, 16 * 1024))
        kind = payload.get("kind")
        if kind not in API_JOB_PARAMS:
            raise BadRequest(f'"kind" must be one of {", ".join(API_JOB_PARAMS)}', code="invalid_kind")
        params = _job_params(kind, payload.get("params", {}))
        key = request.headers.get("idempotency-key") or payload.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
            raise BadRequest("an idempotency key is a string of 1 to 200 characters", code="invalid_idempotency_key")
        svc = get_service()
        message = api_job(kind, params, key)
        record, queued = await run_in_threadpool(enqueue, svc.storage, get_queue(), message)
        return JSONResponse(
            {"job": _job_json(record), "queued": queued},
            status_code=202,
            headers={"Location": f"/api/jobs/{record.job_id}"},
        )

    @app.get("/api/jobs/{job_id}", summary="A job's status, progress, timings and errors")
    async def job_status(job_id: str) -> dict[str, Any]:
        check_job_id(job_id)
        record = await run_in_threadpool(JobStore(get_service().storage).get, job_id)
        return _job_json(record)

    @app.get("/api/jobs", summary="Recent jobs, newest first")
    async def jobs(limit: int = 20) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise BadRequest("limit must be between 1 and 100", code="invalid_limit")
        records = await run_in_threadpool(JobStore(get_service().storage).recent, limit)
        return {"jobs": [_job_json(r) for r in records]}

    @app.get("/api/label-queue", summary="The next images to label: least certain first, spread over clusters")
    async def get_label_queue(n: int = 20, strategy: str | None = None) -> dict[str, Any]:
        return await run_in_threadpool(label_queue, get_service(), n, strategy)

    @app.post(
        "/api/labels",
        summary="Label a batch of images; bad items are reported, the valid ones kept",
        openapi_extra={"requestBody": LABELS_BODY},
    )
    async def post_labels(request: Request) -> JSONResponse:
        body = _json_object(await _read_body(request, 1024 * 1024))
        status, out = await run_in_threadpool(submit_labels, get_service(), get_queue(), body)
        return JSONResponse(out, status_code=status)

    @app.get("/api/labels", summary="Label counts per class and the latest labels given")
    async def get_labels(limit: int = 20) -> dict[str, Any]:
        if not 0 <= limit <= 1000:
            raise BadRequest("limit must be between 0 and 1000", code="invalid_limit")
        return await run_in_threadpool(label_summary, get_service(), limit)

    @app.get("/api/label-set", summary="The classes images may be labelled with")
    async def get_label_set() -> dict[str, Any]:
        current = await run_in_threadpool(get_service().labels.label_set)
        return {"label_set": current.to_json() if current else None}

    @app.put(
        "/api/label-set",
        summary="Define the classes (labels of classes left out stay stored but are not trained on)",
        openapi_extra={"requestBody": LABEL_SET_BODY},
    )
    async def put_label_set(request: Request) -> dict[str, Any]:
        payload = _json_object(await _read_body(request, 256 * 1024))
        classes = payload.get("classes")
        if not isinstance(classes, list):
            raise BadRequest('send {"classes": ["...", ...]}', code="invalid_label_set")
        svc = get_service()
        made = await run_in_threadpool(svc.labels.define, classes, user=check_user(payload.get("user")), source="user")
        return {"label_set": made.to_json()}

    @app.get("/api/classifier", summary="The current label classifier's metrics, and every retrain's")
    async def classifier() -> dict[str, Any]:
        return await run_in_threadpool(classifier_summary, get_service())

    @app.post(
        "/api/classify",
        summary="Classify an image: top classes from the latest report's best model, its 10 nearest labelled images",
        openapi_extra={"requestBody": CLASSIFY_BODY},
    )
    async def classify(request: Request, top: int = 5) -> dict[str, Any]:
        svc = get_service()
        data, _ = await _read_image_upload(request, svc.settings.max_upload_bytes, max_fields=4)
        return await run_in_threadpool(get_classifier().classify, svc, data, top)

    @app.get(
        "/api/reports/{version}", summary="An analysis report's metrics and links to its files (`latest` or vNNNNNN)"
    )
    async def report(version: str) -> dict[str, Any]:
        return await run_in_threadpool(report_summary, get_service().storage, version)

    @app.get(
        "/api/reports/{version}/{name:path}",
        summary="A file of an analysis report: report.html, metrics.json, maps/<pca|umap|tsne>.json, figures",
        responses={200: {"content": {t: {} for t in sorted(set(REPORT_TYPES.values()))}}},
    )
    async def report_file_(version: str, name: str) -> Response:
        data, media_type = await run_in_threadpool(report_file, get_service().storage, version, name)
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.get("/api/anomalies", summary="The latest report's most isolated images, most isolated first")
    async def anomalies(limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return await run_in_threadpool(_review, get_service(), "anomalies", limit, offset)

    @app.get("/api/mislabels", summary="Labels the 10 nearest labelled neighbours confidently disagree with")
    async def mislabels(limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return await run_in_threadpool(_review, get_service(), "mislabels", limit, offset)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page_html())

    return app


@lru_cache(maxsize=1)
def _page_html() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def _review(svc: SearchService, kind: str, limit: int, offset: int) -> dict[str, Any]:
    try:
        svc.index()
        label_of: Any = svc.current_label
    except NotReady:
        label_of = None
    return review_list(svc.storage, kind, limit, offset, label_of)


async def _read_image_upload(request: Request, limit: int, max_fields: int) -> tuple[bytes, dict[str, Any]]:
    """An image sent as a multipart ``image`` field (with the form's other fields) or as the raw
    body (with the query parameters).

    Raises:
        PayloadTooLarge, UnsupportedMediaType, BadRequest: as for uploads.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 65536:
        raise PayloadTooLarge(f"the request is over the {limit}-byte upload limit")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        data, fields = await _read_image_form(request, limit, max_fields=max_fields)
    elif ctype in CONTENT_TYPES.values() or ctype == "application/octet-stream":
        data, fields = await _read_body(request, limit), dict(request.query_params)
    else:
        raise UnsupportedMediaType("send multipart/form-data with an `image` file, or the image bytes")
    if not data:
        raise BadRequest("the upload is empty", code="empty_upload")
    return data, fields


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused as soon as it passes ``max_bytes`` (chunked bodies have no length).

    Raises:
        PayloadTooLarge: if the body is longer.
    """
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the request body is over the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_k(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest("k must be an integer", code="invalid_k")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 12:
        return int(value)
    raise BadRequest("k must be an integer", code="invalid_k")


async def _read_image_form(request: Request, max_bytes: int, max_fields: int) -> tuple[bytes, dict[str, Any]]:
    """A multipart form's ``image`` file (at most ``max_bytes``) and its other fields.

    Raises:
        BadRequest: unparsable form or no file. PayloadTooLarge: the file is over the limit.
    """
    try:
        form = await request.form(max_files=1, max_fields=max_fields)
    except Exception:  # noqa: BLE001 - malformed multipart bodies raise assorted parser errors
        raise BadRequest("the multipart body cannot be parsed", code="invalid_multipart") from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise BadRequest("the form needs a file in the `image` field", code="missing_image")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is over the {max_bytes}-byte upload limit")
    return data, {k: v for k, v in form.items() if k != "image"}


async def _read_multipart(request: Request, max_bytes: int) -> tuple[bytes, int | None, SearchFilters]:
    data, form = await _read_image_form(request, max_bytes, max_fields=16)
    filters = parse_filters({n: v for n, v in form.items() if n in FIELDS and isinstance(v, str)})
    return data, _parse_k(form.get("k")), filters


def _read_json_query(body: bytes) -> tuple[str, str, int | None, SearchFilters]:
    if not body:
        raise BadRequest("empty request body", code="empty_request")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict) or ("id" in payload) == ("text" in payload):
        raise BadRequest('the JSON body needs one of "id" (a stored image id) or "text"', code="missing_id")
    if "text" in payload:
        if not isinstance(payload["text"], str):
            raise BadRequest('"text" must be a string', code="invalid_text")
        return "text", payload["text"], _parse_k(payload.get("k")), parse_filters(payload.get("filters"))
    image_id = payload["id"]
    if not isinstance(image_id, str):
        raise BadRequest('"id" must be a string', code="invalid_id")
    return "id", check_image_id(image_id), _parse_k(payload.get("k")), parse_filters(payload.get("filters"))


def _json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("empty request body", code="empty_request")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    return payload


def _job_params(kind: str, params: Any) -> dict[str, Any]:
    """Check a job's parameters against what its kind takes.

    Raises:
        BadRequest: for unknown names, wrong types or values out of range.
    """
    if not isinstance(params, dict):
        raise BadRequest('"params" must be an object', code="invalid_params")
    allowed = API_JOB_PARAMS[kind]
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise BadRequest(f"{kind} takes no parameter {name!r} (it takes: {known})", code="invalid_params")
        typ, lo, hi = allowed[name]
        ok = isinstance(value, bool) if typ is bool else isinstance(value, typ | int) and not isinstance(value, bool)
        if not ok or (typ is not bool and not lo <= value <= hi):
            what = "true or false" if typ is bool else f"a number from {lo:g} to {hi:g}"
            raise BadRequest(f"params.{name} must be {what}", code="invalid_params")
        out[name] = typ(value)
    return out


def _job_json(record: JobRecord) -> dict[str, Any]:
    value: dict[str, Any] = record.model_dump(mode="json")
    value["url"] = f"/api/jobs/{record.job_id}"
    return value


def _text_field(fields: Any, name: str) -> str | None:
    value = fields.get(name)
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"`{name}` must be text", code=f"invalid_{name}")
