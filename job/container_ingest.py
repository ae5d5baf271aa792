"""Backfill in place: the ``ingest_container`` job registers the images already in a Blob container.

Each image blob is read once (hash, dedupe, decode) and never copied (:func:`shared.ingest.ingest_container`);
the new images are queued in one embedding job, ``embed-after-<this job's id>``, sent to the GPU queue when
the listing is done. Like the upload path, each new image is noted in that job's items
(:meth:`shared.jobs.JobStore.add_item`) before the job can be seen, so the embedding job reads only its
own images' pending markers. A retry re-reads the container: images it finds catalogued by an earlier
try of this job are noted again (create-if-absent), so nothing an earlier try added is left unembedded.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from shared.catalog import Catalog
from shared.errors import NotFound
from shared.ingest import IngestSummary, SourceBlobs, ingest_container
from shared.jobs import JobMessage, JobStore, enqueue
from shared.queues import JobQueues
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)

INGEST_WORKERS = 16  # blobs in flight, as `clusterlens ingest --workers` defaults to


def register_container(
    storage: Storage,
    settings: Settings,
    queues: JobQueues,
    job_id: str,
    blobs: SourceBlobs,
    *,
    retry: bool = False,
    progress: Callable[[int, int | None, str | None], None] | None = None,
    workers: int = INGEST_WORKERS,
) -> dict[str, Any]:
    """Run an ``ingest_container`` job: register a source container's blobs (under a prefix) in place.

    Args:
        job_id: the ``ingest_container`` job's id.
        blobs: the container and prefix (:func:`shared.ingest.open_container`, from the job's ``params``).
        retry: an earlier try may have catalogued images for this job (they are noted for embedding again).
        progress: called with (blobs done, None, "ingest") after each blob.

    Returns:
        the job's result: the counts, quarantine reasons by code, and the embedding job queued (if any).
    """
    embed_id = f"embed-after-{job_id}"
    store, catalog = JobStore(storage), Catalog(storage)
    summary = IngestSummary()
    reasons: Counter[str] = Counter()
    done = 0
    for result in ingest_container(storage, settings, blobs, workers=workers, job_id=embed_id):
        summary.count(result)
        if result.status == "added" or (
            result.status == "duplicate" and retry and _queued_in(catalog, result.id, embed_id)
        ):
            store.add_item(embed_id, result.id)
        elif result.status == "quarantined":
            reasons[(result.reason or "").split(":", 1)[0]] += 1
        done += 1
        if progress:
            progress(done, None, "ingest")
    out: dict[str, Any] = {
        "container": blobs.container,
        "prefix": blobs.prefix,
        "listed": blobs.listed,
        "skipped": blobs.skipped,
        "added": summary.added,
        "duplicate": summary.duplicate,
        "quarantined": summary.quarantined,
        "quarantine_reasons": dict(reasons),
    }
    if summary.added or (retry and store.items(embed_id)):
        follow = JobMessage(job_id=embed_id, kind="embed", origin=f"job:{job_id}", created_at=datetime.now(UTC))
        enqueue(storage, queues, follow)
        out["embed_job"] = embed_id
    log.info("ingest_container %s: %s", job_id, out)
    return out


def _queued_in(catalog: Catalog, image_id: str, job: str) -> bool:
    """Whether a catalogued image was queued in embedding job ``job`` (False if it is gone meanwhile)."""
    try:
        return catalog.get(image_id).job == job
    except NotFound:
        return False
