"""Jobs: typed queue messages, durable job records, and enqueueing that never doubles work.

A job is identified by a deterministic id built from what caused it, so the same cause never
queues the same work twice:

- uploads: ``embed-<window start>``: every image arriving in one ``embed_batch_seconds`` window
  shares one job (its message is hidden until the window closes); the id is stored in the image
  record, so the same blob event delivered again finds the same job.
- timers: ``<kind>-timer-<scheduled time>``: the schedule slot a firing belongs to, so a past-due
  or duplicate firing maps to the slot it was for.
- the API: ``<kind>-api-<random>``, or ``<kind>-key-<hash>`` with an idempotency key.

The record (``jobs/records/<id>.json``) is created create-if-absent before the message is sent,
and a ``jobs/sent/<id>`` marker written after: an enqueue that died in between is completed by the
next attempt with the same id. The worker writes status, progress, timings and errors into the
record; ``GET /api/jobs/{id}`` reads it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from shared.api_models import Body, Unset
from shared.errors import BadRequest, NotFound
from shared.queues import JobQueues
from shared.settings import JobKind
from shared.storage import JOBS, BlobNotFound, Storage

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "retrying", "succeeded", "failed"]
FINISHED: tuple[str, ...] = ("succeeded", "failed")
MESSAGE_VERSION: Literal[1] = 1
JOB_ID_PATTERN = r"^[a-z_]+-[a-z]+-[A-Za-z0-9_.-]{1,80}$"
RECORDS = "records/"
SENT = "sent/"
CREATED = "created/"
ITEMS = "items/"


class JobMessage(BaseModel):
    """What travels on the queue. Small (ids and parameters, never data) and versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = MESSAGE_VERSION
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    kind: JobKind
    origin: str = Field(max_length=512, description="what caused it: blob:<name>, timer:<slot>, api, job:<id>")
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime

    def to_text(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_text(cls, text: str) -> JobMessage:
        """Parse a message.

        Raises:
            BadRequest: if it is not a valid job message of a known version.
        """
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise BadRequest(f"not a valid job message: {where}: {first.get('msg')}", code="invalid_message") from None


class JobError(BaseModel):
    attempt: int
    code: str
    message: str
    at: datetime


class JobRecord(BaseModel):
    """A job's durable state, as ``GET /api/jobs/{id}`` shows it."""

    job_id: str
    kind: JobKind
    origin: str
    params: dict[str, Any] = Field(default_factory=dict)
    status: Status = "queued"
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    worker: str | None = None
    progress: dict[str, Any] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)
    result: dict[str, Any] = Field(default_factory=dict)
    error: JobError | None = None
    errors: list[JobError] = Field(default_factory=list)

    @classmethod
    def for_message(cls, message: JobMessage) -> JobRecord:
        now = datetime.now(UTC)
        return cls(
            job_id=message.job_id,
            kind=message.kind,
            origin=message.origin,
            params=message.params,
            created_at=message.created_at,
            updated_at=now,
        )


