"""The HTTP API: one FastAPI app, served by ``func.AsgiFunctionApp`` in Azure and uvicorn locally.

Handlers parse and validate input, call ``shared``, and shape the response. Every error leaves as
``{"error": {"code": ..., "message": ...}}`` with a 4xx status (5xx only for our own faults).
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from shared import __version__
from shared.access import API_KEY_HEADER, Level, check_access
from shared.catalog import Catalog, check_image_id
from shared.errors import BadRequest, ClusterlensError, Conflict, NotReady, PayloadTooLarge, UnsupportedMediaType
from shared.filters import FIELDS, SearchFilters, parse_filters
from shared.imaging import CONTENT_TYPES
from shared.index import index_versions, rollback
from shared.jobs import JOB_ID_PATTERN, JobKind, JobRecord, JobStore, api_job, check_job_id, enqueue
from shared.labelling import MAX_QUEUE_N, classifier_summary, label_queue, label_summary, submit_labels
from shared.labels import check_user
from shared.queues import JobQueue, open_queue
from shared.reports import CONTENT_TYPES as REPORT_TYPES
from shared.reports import Classifier, report_file, report_summary, review_list
from shared.search import SearchService
from shared.settings import Settings, get_settings
from shared.storage import UPLOADS
from shared.uploads import accept_upload, clean_label
from shared.web import SecurityHeaders, page_csp

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

ANY = {"type": "string", "maxLength": 0}  # an empty value (as HTML forms send) means no condition
FILTER_FIELDS: dict[str, dict[str, Any]] = {
    "label": {"type": "string", "maxLength": 200, "description": "the image's label"},
    "labelled": {"type": "boolean", "description": "true: labelled images only; false: unlabelled only"},
    "predicted": {"type": "string", "maxLength": 200, "description": "the label classifier's predicted class"},
    "cluster": {"type": "integer", "minimum": 0, "maximum": 1_000_000, "description": "the image's cluster"},
    "imagenet_class": {"type": "integer", "minimum": 0, "maximum": 999, "description": "predicted top-1 class"},
    "ingested_after": {"type": "string", "format": "date-time"},
    "ingested_before": {"type": "string", "format": "date-time"},
}
# The same filters as form fields (text, as forms send them; empty means any).
FORM_FILTERS: dict[str, dict[str, Any]] = {
    "label": FILTER_FIELDS["label"],
    "predicted": FILTER_FIELDS["predicted"],
    "labelled": {"type": "string", "enum": ["", "true", "false"]},
    "cluster": {"type": "string", "pattern": "^([0-9]{1,6}|1000000)?$"},
    "imagenet_class": {"type": "string", "pattern": "^[0-9]{0,3}$"},
    "ingested_after": {"anyOf": [FILTER_FIELDS["ingested_after"], ANY]},
    "ingested_before": {"anyOf": [FILTER_FIELDS["ingested_before"], ANY]},
}
FILTERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "only results meeting every condition; an empty value means any",
    "additionalProperties": False,
    "properties": {name: {"anyOf": [spec, ANY]} for name, spec in FILTER_FIELDS.items()},
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


def upload_body(max_caption: int) -> dict[str, Any]:
    return _image_body(
        label={"type": "string", "maxLength": 100, "description": "its label (optional)"},
        caption={"type": "string", "maxLength": max_caption, "description": "a caption (optional)"},
    )


CLASSIFY_BODY = _image_body()


def search_body(max_k: int, max_text: int) -> dict[str, Any]:
    """The search request body: an image (multipart with k and filters, or raw bytes), or JSON with an id or text."""
    k = {"type": "integer", "minimum": 1, "maximum": max_k, "description": "number of results"}
    body = _image_body(
        k={"type": "string", "pattern": "^[0-9]{1,4}$", "description": "number of results"}, **FORM_FILTERS
    )
    body["content"]["application/json"] = {
        "schema": {
            "type": "object",
            "description": "exactly one of `id` (similar images) or `text` (text-to-image)",
            "oneOf": [{"required": ["id"]}, {"required": ["text"]}],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "a stored image id"},
                "text": {"type": "string", "minLength": 1, "maxLength": max_text, "description": "a text query"},
                "k": k,
                "filters": FILTERS_SCHEMA,
            },
        }
    }
    return body


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


def _param_schema(typ: type, lo: float, hi: float) -> dict[str, Any]:
    if typ is bool:
        return {"type": "boolean"}
    return {"type": "integer" if typ is int else "number", "minimum": lo, "maximum": hi}


USER_SCHEMA = {
    "type": ["string", "null"],
    "pattern": "^[A-Za-z0-9@._ +-]{0,64}$",
    "description": "who labels: letters, digits, @._ +- (default anonymous)",
}
JOB_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["kind"],
                        "additionalProperties": False,
                        "properties": {
                            "kind": {"type": "string", "enum": [kind]},
                            "params": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {name: _param_schema(*spec) for name, spec in params.items()},
                            },
                            "idempotency_key": {"type": ["string", "null"], "minLength": 1, "maxLength": 200},
                        },
                    }
                    for kind, params in API_JOB_PARAMS.items()
                ]
            }
        }
    },
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
                    "user": USER_SCHEMA,
                },
            }
        }
    },
}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error's body: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "bad input (the message says which)",
        401: "no valid key for this endpoint",
        403: "the key cannot do this, or write endpoints are closed",
        404: "no such image, job, report or version",
        405: "method not allowed",
        409: "the state does not allow it (no label set, nothing to roll back to, ...)",
        413: "over the upload or body size limit",
        415: "not a supported image or body type",
        503: "not built yet (model, index, classifier)",
    }.items()
}
ROLLBACK_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"to": {"type": "string", "pattern": "^v[0-9]{6}$", "description": "default: previous"}},
            }
        }
    },
}
ImageId = Annotated[str, PathParam(pattern="^[0-9a-f]{64}$", description="an image id (sha256 of its bytes)")]
ReportVersion = Annotated[str, PathParam(pattern="^(latest|v[0-9]{6})$")]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]
KEY_COOKIE = "clusterlens-key"  # the page's key for <img> requests; read level only
VERSION = re.compile(r"^v[0-9]{6}$")
WRITE_KEY = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="writeKey",
    auto_error=False,
    description="The write/admin key (CLUSTERLENS_API_KEY); in Azure also an Entra ID app role",
)
LABEL_SET_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["classes"],
                "properties": {
                    "classes": {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": "\\S"},
                        "minItems": 1,
                    },
                    "user": USER_SCHEMA,
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
        description="Search, map and label a large image collection. Write endpoints need the write key in the "
        f"`{API_KEY_HEADER}` header; read endpoints need the read key only where one is configured.",
        responses=ERROR_RESPONSES,
    )
    configured = settings or (service.settings if service else get_settings())
    if configured.cors_origins:  # off unless configured: browsers then refuse other origins' calls
        app.add_middleware(
            CORSMiddleware,
            allow_origins=configured.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Content-Type", API_KEY_HEADER, "Idempotency-Key"],
            max_age=600,
        )
    app.add_middleware(SecurityHeaders, docs_paths=("/api/docs",))

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

    def guard(level: Level) -> Any:
        """A route dependency that lets a request in at ``level`` or refuses it (401 / 403)."""
        if level == "write":  # documented in the schema: write endpoints take the key

            async def write(request: Request, _key: str | None = Security(WRITE_KEY)) -> None:
                check_access(settings or get_service().settings, request.headers, "write")

            return Depends(write)

        async def read(request: Request) -> None:
            check_access(settings or get_service().settings, request.headers, "read", request.cookies.get(KEY_COOKIE))

        return Depends(read)

    READ, WRITE = [guard("read")], [guard("write")]

    @app.exception_handler(ClusterlensError)
    async def _clusterlens_error(request: Request, exc: ClusterlensError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        response = error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method the path takes, not only the first matching route's
            methods = {m for r in app.routes if r.matches(request.scope)[0] != Match.NONE for m in _methods(r)}
            response.headers["Allow"] = ", ".join(sorted(methods))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        code = f"invalid_{loc[-1]}" if len(loc) == 2 and loc[0] in ("query", "path") else "invalid_request"
        code = {"invalid_image_id": "invalid_id"}.get(code, code)  # the code the id checks have always used
        return error_response(400, code, f"{'.'.join(loc)}: {first.get('msg', 'invalid')}")

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
        openapi_extra={"requestBody": search_body(configured.max_k, configured.max_text_chars)},
        dependencies=READ,
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
        dependencies=READ,
    )
    async def image(image_id: ImageId) -> Response:
        check_image_id(image_id)
        svc = get_service()
        record = await run_in_threadpool(Catalog(svc.storage).get, image_id)
        data = await run_in_threadpool(svc.storage.get, UPLOADS, record.blob)
        return Response(
            data,
            media_type=CONTENT_TYPES.get(record.format, "application/octet-stream"),
            headers={"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{image_id}"'},
        )

    @app.delete(
        "/api/images/{image_id}", summary="Delete an image from storage and search, for good", dependencies=WRITE
    )
    async def delete_image(image_id: ImageId) -> dict[str, Any]:
        check_image_id(image_id)
        record = await run_in_threadpool(get_service().delete, image_id)
        return {"deleted": record.id, "source": record.source}

    @app.post(
        "/api/images",
        status_code=201,
        summary="Add an image (the blob trigger's path): stored, deduplicated, queued for embedding",
        openapi_extra={"requestBody": upload_body(configured.max_text_chars)},
        responses={200: {"description": "already known (same bytes)"}, 201: {"description": "added"}},
        dependencies=WRITE,
    )
    async def upload_image(request: Request) -> Response:
        svc = get_service()
        data, fields = await _read_image_upload(request, svc.settings.max_upload_bytes, max_fields=8)
        label = clean_label(_text_field(fields, "label"))
        caption = _text_field(fields, "caption")
        if caption is not None and len(caption) > svc.settings.max_text_chars:
            raise BadRequest(f"a caption is at most {svc.settings.max_text_chars} characters", code="invalid_caption")
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

    @app.post(
        "/api/jobs",
        status_code=202,
        summary="Start a job: reindex, retrain, train_head, analyse or embed",
        openapi_extra={"requestBody": JOB_BODY},
        dependencies=WRITE,
    )
    async def start_job(request: Request) -> JSONResponse:
        payload = _json_object(await _read_body(request, 16 * 1024))
        kind = payload.get("kind")
        unknown = sorted(set(payload) - {"kind", "params", "idempotency_key"})
        if unknown:
            raise BadRequest(
                f"unknown field {unknown[0]!r}: a job is kind, params, idempotency_key", code="invalid_body"
            )
        if not isinstance(kind, str) or kind not in API_JOB_PARAMS:
            raise BadRequest(f'"kind" must be one of {", ".join(API_JOB_PARAMS)}', code="invalid_kind")
        params = _job_params(kind, payload.get("params", {}))
        key = request.headers.get("idempotency-key") or payload.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
            raise BadRequest("an idempotency key is a string of 1 to 200 characters", code="invalid_idempotency_key")
        svc = get_service()
        message = api_job(cast(JobKind, kind), params, key)
        record, queued = await run_in_threadpool(enqueue, svc.storage, get_queue(), message)
        return JSONResponse(
            {"job": _job_json(record), "queued": queued},
            status_code=202,
            headers={"Location": f"/api/jobs/{record.job_id}"},
        )

    @app.get("/api/jobs/{job_id}", summary="A job's status, progress, timings and errors", dependencies=READ)
    async def job_status(job_id: Annotated[str, PathParam(pattern=JOB_ID_PATTERN, max_length=120)]) -> dict[str, Any]:
        check_job_id(job_id)
        record = await run_in_threadpool(JobStore(get_service().storage).get, job_id)
        return _job_json(record)

    @app.get("/api/jobs", summary="Recent jobs, newest first", dependencies=READ)
    async def jobs(limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
        records = await run_in_threadpool(JobStore(get_service().storage).recent, limit)
        return {"jobs": [_job_json(r) for r in records]}

    @app.get(
        "/api/label-queue",
        summary="The next images to label: least certain first, spread over clusters",
        dependencies=READ,
    )
    async def get_label_queue(
        n: Annotated[int, Query(ge=1, le=MAX_QUEUE_N)] = 20,
        strategy: Literal["random", "least_confidence", "margin", "entropy"] | None = None,
    ) -> dict[str, Any]:
        return await run_in_threadpool(label_queue, get_service(), n, strategy)

    @app.post(
        "/api/labels",
        summary="Label a batch of images; bad items are reported, the valid ones kept",
        openapi_extra={"requestBody": LABELS_BODY},
        dependencies=WRITE,
    )
    async def post_labels(request: Request) -> JSONResponse:
        body = _json_object(await _read_body(request, 1024 * 1024))
        status, out = await run_in_threadpool(submit_labels, get_service(), get_queue(), body)
        return JSONResponse(out, status_code=status)

    @app.get("/api/labels", summary="Label counts per class and the latest labels given", dependencies=READ)
    async def get_labels(limit: Annotated[int, Query(ge=0, le=1000)] = 20) -> dict[str, Any]:
        return await run_in_threadpool(label_summary, get_service(), limit)

    @app.get("/api/label-set", summary="The classes images may be labelled with", dependencies=READ)
    async def get_label_set() -> dict[str, Any]:
        current = await run_in_threadpool(get_service().labels.label_set)
        return {"label_set": current.to_json() if current else None}

    @app.put(
        "/api/label-set",
        summary="Define the classes (labels of classes left out stay stored but are not trained on)",
        openapi_extra={"requestBody": LABEL_SET_BODY},
        dependencies=WRITE,
    )
    async def put_label_set(request: Request) -> dict[str, Any]:
        payload = _json_object(await _read_body(request, 256 * 1024))
        classes = payload.get("classes")
        if not isinstance(classes, list):
            raise BadRequest('send {"classes": ["...", ...]}', code="invalid_label_set")
        svc = get_service()
        made = await run_in_threadpool(svc.labels.define, classes, user=check_user(payload.get("user")), source="user")
        return {"label_set": made.to_json()}

    @app.get(
        "/api/classifier", summary="The current label classifier's metrics, and every retrain's", dependencies=READ
    )
    async def classifier() -> dict[str, Any]:
        return await run_in_threadpool(classifier_summary, get_service())

    @app.post(
        "/api/classify",
        summary="Classify an image: top classes from the latest report's best model, its 10 nearest labelled images",
        openapi_extra={"requestBody": CLASSIFY_BODY},
        dependencies=READ,
    )
    async def classify(request: Request, top: Annotated[int, Query(ge=1, le=100)] = 5) -> dict[str, Any]:
        svc = get_service()
        data, _ = await _read_image_upload(request, svc.settings.max_upload_bytes, max_fields=4)
        return await run_in_threadpool(get_classifier().classify, svc, data, top)

    @app.get(
        "/api/reports/{version}",
        summary="An analysis report's metrics and links to its files (`latest` or vNNNNNN)",
        dependencies=READ,
    )
    async def report(version: ReportVersion) -> dict[str, Any]:
        return await run_in_threadpool(report_summary, get_service().storage, version)

    @app.get(
        "/api/reports/{version}/{name:path}",
        summary="A file of an analysis report: report.html, metrics.json, maps/<pca|umap|tsne>.json, figures",
        responses={200: {"content": {t: {} for t in sorted(set(REPORT_TYPES.values()))}}},
        dependencies=READ,
    )
    async def report_file_(version: ReportVersion, name: Annotated[str, PathParam(max_length=200)]) -> Response:
        data, media_type = await run_in_threadpool(report_file, get_service().storage, version, name)
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.get(
        "/api/anomalies", summary="The latest report's most isolated images, most isolated first", dependencies=READ
    )
    async def anomalies(limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
        return await run_in_threadpool(_review, get_service(), "anomalies", limit, offset)

    @app.get(
        "/api/mislabels",
        summary="Labels the 10 nearest labelled neighbours confidently disagree with",
        dependencies=READ,
    )
    async def mislabels(limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
        return await run_in_threadpool(_review, get_service(), "mislabels", limit, offset)

    @app.get("/api/index", summary="Published index versions, newest last, and the one queries use", dependencies=READ)
    async def get_index() -> dict[str, Any]:
        return await run_in_threadpool(index_versions, get_service().storage)

    @app.post(
        "/api/index/rollback",
        summary="Point queries back at an earlier published index version (the one before the current by default)",
        openapi_extra={"requestBody": ROLLBACK_BODY},
        dependencies=WRITE,
    )
    async def index_rollback(request: Request) -> dict[str, Any]:
        body = await _read_body(request, 4096)
        to = _json_object(body).get("to") if body else None
        if to is not None and (not isinstance(to, str) or not VERSION.match(to)):
            raise BadRequest('"to" must be a version name like v000003', code="invalid_version")
        try:
            before, after = await run_in_threadpool(rollback, get_service().storage, to)
        except NotReady as exc:  # nothing published, or nothing older: the state, not the server
            raise Conflict(exc.message, code=exc.code) from None
        return {"previous": before, "current": after}

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = _page_html()
        return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html), "Cache-Control": "no-cache"})

    return app


@lru_cache(maxsize=1)
def _page_html() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def _methods(route: BaseRoute) -> set[str]:
    return set(getattr(route, "methods", None) or ())


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
