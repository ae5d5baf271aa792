"""``GET /api/health``: model and index versions and counts; it reports, it never fails."""

from __future__ import annotations

from typing import Any

from shared.live_index import LiveIndex
from shared.models import Models


def health(models: Models, live: LiveIndex) -> dict[str, Any]:
    """``status`` ok or degraded, the encoder and the served index (None with an ``*_error`` when missing)."""
    out: dict[str, Any] = {"status": "ok", "encoder": None, "index": None}
    try:
        enc = models.image()
        out["encoder"] = {"version": enc.version, "providers": enc.providers, "dim": enc.dim}
    except Exception as exc:  # noqa: BLE001 - health reports, it does not fail
        out["status"] = "degraded"
        out["encoder_error"] = getattr(exc, "message", type(exc).__name__)
    try:
        idx = live.get()
        m = idx.manifest
        out["index"] = {
            "version": m.version,
            "encoder_version": m.encoder_version,
            "count": idx.count,
            "clusters": m.nlist,
            "nprobe": idx.nprobe,
            "factory": m.factory,
            "kind": m.kind,
            "bytes_per_vector": m.bytes_per_vector,
            "space": m.space,
            "memory_mapped": idx.mapped is not None,
            "recall_at_10": m.recall.at_10 if m.recall else None,
            "dim": m.dim,
            "built_at": m.built_at,
            "labels": len(idx.label_names),
        }
    except Exception as exc:  # noqa: BLE001
        out["status"] = "degraded"
        out["index_error"] = getattr(exc, "message", type(exc).__name__)
    return out
