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
    metadata = dict(getattr(blob, "metadata", None) or {})  # the concrete func.blob.InputStream has it
    name = blob.name or ""
    outcome = handle_blob(
        rt.storage, rt.queues, rt.settings, name=name, length=blob.length, metadata=metadata, read=blob.read
    )
    log.info("%s: %s", name, outcome.describe())


# Registered without rebinding the name, so tests call ``ingest_blob`` as the host would.
trigger = bp.blob_trigger("blob", "uploads/{name}", connection="AzureWebJobsStorage", source=func.BlobSource.EVENT_GRID)
bp.function_name("ingest_blob")(trigger(ingest_blob))
