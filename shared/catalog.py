"""The image catalogue: one JSON record per unique image, keyed by content hash.

Record blob: ``embeddings/records/<id>.json`` where ``id`` is the sha256 of the image bytes.
Fields: id, blob (name in the uploads container, or in ``container``), label (or null), source, format, width,
height, bytes, ingested_at, caption (or null), job (the embedding job that was queued for it, or null),
container (null: the app's uploads container; else the user's source container the image was registered in,
in place, by ``clusterlens ingest --container``: its bytes were never copied, and are only ever read there).
Records are written create-if-absent, so ingesting the same bytes twice is a no-op, whoever does it.

Pending marker: ``embeddings/pending/<job or "none">/<id>.json``, a copy of the record written right after
it and deleted once the image's embedding is durably stored (or the image removed). The markers are
what is left to embed, so an embedding job reads its own images' markers (one request each) instead
of every shard to find what is done, and a sweep for images whose job died lists only the markers,
grouped by job. A record whose marker was never written (a crash between the two writes, or
catalogued before markers existed) is found by ``clusterlens embed`` (every image: the full check).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from shared.errors import BadRequest, NotFound
from shared.storage import EMBEDDINGS, UPLOADS, BlobNotFound, Storage

RECORDS_PREFIX = "records/"
DELETED_PREFIX = "deleted/"  # tombstones: deleted images stay out of every later index
PENDING_PREFIX = "pending/"
NO_JOB = "none"  # the pending folder of images no embedding job was queued for (e.g. `clusterlens ingest`)
_ID_RE = re.compile(r"^[0-9a-f]{64}$")


def check_image_id(image_id: str) -> str:
    """Validate an image id (64 lowercase hex characters, a sha256).

    Raises:
        BadRequest: if it is not one.
    """
    if not isinstance(image_id, str) or not _ID_RE.match(image_id):
        raise BadRequest("an image id is 64 lowercase hex characters (the sha256 of the image)", code="invalid_id")
    return image_id


@dataclass(frozen=True)
class ImageRecord:
    """What the catalogue knows about one image."""

    id: str
    blob: str
    label: str | None
    source: str
    format: str
    width: int
    height: int
    bytes: int
    ingested_at: str
    caption: str | None = None
    job: str | None = None  # the embedding job it was queued in (blob trigger and upload API)
    container: str | None = None  # None: ``blob`` is in uploads; else the source container it was registered in

    @property
    def in_place(self) -> bool:
        """Whether the image is a user's original, registered where it is (never copied, never deleted by us)."""
        return self.container is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ImageRecord:
        return cls(**{k: value.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


class Catalog:
    """Reads and writes image records in storage."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def _name(image_id: str) -> str:
        return f"{RECORDS_PREFIX}{image_id}.json"

    @staticmethod
    def pending_name(image_id: str, job: str | None) -> str:
        """The pending marker of an image queued in embedding job ``job`` (None: no job)."""
        return f"{PENDING_PREFIX}{job or NO_JOB}/{image_id}.json"

    def add(self, record: ImageRecord) -> bool:
        """Store a record unless one exists for the id, then its pending marker. Returns whether it was new."""
        added = self.storage.put_json(EMBEDDINGS, self._name(record.id), record.to_json(), overwrite=False)
        if added:
            self.storage.put_json(EMBEDDINGS, self.pending_name(record.id, record.job), record.to_json())
        return added

    def image_bytes(self, record: ImageRecord) -> bytes:
        """The image's bytes: from the uploads container, or in place from the source container it was
        registered in (``record.container``). Every reader of an image's bytes goes through here.

        Raises:
            BlobNotFound: if they are gone.
        """
        if record.container is None:
            return self.storage.get(UPLOADS, record.blob)
        return self.storage.get_source(record.container, record.blob)

    def remove(self, record: ImageRecord) -> bool:
        """Forget an image: its pending marker, then its record. Returns whether the record existed."""
        self.embedded(record.id, record.job)
        return self.storage.delete(EMBEDDINGS, self._name(check_image_id(record.id)))

    def pending(self, image_id: str, job: str | None) -> ImageRecord | None:
        """The record of an image still waiting for its embedding (one request), or None if it is not."""
        try:
            return ImageRecord.from_json(self.storage.get_json(EMBEDDINGS, self.pending_name(image_id, job)))
        except BlobNotFound:
            return None

    def embedded(self, image_id: str, job: str | None) -> None:
        """Drop an image's pending marker: its embedding is stored (or it is gone)."""
        self.storage.delete(EMBEDDINGS, self.pending_name(image_id, job))

    def embedded_many(self, done: list[tuple[str, str | None]]) -> None:
        """Drop the pending markers of many images (``(id, job)`` each) in as few requests as the store
        allows (:meth:`Storage.delete_many`: 256 a request on Blob Storage)."""
        self.storage.delete_many(EMBEDDINGS, [self.pending_name(i, job) for i, job in done])

    def pending_by_job(self) -> dict[str | None, list[str]]:
        """Every image still waiting for its embedding, by the job it was queued in (None: no job).
        Lists the markers only (one request per 5,000 on Blob Storage)."""
        out: dict[str | None, list[str]] = {}
        for name in self.storage.list(EMBEDDINGS, PENDING_PREFIX):
            job, _, file = name[len(PENDING_PREFIX) :].partition("/")
            if file.endswith(".json"):
                out.setdefault(None if job == NO_JOB else job, []).append(file[: -len(".json")])
        return out

    def exists(self, image_id: str) -> bool:
        return self.storage.exists(EMBEDDINGS, self._name(image_id))

    def delete(self, image_id: str) -> ImageRecord:
        """Delete an image for good: tombstone first, then its bytes, then its record.

        The tombstone keeps the id out of later indexes although its embedding stays in the
        (immutable) shards; written first, an interrupted delete still hides the image. Ingesting
        the same bytes again later is taken as intent and lifts it. An image registered in place
        (``record.container``) is the user's original: it is left where it is (only the tombstone and the
        record removal), so it leaves the app, not the user's container.

        Raises:
            BadRequest: malformed id. NotFound: no such image.
        """
        from datetime import UTC, datetime

        record = self.get(image_id)
        self.storage.put_json(
            EMBEDDINGS,
            f"{DELETED_PREFIX}{image_id}.json",
            {"id": image_id, "source": record.source, "at": datetime.now(UTC).isoformat(timespec="seconds")},
        )
        if not record.in_place:
            self.storage.delete(UPLOADS, record.blob)
        self.remove(record)
        return record

    def undelete(self, image_id: str) -> bool:
        """Lift a tombstone (the image is being added again). Returns whether there was one."""
        return self.storage.delete(EMBEDDINGS, f"{DELETED_PREFIX}{check_image_id(image_id)}.json")

    def deleted_ids(self) -> set[str]:
        """Ids of deleted images."""
        return {
            name[len(DELETED_PREFIX) : -len(".json")]
            for name in self.storage.list(EMBEDDINGS, DELETED_PREFIX)
            if name.endswith(".json")
        }

    def get(self, image_id: str) -> ImageRecord:
        """The record for an id.

        Raises:
            BadRequest: malformed id.
            NotFound: no such image.
        """
        check_image_id(image_id)
        try:  # one request: read it, rather than ask whether it exists first
            value = self.storage.get_json(EMBEDDINGS, self._name(image_id))
        except BlobNotFound:
            raise NotFound(f"no image with id {image_id}", code="image_not_found") from None
        return ImageRecord.from_json(value)

    def ids(self) -> Iterator[str]:
        """All image ids, in lexical order."""
        for name in self.storage.list(EMBEDDINGS, RECORDS_PREFIX):
            if name.endswith(".json"):
                yield name[len(RECORDS_PREFIX) : -len(".json")]

    def records(self) -> Iterator[ImageRecord]:
        """All records, in id order."""
        for image_id in self.ids():
            yield ImageRecord.from_json(self.storage.get_json(EMBEDDINGS, self._name(image_id)))
