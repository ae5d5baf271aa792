"""Ingest: validate image bytes, dedupe by content hash, store the image and its record.

Bad input is quarantined with a reason and never stops a batch. Every path that brings images in
(a folder, a packaged dataset, the blob trigger, the upload API, a container registered in place)
goes through :func:`ingest_bytes`.

:func:`ingest_container` registers the images already in a user's Blob container *in place*: each
blob is read once (to hash and validate it) and never copied; its record points at the original
(``ImageRecord.container``), which the app only ever reads (never deletes, not even on delete or quarantine).
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Literal, TypeVar

from shared.catalog import Catalog, ImageRecord
from shared.errors import BadRequest, ClusterlensError
from shared.imaging import EXTENSION_FOR_FORMAT, FILE_EXTENSIONS, decode_image
from shared.settings import Settings
from shared.storage import QUARANTINE, UPLOADS, BlobNotFound, Storage, check_source_blob_name

log = logging.getLogger(__name__)

Status = Literal["added", "duplicate", "quarantined"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class IngestItem:
    """Bytes to ingest, where they came from, and an optional label and caption.

    With ``container``, the bytes are those of blob ``blob`` in that source container: the image is
    registered in place (its record points there) and the bytes are not copied.
    """

    data: bytes
    source: str
    label: str | None = None
    caption: str | None = None
    container: str | None = None
    blob: str | None = None


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
    if item.container is not None and item.blob is not None:
        blob = item.blob  # in place: the record points at the original, nothing is copied
    else:
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
        container=item.container if item.blob is not None else None,
    )
    # The record goes last: an image is known only once its bytes are durably stored.
    catalog.undelete(image_id)  # added again after a delete: the user wants it back
    added = catalog.add(record)
    return IngestResult("added" if added else "duplicate", image_id, item.source)


def quarantine(storage: Storage, image_id: str, item: IngestItem, *, code: str, reason: str) -> None:
    """Keep rejected bytes with the reason, for a person to look at.

    A blob read in place (``item.container``) is not copied: the bytes stay in the user's container,
    which the reason names; the quarantine keeps an empty ``.bin`` (with the metadata) and the reason.
    """
    in_place = item.container is not None
    if in_place:
        reason = f"{reason} (left in place: {item.source})"
    storage.put(
        QUARANTINE,
        f"{image_id}.bin",
        b"" if in_place else item.data[: 64 * 1024 * 1024],
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

    The bytes (if still there) and the reason go to quarantine first, so nothing is lost. An image
    registered in place is only forgotten: its original stays in the user's container (the reason says where).

    Args:
        data: the stored bytes, when the caller has read them already.
    """
    catalog = Catalog(storage)
    if record.in_place:
        data = b""
    elif data is None:
        try:
            data = catalog.image_bytes(record)
        except BlobNotFound:
            data, reason = b"", f"{reason} (the stored bytes are missing)"
    item = IngestItem(data=data, source=record.source, label=record.label, container=record.container, blob=record.blob)
    quarantine(storage, record.id, item, code=code, reason=reason)
    if not record.in_place:
        storage.delete(UPLOADS, record.blob)
    catalog.remove(record)


def ingest_items(
    storage: Storage, settings: Settings, items: Iterable[IngestItem], *, workers: int = 1
) -> Iterator[IngestResult]:
    """Ingest many items, one result each, in the items' order, ``workers`` at a time.

    Each image costs a few storage round trips (is it known, store the bytes, write the record): on
    ``workers`` threads they overlap. At most ``2 * workers`` items are read ahead. Two copies of the same
    bytes in flight at once are safe: the bytes and the record are written create-if-absent, so one of
    them is ``added`` and the other a ``duplicate``.
    """
    return _in_order(lambda item: ingest_bytes(storage, settings, item), items, workers)


