"""Near-duplicate groups, the query side of :mod:`job.duplicates`: read them, resolve one, undo it.

The dedupe job publishes numbered versions in the reports container (``duplicates/v000002/groups.json``,
``calibration.json``, ``calibration.png``, ``manifest.json``; ``duplicates/CURRENT.json`` the pointer).
Resolving a group keeps one image and hides the others from search: one marker per hidden image in
the labels container (``hidden/<id>.json``: the group, the image kept, who and when). Undoing it
deletes the group's markers. Search servers list the markers (one listing, as they do deletions)
and leave hidden images out of their answers; nothing is deleted, and the next dedupe finds the
group again, marked resolved (a group's name is a hash of its members).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared.errors import BadRequest, ClusterlensError, NotFound
from shared.hidden import HIDDEN_PREFIX, hidden_ids
from shared.storage import LABELS, REPORTS, Storage
from shared.versions import read_pointer

if TYPE_CHECKING:
    from shared.search import SearchService

log = logging.getLogger(__name__)
PREFIX = "duplicates/"
_GROUP_RE = re.compile(r"^[0-9a-f]{16}$")


class NoDuplicates(NotFound):
    code = "no_duplicates"


def latest_version(storage: Storage) -> str:
    """The published dedupe version.

    Raises:
        NoDuplicates: before the first dedupe job.
    """
    version = read_pointer(storage, REPORTS, PREFIX)
    if version is None:
        raise NoDuplicates(
            'no near-duplicate search yet: run `clusterlens dedupe` or POST /api/jobs {"kind": "dedupe"}'
        )
    return version


def _read(storage: Storage, version: str, name: str) -> Any:
    return json.loads(storage.get(REPORTS, f"{PREFIX}{version}/{name}"))


def groups_page(storage: Storage, limit: int, offset: int) -> dict[str, Any]:
    """A page of the latest groups (largest first), each marked ``resolved`` with the image kept
    when its other images are hidden, and the calibration they were found with.

    Raises:
        BadRequest: limit or offset out of range. NoDuplicates: no dedupe yet.
    """
    if not 1 <= limit <= 500 or not 0 <= offset <= 10_000_000:
        raise BadRequest("limit must be 1 to 500 and offset at least 0", code="invalid_limit")
    version = latest_version(storage)
    items = _read(storage, version, "groups.json")["items"]
    calibration = _read(storage, version, "calibration.json")
    gone = hidden_ids(storage)
    page = items[offset : offset + limit]
    for group in page:
        _mark(group, gone)
    return {
        "version": version,
        "total": len(items),
        "offset": offset,
        "threshold": calibration["calibration"]["threshold"],
        "calibration": calibration["calibration"],
        "histogram": calibration.get("histogram"),
        "items": page,
    }


def _mark(group: dict[str, Any], gone: set[str]) -> None:
    ids = [m["id"] for m in group["images"]]
    shown = [i for i in ids if i not in gone]
    group["resolved"] = len(shown) == 1 and len(ids) > 1
    group["kept"] = shown[0] if group["resolved"] else None
    for m in group["images"]:
        m["hidden"] = m["id"] in gone


def find_group(storage: Storage, group: str) -> tuple[str, dict[str, Any]]:
    """(version, group) of the latest dedupe.

    Raises:
        BadRequest: not a group name. NoDuplicates: no dedupe yet. NotFound: no such group.
    """
    if not _GROUP_RE.match(group):
        raise BadRequest("a group is named by 16 hex digits", code="invalid_group")
    version = latest_version(storage)
    for item in _read(storage, version, "groups.json")["items"]:
        if item["group"] == group:
            return version, item
    raise NotFound(f"no near-duplicate group {group} in {version}", code="group_not_found")


def resolve(storage: Storage, group: str, keep: str | None, user: str | None = None) -> dict[str, Any]:
    """Keep one image of a group (``keep``, default the suggested keeper) and hide the others from
    search; images of the group hidden before and now kept are shown again.

    Raises:
        BadRequest: ``keep`` is not in the group. NotFound, NoDuplicates: see :func:`find_group`.
    """
    version, item = find_group(storage, group)
    ids = [m["id"] for m in item["images"]]
    keep = item["keeper"] if keep is None else keep
    if keep not in ids:
        raise BadRequest(f"image {keep} is not in group {group}", code="not_in_group")
    at = datetime.now(UTC).isoformat(timespec="seconds")
    storage.delete(LABELS, f"{HIDDEN_PREFIX}{keep}.json")
    hide = [i for i in ids if i != keep]
    for image_id in hide:
        marker = {"group": group, "kept": keep, "version": version, "at": at, "user": user}
        storage.put_json(LABELS, f"{HIDDEN_PREFIX}{image_id}.json", marker)
    return {"group": group, "kept": keep, "hidden": hide, "resolved": True}


def unresolve(storage: Storage, group: str) -> dict[str, Any]:
    """Show every image of a group in search again (undo :func:`resolve`).

    Raises:
        NotFound, NoDuplicates, BadRequest: see :func:`find_group`.
    """
    _, item = find_group(storage, group)
    gone = hidden_ids(storage)
    shown = [m["id"] for m in item["images"] if m["id"] in gone]
    storage.delete_many(LABELS, [f"{HIDDEN_PREFIX}{image_id}.json" for image_id in shown])
    return {"group": group, "shown": shown, "resolved": False}


class ThresholdCache:
    """The latest dedupe's threshold, read at most every ``seconds`` (the upload path asks on every upload)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._value: float | None = None

    def get(self, storage: Storage) -> float | None:
        """The threshold, or None before the first dedupe (or when no threshold reached its target)."""
        with self._lock:
            if time.monotonic() - self._at >= self.seconds:
                self._value = None
                version = read_pointer(storage, REPORTS, PREFIX)
                if version is not None:
                    calibration = _read(storage, version, "calibration.json")["calibration"]
                    # a version from before the pixel match (a cosine threshold) is not comparable: none
                    usable = calibration.get("reached") and calibration.get("signal") == "pixel_match"
                    self._value = float(calibration["threshold"]) if usable else None
                self._at = time.monotonic()
            return self._value


