"""Blob trigger: an image lands in the uploads container (delivered by Event Grid)."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.runtime import get_runtime
from shared.uploads import handle_blob

log = logging.getLogger(__name__)
bp = func.Blueprint()


def ingest_blob(blob: func.InputStream) -> None:
    """Validate, dedupe and store the image, then queue its embedding; bad input is quarantined."""
    rt = get_runtime()
    outcome = handle_blob(
        rt.storage,
        rt.queue,
        rt.settings,
        name=blob.name or "",
        length=blob.length,
        metadata=dict(getattr(blob, "metadata", None) or {}),  # the concrete func.blob.InputStream has it
        read=blob.read,
    )
    result = outcome.result
    log.info(
        "%s: %s %s%s",
        blob.name,
        result.status,
        result.id[:12],
        f" (job {outcome.job.job_id}{', queued' if outcome.queued else ''})" if outcome.job else "",
    )


# Registered without rebinding the name, so tests call ``ingest_blob`` as the host would.
bp.function_name("ingest_blob")(
    bp.blob_trigger(
        arg_name="blob", path="uploads/{name}", connection="AzureWebJobsStorage", source=func.BlobSource.EVENT_GRID
    )(ingest_blob)
)