def _in_order(work: Callable[[_T], IngestResult], inputs: Iterable[_T], workers: int) -> Iterator[IngestResult]:
    """``work`` over ``inputs`` on ``workers`` threads, results in the inputs' order, at most ``2 * workers`` ahead."""
    if workers <= 1:
        yield from map(work, inputs)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        running: deque[Future[IngestResult]] = deque()
        upcoming = iter(inputs)
        for value in islice(upcoming, 2 * workers):
            running.append(pool.submit(work, value))
        while running:
            result = running.popleft().result()
            for value in islice(upcoming, 1):
                running.append(pool.submit(work, value))
            yield result


@dataclass
class SourceBlobs:
    """The blobs of a source container under a prefix, to register in place (see :func:`open_container`).

    Iterating lists them (one request per 5,000 on Blob Storage) and yields (name, size, label) for
    names with an image extension; the others are counted in ``skipped`` and never read. The label
    comes from the layout, as for a folder: ``<prefix folder>/<class>/.../<file>`` is labelled ``<class>``.
    """

    storage: Storage
    container: str
    prefix: str = ""
    listed: int = 0
    skipped: int = 0

    def __iter__(self) -> Iterator[tuple[str, int, str | None]]:
        base = self.prefix.rsplit("/", 1)[0] + "/" if "/" in self.prefix else ""
        for name, size in self.storage.list_source(self.container, self.prefix):
            self.listed += 1
            if not name.lower().endswith(tuple(FILE_EXTENSIONS)) or name.rsplit("/", 1)[-1].startswith("."):
                self.skipped += 1
                continue
            parts = name[len(base) :].split("/")
            yield name, size, parts[0] if len(parts) > 1 and parts[0] else None


def open_container(storage: Storage, container: str, prefix: str = "") -> SourceBlobs:
    """A user's container (its real name; on the local backend a folder under the storage root) to register in place.

    Raises:
        BadRequest: an invalid container name or prefix, or one of the app's own containers.
        NotFound: no such container.
    """
    storage.check_source(container)
    if not isinstance(prefix, str) or len(prefix) > 1024 or any(ord(ch) < 32 for ch in prefix):
        raise BadRequest("a prefix is at most 1024 printable characters", code="invalid_prefix")
    return SourceBlobs(storage, container, prefix)


def ingest_container(
    storage: Storage, settings: Settings, blobs: SourceBlobs, *, workers: int = 1, job_id: str | None = None
) -> Iterator[IngestResult]:
    """Register a container's images in place, one result per image blob, in name order, ``workers`` at a time.

    Each blob is read once (hash, dedupe, decode) and never copied: its record points at the original.
    A blob over ``max_upload_bytes`` (its size comes with the listing) or with a name that cannot be read
    safely is quarantined unread; one that does not decode is quarantined with the reason. Nothing in the
    container is written or deleted. Running it again re-reads every blob (each a ``duplicate``).

    Args:
        job_id: the embedding job the new images are queued in (their records' ``job``).
    """

    def one(blob: tuple[str, int, str | None]) -> IngestResult:
        name, size, label = blob
        source = f"{blobs.container}/{name}"
        try:
            check_source_blob_name(name)
        except ValueError:
            return _unread(storage, blobs.container, name, "invalid_blob_name", "a name that cannot be read in place")
        if size > settings.max_upload_bytes:
            reason = f"{size} bytes is over the {settings.max_upload_bytes}-byte limit"
            return _unread(storage, blobs.container, name, "payload_too_large", reason)
        try:
            data = storage.get_source(blobs.container, name)
        except BlobNotFound:
            return _unread(storage, blobs.container, name, "blob_not_found", "deleted since the container was listed")
        item = IngestItem(data=data, source=source, label=label, container=blobs.container, blob=name)
        return ingest_bytes(storage, settings, item, job_id=job_id)

    return _in_order(one, blobs, workers)


def _unread(storage: Storage, container: str, name: str, code: str, reason: str) -> IngestResult:
    """Quarantine a source blob without reading it (keyed by the hash of its name: its bytes are unknown)."""
    source = f"{container}/{name}"
    pseudo_id = content_id(source.encode())
    item = IngestItem(data=b"", source=source, container=container, blob=name)
    quarantine(storage, pseudo_id, item, code=code, reason=reason)
    return IngestResult("quarantined", pseudo_id, source, f"{code}: {reason}")


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