UPLOAD_CANDIDATES = 5  # indexed images an upload is pixel-matched with


def near_duplicate_of(
    service: SearchService, cache: ThresholdCache, data: bytes, image_id: str
) -> dict[str, Any] | None:
    """The indexed image an upload is a near-duplicate of, by the latest dedupe's calibrated threshold:
    ``{id, similarity, threshold}`` (similarity: the pixel match, :mod:`shared.pixel_match`), or None (no
    dedupe or index yet, or nothing that close). Costs one search (the upload is encoded as a query is)
    and the pixel match with its :data:`UPLOAD_CANDIDATES` nearest; never fails an upload."""
    import numpy as np

    from shared.catalog import Catalog
    from shared.imaging import decode_image
    from shared.pixel_match import match_scores, thumbnail

    try:
        threshold = cache.get(service.storage)
        if threshold is None:
            return None
        settings = service.settings
        limits = {"max_bytes": settings.max_upload_bytes, "max_pixels": settings.max_image_pixels}
        hits = [h["id"] for h in service.search_image(data, UPLOAD_CANDIDATES + 1)["results"] if h["id"] != image_id]
        catalog = Catalog(service.storage)
        thumbs, ids = [thumbnail(decode_image(data, **limits).rgb)], []
        for hit in hits[:UPLOAD_CANDIDATES]:
            try:
                thumbs.append(thumbnail(decode_image(catalog.image_bytes(catalog.get(hit)), **limits).rgb))
                ids.append(hit)
            except ClusterlensError:  # deleted or unreadable since it was indexed
                continue
        if not ids:
            return None
        scores = match_scores(np.stack(thumbs), np.zeros(len(ids), np.int64), np.arange(1, len(ids) + 1))
        best = int(np.argmax(scores))
        if scores[best] >= threshold:
            return {"id": ids[best], "similarity": round(float(scores[best]), 4), "threshold": threshold}
    except ClusterlensError as exc:  # no index or model yet: the upload stands, without the check
        log.info("near-duplicate check skipped: %s", exc.message)
    return None
