"""Uploads: one path for an image arriving by blob event or over HTTP.

Validate and store the image (content hash as id, quarantine with a reason when bad), then make
sure its embedding job is queued. Safe to repeat: the same bytes delivered again find their
record, and the record names the job they were queued in, so the repeat queues nothing new.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.catalog import Catalog
from shared.errors import ClusterlensError
from shared.imaging import EXTENSION_FOR_FORMAT
from shared.ingest import IngestItem, IngestResult, content_id, ingest_bytes, quarantine
from shared.jobs import JobMessage, JobRecord, JobStore, enqueue, upload_job
from shared.labels import clean_label
from shared.queues import JobQueues
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)

# Where ingest keeps images (``uploads/<sha256>.<ext>``): events for these are our own writes.
STORED_NAME = re.compile(
    r"^[0-9a-f]{64}(" + "|".join(re.escape(e) for e in sorted(set(EXTENSION_FOR_FORMAT.values()))) + r")$"
)


@dataclass(frozen=True)
class Accepted:
    """What became of an upload: the ingest result and the embedding job it is in (if any)."""

    result: IngestResult
    job: JobRecord | None = None
    queued: bool = False  # whether this call queued the job (False: it was queued before)

    def describe(self) -> str:
        """One line for the log: ``added 3f9c2a1b0d4e (job embed-batch-..., queued)``."""
        job = f" (job {self.job.job_id}{', queued' if self.queued else ''})" if self.job else ""
        return f"{self.result.status} {self.result.id[:12]}{job}"


def accept_upload(
    storage: Storage,
    queues: JobQueues,
    settings: Settings,
    data: bytes,
    *,
    source: str,
    label: str | None = None,
    caption: str | None = None,
    now: datetime | None = None,
) -> Accepted:
    """Ingest one image and queue its embedding (batched with the other uploads of its window).

    Never raises for bad image data: that is quarantined and reported in the result.
    """
    now = now or datetime.now(UTC)
    message, delay = upload_job(now, settings.embed_batch_seconds, origin=source[-256:])
    result = ingest_bytes(
        storage, settings, IngestItem(data=data, source=source, label=label, caption=caption), job_id=message.job_id
    )
    if result.status == "quarantined":
        return Accepted(result)
    if result.status == "duplicate":  # known before: its job is the one it was first queued in
        job_id = Catalog(storage).get(result.id).job
        if job_id is None:  # known from a local ingest, which embeds on its own
            return Accepted(result)
        if job_id != message.job_id:
            message = JobMessage(job_id=job_id, kind="embed", origin=message.origin, created_at=now)
            delay = 0
    JobStore(storage).add_item(message.job_id, result.id)  # before the message can be seen
    job, queued = enqueue(storage, queues, message, delay=delay)
    return Accepted(result, job, queued)


def refuse_quarantined(result: IngestResult) -> IngestResult:
    """An upload's result, unless it was quarantined: that is refused with its reason.

    Raises:
        ClusterlensError: the quarantine's code and status (``invalid_image`` 400 and the like).
    """
    if result.status != "quarantined":
        return result
    err = result.error
    raise ClusterlensError(
        f"{err.message if err else result.reason} (kept in quarantine for review)",
        code=err.code if err else "invalid_image",
        status=err.status if err else 400,
    )


def too_large(storage: Storage, settings: Settings, *, source: str, size: int) -> IngestResult:
    """Record an upload over the size limit without reading it (its bytes stay where they are)."""
    reason = f"{size} bytes is over the {settings.max_upload_bytes}-byte limit (the blob is left in place)"
    pseudo_id = content_id(source.encode())
    quarantine(storage, pseudo_id, IngestItem(data=b"", source=source), code="payload_too_large", reason=reason)
    return IngestResult("quarantined", pseudo_id, source, f"payload_too_large: {reason}")


def handle_blob(
    storage: Storage,
    queues: JobQueues,
    settings: Settings,
    *,
    name: str,
    length: int | None,
    metadata: dict[str, str],
    read: Callable[[int], bytes],
) -> Accepted:
    """What the blob trigger does with one blob of the uploads container.

    Args:
        name: the blob path as the host gives it (``uploads/<blob name>``).
        length: its size, if the host said (checked before reading).
        metadata: the blob's metadata; ``label`` and ``caption`` are kept with the image.
        read: reads up to n bytes of the blob.
    """
    source = f"blob:{name}"
    blob_name = name.rsplit("/", 1)[-1]
    if STORED_NAME.match(blob_name) and Catalog(storage).exists(blob_name[:64]):
        # Our own stored copy (ingest writes uploads/<sha256>.<ext>): already known.
        return Accepted(IngestResult("duplicate", blob_name[:64], source))
    limit = settings.max_upload_bytes
    if length is not None and length > limit:
        return Accepted(too_large(storage, settings, source=source, size=length))
    data = read(limit + 1)
    if len(data) > limit:
        return Accepted(too_large(storage, settings, source=source, size=length or len(data)))
    meta = {k.lower(): v for k, v in metadata.items()}
    try:
        label = clean_label(meta.get("label"))
    except ClusterlensError as exc:  # a bad label does not cost the image
        log.warning("ignoring the label of %s: %s", source, exc.message)
        label = None
    return accept_upload(storage, queues, settings, data, source=source, label=label, caption=meta.get("caption"))
