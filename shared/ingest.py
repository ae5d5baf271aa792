"""Ingest: validate image bytes, dedupe by content hash, store the image and its record.

Bad input is quarantined with a reason and never stops a batch. Every path that brings images in
(a folder, a packaged dataset, later the blob trigger and the upload API) goes through
:func:`ingest_bytes`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Literal

from shared.catalog import Catalog, ImageRecord
from shared.errors import ClusterlensError
from shared.imaging import EXTENSION_FOR_FORMAT, FILE_EXTENSIONS, decode_image
from shared.settings import Settings
from shared.storage import QUARANTINE, UPLOADS, BlobNotFound, Storage

log = logging.getLogger(__name__)

Status = Literal["added", "duplicate", "quarantined"]


@dataclass(frozen=True)
class IngestItem:
    """Bytes to ingest, where they came from, and an optional label and caption."""

    data: bytes
    source: str
    label: str | None = None
    caption: str | None = None


@dataclass(frozen=True)
class IngestResult:
    status: Status
    id: str
    source: str
    reason: str | None = None
    error: ClusterlensError | None = None  # why it was quarantined


@dataclass
class IngestSummary:
    added: int = 0
    duplicate: int = 0
    quarantined: int = 0
    problems: list[IngestResult] = field(default_factory=list)

    def count(self, result: IngestResult) -> None:
        setattr(self, result.status, getattr(self, result.status) + 1)
        if result.status == "quarantined":
            self.problems.append(result)


def content_id(data: bytes) -> str:
    """The image id: sha256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def ingest_bytes(storage: Storage, settings: Settings, item: IngestItem, *, job_id: str | None = None) -> IngestResult:
    """Validate, dedupe and store one image. Never raises for bad image data.

    Args:
        job_id: the embedding job the image is queued in, kept in its record.

    Returns:
        ``added`` (new image stored), ``duplicate`` (same bytes already known) or ``quarantined``
        (bytes kept in the quarantine container with the reason).
    """
    image_id = content_id(item.data)
    catalog = Catalog(storage)
    if catalog.exists(image_id):
        return IngestResult("duplicate", image_id, item.source)
    try:
        decoded = decode_image(item.data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
    except ClusterlensError as exc:
        quarantine(storage, image_id, item, code=exc.code, reason=exc.message)
        return IngestResult("quarantined", image_id, item.source, f"{exc.code}: {exc.message}", exc)
    blob = f"{image_id}{EXTENSION_FOR_FORMAT[decoded.format]}"
    metadata = {"sha256": image_id, "source": item.source[-256:]}
    if item.label:
        metadata["label"] = item.label
    storage.put(UPLOADS, blob, item.data, overwrite=False, metadata=metadata)
    record = ImageRecord(
        id=image_id,
        blob=blob,
        label=item.label,
        source=item.source,
        format=decoded.format,
        width=decoded.width,
        height=decoded.height,
        bytes=len(item.data),
        ingested_at=datetime.now(UTC).isoformat(timespec="seconds"),
        caption=clean_caption(item.caption, settings.max_text_chars),
        job=job_id,
    )
    # The record goes last: an image is known only once its bytes are durably stored.
    catalog.undelete(image_id)  # added again after a delete: the user wants it back
    added = catalog.add(record)
    return IngestResult("added" if added else "duplicate", image_id, item.source)


def quarantine(storage: Storage, image_id: str, item: IngestItem, *, code: str, reason: str) -> None:
    """Keep rejected bytes with the reason, for a person to look at."""
    storage.put(
        QUARANTINE,
        f"{image_id}.bin",
        item.data[: 64 * 1024 * 1024],
        metadata={"code": code, "reason": reason[:1024], "source": item.source[-256:]},
    )
    storage.put_json(
        QUARANTINE,
        f"{image_id}.json",
        {
            "id": image_id,
            "code": code,
            "reason": reason,
            "source": item.source,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    log.warning("quarantined %s (%s): %s", item.source, code, reason)


def withdraw(storage: Storage, record: ImageRecord, *, code: str, reason: str, data: bytes | None = None) -> None:
    """Move a catalogued image that turned out unusable to quarantine, then forget it.

    The bytes (if still there) and the reason go to quarantine first, so nothing is lost.

    Args:
        data: the stored bytes, when the caller has read them already.
    """
    if data is None:
        try:
            data = storage.get(UPLOADS, record.blob)
        except BlobNotFound:
            data, reason = b"", f"{reason} (the stored bytes are missing)"
    quarantine(
        storage, record.id, IngestItem(data=data, source=record.source, label=record.label), code=code, reason=reason
    )
    storage.delete(UPLOADS, record.blob)
    Catalog(storage).remove(record)


def ingest_items(
    storage: Storage, settings: Settings, items: Iterable[IngestItem], *, workers: int = 1
) -> Iterator[IngestResult]:
    """Ingest many items, one result each, in the items' order, ``workers`` at a time.

    Each image costs a few storage round trips (is it known, store the bytes, write the record): on
    ``workers`` threads they overlap. At most ``2 * workers`` items are read ahead. Two copies of the same
    bytes in flight at once are safe: the bytes and the record are written create-if-absent, so one of
    them is ``added`` and the other a ``duplicate``.
    """
    if workers <= 1:
        for item in items:
            yield ingest_bytes(storage, settings, item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        running: deque[Future[IngestResult]] = deque()
        upcoming = iter(items)
        for item in islice(upcoming, 2 * workers):
            running.append(pool.submit(ingest_bytes, storage, settings, item))
        while running:
            result = running.popleft().result()
            for item in islice(upcoming, 1):
                running.append(pool.submit(ingest_bytes, storage, settings, item))
            yield result


def scan_folder(root: Path) -> list[tuple[Path, str | None]]:
    """Image files under ``root`` (recursively) with labels from the ImageFolder layout.

    A file in ``root/<class>/...`` gets the label ``<class>``; a file directly in ``root`` none.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    found: list[tuple[Path, str | None]] = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in FILE_EXTENSIONS and not path.name.startswith("."):
            rel = path.relative_to(root)
            found.append((path, rel.parts[0] if len(rel.parts) > 1 else None))
    return found


def clean_caption(caption: str | None, max_chars: int) -> str | None:
    """A caption as stored: whitespace collapsed, control characters dropped, at most ``max_chars``."""
    if caption is None:
        return None
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in caption).split())
    return text[:max_chars] or None


def folder_items(files: list[tuple[Path, str | None]]) -> Iterator[IngestItem]:
    """Read files lazily into ingest items; ``photo.txt`` beside ``photo.jpg`` is its caption."""
    for path, label in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc)
            data = b""
        caption = None
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            try:
                caption = sidecar.read_bytes()[:8192].decode("utf-8", errors="replace")
            except OSError as exc:
                log.warning("cannot read caption %s: %s", sidecar, exc)
        yield IngestItem(data=data, source=str(path), label=label, caption=caption)