class JobStore:
    """Job records and the image lists of embedding jobs, in the ``jobs`` container."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def create(self, record: JobRecord) -> bool:
        """Store a new record unless one exists. Returns whether it was new.

        A new record also gets an empty ``created/<time>-<id>`` blob: names sort by time there,
        so :meth:`recent` lists one prefix instead of reading every record.
        """
        if not self.storage.put_json(JOBS, f"{RECORDS}{record.job_id}.json", _dump(record), overwrite=False):
            return False
        stamp = record.created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%f")
        self.storage.put(JOBS, f"{CREATED}{stamp}-{record.job_id}", b"", overwrite=False)
        return True

    def save(self, record: JobRecord) -> None:
        record.updated_at = datetime.now(UTC)
        self.storage.put_json(JOBS, f"{RECORDS}{record.job_id}.json", _dump(record))

    def find(self, job_id: str) -> JobRecord | None:
        try:  # one request: read it, rather than ask whether it exists first
            return JobRecord.model_validate(self.storage.get_json(JOBS, f"{RECORDS}{job_id}.json"))
        except BlobNotFound:
            return None

    def get(self, job_id: str) -> JobRecord:
        """The record of a job.

        Raises:
            BadRequest: if the id is malformed. NotFound: if there is no such job.
        """
        check_job_id(job_id)
        record = self.find(job_id)
        if record is None:
            raise NotFound(f"no job with id {job_id}", code="job_not_found")
        return record

    def recent(self, limit: int = 20) -> list[JobRecord]:
        """The most recently created jobs, newest first."""
        names = list(self.storage.list(JOBS, CREATED))[-limit:]
        found = (self.find(name[len(CREATED) :].split("-", 1)[1]) for name in reversed(names))
        return [r for r in found if r is not None]

    def pending(self, kind: JobKind, limit: int = 100) -> JobRecord | None:
        """The newest of the ``limit`` most recent jobs that is of ``kind`` and not finished, if any."""
        return next((r for r in self.recent(limit) if r.kind == kind and r.status not in FINISHED), None)

    def was_sent(self, job_id: str) -> bool:
        return self.storage.exists(JOBS, f"{SENT}{job_id}")

    def mark_sent(self, job_id: str) -> None:
        self.storage.put(JOBS, f"{SENT}{job_id}", b"", overwrite=False)

    def add_item(self, job_id: str, image_id: str) -> None:
        """Note an image as part of an embedding job (one tiny blob: safe from many writers at once)."""
        self.storage.put(JOBS, f"{ITEMS}{job_id}/{image_id}", b"", overwrite=False)

    def items(self, job_id: str) -> list[str]:
        prefix = f"{ITEMS}{job_id}/"
        return [name[len(prefix) :] for name in self.storage.list(JOBS, prefix)]


def _dump(record: JobRecord) -> dict[str, Any]:
    value: dict[str, Any] = record.model_dump(mode="json")
    return value


def check_job_id(job_id: str) -> str:
    """Validate a job id.

    Raises:
        BadRequest: if it is not one.
    """
    if not isinstance(job_id, str) or not re.match(JOB_ID_PATTERN, job_id):
        raise BadRequest("a job id looks like `reindex-api-0123abcd`", code="invalid_job_id")
    return job_id


def check_job(storage: Storage, message: JobMessage) -> None:
    """What can be known before a job is queued: an ``ingest_container`` job's container exists and is not ours.

    Raises:
        BadRequest: one of the app's own containers. NotFound: no such container.
    """
    if message.kind == "ingest_container":
        storage.check_source(message.params["container"])


def enqueue(storage: Storage, queues: JobQueues, message: JobMessage, *, delay: float = 0) -> tuple[JobRecord, bool]:
    """Queue a job on its kind's queue (:meth:`JobQueues.for_kind`) unless a job with its id was queued before.

    Returns:
        (the job's record, whether this call queued it).
    """
    store = JobStore(storage)
    record = JobRecord.for_message(message)
    if not store.create(record):
        existing = store.find(message.job_id)
        if existing is not None and store.was_sent(message.job_id):
            return existing, False
        record = existing or record  # created by an enqueue that died before sending: finish its work
    queues.for_kind(message.kind).send(message.to_text(), delay=delay)
    store.mark_sent(message.job_id)
    log.info("queued job %s (%s)", message.job_id, message.origin)
    return record, True


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


def window(now: datetime, seconds: int) -> tuple[str, float]:
    """The batching window ``now`` falls in: (its start stamp, seconds until it closes)."""
    epoch = now.timestamp()
    start = epoch - epoch % seconds
    return _stamp(datetime.fromtimestamp(start, UTC)), start + seconds - epoch


def upload_job(now: datetime, seconds: int, origin: str) -> tuple[JobMessage, float]:
    """The embedding job for uploads arriving at ``now``, and how long to hide its message.

    The message becomes visible one second after the window closes, when every image of the
    window is in the catalogue.
    """
    stamp, remaining = window(now, seconds)
    message = JobMessage(job_id=f"embed-batch-{stamp}", kind="embed", origin=origin, created_at=now)
    return message, remaining + 1.0


def timer_slot(schedule: str, now: datetime, tolerance: float = 2.0) -> datetime:
    """The scheduled occurrence a timer firing at ``now`` belongs to (the latest at or before it).

    ``tolerance`` seconds of earliness are forgiven (a firing a moment before its time is still
    that slot's). A past-due firing, run late, maps to the slot it missed.
    """
    from croniter import croniter

    it = croniter(schedule, now + timedelta(seconds=tolerance), second_at_beginning=True)
    slot: datetime = it.get_prev(datetime)
    return slot.astimezone(UTC)


def timer_job(kind: JobKind, schedule: str, now: datetime) -> JobMessage:
    slot = timer_slot(schedule, now)
    return JobMessage(
        job_id=f"{kind}-timer-{_stamp(slot)}", kind=kind, origin=f"timer:{slot.isoformat()}", created_at=now
    )


def api_job(kind: JobKind, params: dict[str, Any], idempotency_key: str | None = None) -> JobMessage:
    """A job asked for over HTTP; the same idempotency key gives the same job."""
    if idempotency_key:
        digest = hashlib.sha256(f"{kind}\n{idempotency_key}".encode()).hexdigest()[:24]
        job_id = f"{kind}-key-{digest}"
    else:
        job_id = f"{kind}-api-{uuid.uuid4().hex[:16]}"
    return JobMessage(job_id=job_id, kind=kind, origin="api", params=params, created_at=datetime.now(UTC))


def follow_up_reindex(now: datetime, seconds: int, cause: str) -> tuple[JobMessage, float]:
    """The reindex that publishes what embedding jobs finishing around ``now`` wrote (one per window)."""
    stamp, remaining = window(now, seconds)
    message = JobMessage(job_id=f"reindex-after-{stamp}", kind="reindex", origin=f"job:{cause}", created_at=now)
    return message, remaining + 1.0


def schedule_job(
    storage: Storage, queues: JobQueues, kind: JobKind, schedule: str, now: datetime | None = None
) -> tuple[JobRecord, bool]:
    """What a timer firing does: queue the job of the schedule slot it belongs to, once per slot."""
    return enqueue(storage, queues, timer_job(kind, schedule, now or datetime.now(UTC)))


# -- jobs asked for over HTTP ----------------------------------------------------------------------


class ReindexParams(Body):
    force: Annotated[bool, Field(strict=True)] | Unset = Field(
        default=None, description="publish even below the recall target"
    )


class TrainParams(Body):
    epochs: Annotated[int, Field(strict=True, ge=1, le=200)] | Unset = Field(default=None)
    seed: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)] | Unset = Field(default=None)


class TrainHeadParams(TrainParams):
    batch_size: Annotated[int, Field(strict=True, ge=8, le=8192)] | Unset = Field(default=None)
    lr: Annotated[float, Field(ge=1e-6, le=1.0, strict=True)] | Unset = Field(default=None)


class AnalyseParams(Body):
    k: Annotated[int, Field(strict=True, ge=0, le=4096)] | Unset = Field(
        default=None, description="k-means clusters; 0: silhouette sweep"
    )
    map_sample: Annotated[int, Field(strict=True, ge=100, le=200_000)] | Unset = Field(default=None)


class DedupeParams(Body):
    seed: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)] | Unset = Field(
        default=None, description="seeds the calibration sample and its transforms"
    )


class EmbedParams(Body):
    all: Annotated[bool, Field(strict=True)] | Unset = Field(
        default=None, description="every image not embedded yet, not only this job's"
    )
    backfill: Annotated[bool, Field(strict=True)] | Unset = Field(
        default=None,
        description="every image not embedded yet, split into units that parallel workers share",
    )


class IngestContainerParams(Body):
    container: Annotated[str, Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")] = Field(
        description="a Blob container of the storage account whose images are registered in place (not copied)"
    )
    prefix: Annotated[str, Field(max_length=1024)] | Unset = Field(default=None, description="only blobs under it")


class _Job(Body):
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | Unset = Field(default=None)


class ReindexJob(_Job):
    kind: Literal["reindex"]
    params: ReindexParams = Field(default_factory=ReindexParams)


class RetrainJob(_Job):
    kind: Literal["retrain"]
    params: TrainParams = Field(default_factory=TrainParams)


class TrainHeadJob(_Job):
    kind: Literal["train_head"]
    params: TrainHeadParams = Field(default_factory=TrainHeadParams)


class AnalyseJob(_Job):
    kind: Literal["analyse"]
    params: AnalyseParams = Field(default_factory=AnalyseParams)


class DedupeJob(_Job):
    kind: Literal["dedupe"]
    params: DedupeParams = Field(default_factory=DedupeParams)


class EmbedJob(_Job):
    kind: Literal["embed"]
    params: EmbedParams = Field(default_factory=EmbedParams)


class IngestContainerJob(_Job):
    kind: Literal["ingest_container"]
    params: IngestContainerParams


JobUnion = ReindexJob | RetrainJob | TrainHeadJob | AnalyseJob | EmbedJob | IngestContainerJob | DedupeJob


class JobRequest(RootModel[Annotated[JobUnion, Field(discriminator="kind")]]):
    """``POST /api/jobs``: a job kind, its parameters (each kind takes its own), an idempotency key."""

    codes: ClassVar[dict[str, str]] = {
        "kind": "invalid_kind",
        "params": "invalid_params",
        "idempotency_key": "invalid_idempotency_key",
    }
    invalid: ClassVar[str] = "invalid_body"
    not_object: ClassVar[str] = "invalid_json"
    tags: ClassVar[tuple[str, ...]] = (
        "reindex",
        "retrain",
        "train_head",
        "analyse",
        "embed",
        "ingest_container",
        "dedupe",
    )

    def message(self, idempotency_key: str | None = None) -> JobMessage:
        """The job's message (the header's idempotency key wins over the body's).

        Raises:
            BadRequest: an idempotency key that is not 1 to 200 characters.
        """
        job = self.root
        key = idempotency_key if idempotency_key is not None else job.idempotency_key
        if key is not None and not 0 < len(key) <= 200:
            raise BadRequest("an idempotency key is a string of 1 to 200 characters", code="invalid_idempotency_key")
        return api_job(job.kind, job.params.model_dump(exclude_unset=True), key)
