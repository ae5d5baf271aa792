"""Durable embeddings: Parquet shards keyed by image id, one folder per encoder version.

Shard blob: ``embeddings/vectors/<encoder version>/part-<utc time>-<random>-<n>.parquet`` with columns
``id`` (string), ``embedding`` (float32 list), ``top_class`` (int16 list), ``top_prob`` (float32
list: the top ImageNet classes and their probabilities), and the catalogue fields an index needs,
copied from each image's record when it was embedded: ``label`` and ``caption`` (strings, null for
none) and ``ingested`` (int64, UTC epoch seconds). Records never change once written (labels given
later live in the label log), so the shards are also the catalogue in bulk: a rebuild reads them and
makes no request per image. A shard is written in one atomic put, so an interrupted run loses at
most the shard in flight, and the next run embeds only what is missing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.catalog import Catalog, ImageRecord
from shared.encoder import softmax
from shared.errors import ClusterlensError, NotFound
from shared.imaging import decode_image
from shared.ingest import withdraw
from shared.settings import Settings
from shared.storage import EMBEDDINGS, Storage

if TYPE_CHECKING:
    from shared.encoder import ImageEncoder

log = logging.getLogger(__name__)

VECTORS_PREFIX = "vectors/"
TOP_CLASSES = 5


def version_folder(encoder_version: str) -> str:
    """A blob-name-safe folder for an encoder version."""
    return VECTORS_PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", encoder_version) + "/"


@dataclass
class EmbeddingSet:
    """All stored embeddings of one encoder version.

    Attributes:
        ids: image ids, length n, in shard order.
        vectors: float32 (n, d).
        top_class: int16 (n, TOP_CLASSES) ImageNet class indices, most probable first.
        top_prob: float32 (n, TOP_CLASSES) their probabilities.
        shards: the shard names read.
        labels, captions: each row's label and caption given at ingest (None for none).
        ingested: int64 (n,) ingest time, UTC epoch seconds.
        unrecorded: bool (n,) rows read from shards written before shards carried the catalogue
            fields (their labels, captions and times are placeholders: see :func:`fill_records`).
    """

    ids: list[str]
    vectors: np.ndarray
    top_class: np.ndarray
    top_prob: np.ndarray
    shards: list[str]
    labels: list[str | None] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    ingested: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unrecorded: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


class EmbeddingStore:
    """Reads and writes embedding shards for one encoder version."""

    def __init__(self, storage: Storage, encoder_version: str):
        self.storage = storage
        self.encoder_version = encoder_version
        self.prefix = version_folder(encoder_version)

    def shards(self) -> list[str]:
        return [n for n in self.storage.list(EMBEDDINGS, self.prefix) if n.endswith(".parquet")]

    def write_shard(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        logits: np.ndarray,
        records: Sequence[ImageRecord | None] | None = None,
        job: str | None = None,
    ) -> str:
        """Store one shard; returns its name.

        Args:
            records: each row's catalogue record (its label, caption and ingest time are kept in the
                shard); None, or a None entry, stores none for that row.
            job: the job writing it, named in the shard's name so a retry finds its earlier work.
        """
        import pyarrow.parquet as pq

        if vectors.ndim != 2 or len(ids) != len(vectors) or len(logits) != len(ids):
            raise ValueError("ids, vectors and logits must have the same length")
        if records is None:
            records = [None] * len(ids)
        if len(records) != len(ids):
            raise ValueError("ids and records must have the same length")
        probs = softmax(logits)
        top = np.argsort(-probs, axis=1)[:, :TOP_CLASSES]
        rows = EmbeddingSet(
            list(ids),
            vectors,
            top,
            np.take_along_axis(probs, top, axis=1),
            [],
            [r.label if r else None for r in records],
            [r.caption if r else None for r in records],
            np.array([epoch(r.ingested_at) if r else -1 for r in records], np.int64),
            np.array([r is None for r in records], bool),
        )
        table = shard_table(self.encoder_version, rows)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = self.shard_name(len(ids), job)
        self.storage.put(EMBEDDINGS, name, buf.getvalue(), overwrite=False)
        return name

    def shard_name(self, rows: int, job: str | None = None) -> str:
        """A new shard's blob name: its time, a random part, the job that wrote it (:func:`job_tag`, if
        any) and its row count (see :func:`rows_in_name`)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        tag = f"-{job_tag(job)}" if job else ""
        # The random part keeps two writers (parallel job replicas) from ever sharing a name.
        return f"{self.prefix}part-{stamp}-{uuid.uuid4().hex[:8]}{tag}-{rows:06d}.parquet"

    def ids_written_by(self, job: str) -> set[str]:
        """Ids in the shards an earlier try of ``job`` wrote: one listing of the shard names, then only
        those shards (a retried job's own work, whatever the collection's size)."""
        tag = f"-{job_tag(job)}-"
        done: set[str] = set()
        for name in self.shards():
            if tag in name:
                done.update(self._read_table(name, ["id"]).column("id").to_pylist())
        return done

    def _read_table(self, name: str, columns: list[str] | None = None) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # The bytes are copied into memory Arrow owns. read_table can leave the reader's last
        # reference on one of Arrow's pool threads; if that reference keeps a Python bytes object
        # alive, its release needs the GIL, and after interpreter shutdown that thread is unwound
        # through C++ and the process aborts ("terminate called without an active exception",
        # apache/arrow#34314; seen in about one `clusterlens embed` in ten here, found with gdb).
        data = self.storage.get(EMBEDDINGS, name)
        owned = pa.allocate_buffer(len(data))
        np.frombuffer(owned, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        return pq.read_table(pa.BufferReader(owned), columns=columns, use_threads=False)

    def embedded_ids(self) -> set[str]:
        """Ids that have an embedding for this encoder version."""
        done: set[str] = set()
        for name in self.shards():
            done.update(self._read_table(name, ["id"]).column("id").to_pylist())
        return done

    def load(self, shards: list[str] | None = None, skip: set[str] | None = None) -> EmbeddingSet:
        """All embeddings of this version; an id stored twice (a retried shard) counts once.

        Args:
            shards: read only these shards (default: all).
            skip: ids to leave out (e.g. those already indexed).
        """
        parts = list(self.iter_chunks(shards, skip))
        shards = self.shards() if shards is None else shards
        if not parts:
            return EmbeddingSet(
                [],
                np.zeros((0, 0), np.float32),
                np.zeros((0, TOP_CLASSES), np.int16),
                np.zeros((0, TOP_CLASSES), np.float32),
                shards,
            )
        return EmbeddingSet(
            [i for p in parts for i in p.ids],
            np.concatenate([p.vectors for p in parts]).astype(np.float32, copy=False),
            np.concatenate([p.top_class for p in parts]),
            np.concatenate([p.top_prob for p in parts]),
            shards,
            [x for p in parts for x in p.labels],
            [x for p in parts for x in p.captions],
            np.concatenate([p.ingested for p in parts]),
            np.concatenate([p.unrecorded for p in parts]),
        )

    def iter_chunks(self, shards: list[str] | None = None, skip: set[str] | None = None) -> Iterator[EmbeddingSet]:
        """The stored embeddings shard by shard (one :class:`EmbeddingSet` each, ``shards`` its name):
        what a bounded-memory pass reads. An id seen in an earlier shard (or in ``skip``) is left out."""
        seen: set[str] = set(skip or ())
        for name in self.shards() if shards is None else shards:
            table = self._read_table(name)
            shard_ids = table.column("id").to_pylist()
            keep = np.array([i not in seen for i in shard_ids], dtype=bool)
            seen.update(shard_ids)
            if keep.any():
                yield embedding_set(name, table, keep)


def embedding_set(name: str, table: Any, keep: np.ndarray) -> EmbeddingSet:
    """The rows of one shard's table where ``keep`` (bool, one per row) is set, as an :class:`EmbeddingSet`."""
    n = table.num_rows
    shard_ids = table.column("id").to_pylist()
    rows = np.flatnonzero(keep)
    if "ingested" in table.column_names:
        labels = table.column("label").to_pylist()
        captions = table.column("caption").to_pylist()
        ingested = table.column("ingested").to_numpy(zero_copy_only=False).astype(np.int64)
        unrecorded = ingested < 0
    else:  # written before shards carried the catalogue fields
        labels, captions = [None] * n, [None] * n
        ingested, unrecorded = np.full(n, -1, np.int64), np.ones(n, bool)
    return EmbeddingSet(
        [shard_ids[r] for r in rows],
        fixed_list(table, "embedding", n)[keep].astype(np.float32, copy=False),
        fixed_list(table, "top_class", n)[keep],
        fixed_list(table, "top_prob", n)[keep],
        [name],
        [labels[r] for r in rows],
        [captions[r] for r in rows],
        ingested[keep],
        unrecorded[keep],
    )


def shard_table(encoder_version: str, emb: EmbeddingSet) -> Any:
    """An :class:`EmbeddingSet` as a shard's Arrow table (the columns :meth:`EmbeddingStore.write_shard`
    writes; rows still unrecorded keep -1 as their ingest time)."""
    import pyarrow as pa

    n, d = emb.vectors.shape
    t = emb.top_class.shape[1]
    ingested = np.where(emb.unrecorded, -1, emb.ingested) if len(emb.unrecorded) else emb.ingested
    return pa.table(
        {
            "id": pa.array(emb.ids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.vectors.astype(np.float32).ravel()), d),
            "top_class": pa.FixedSizeListArray.from_arrays(pa.array(emb.top_class.astype(np.int16).ravel()), t),
            "top_prob": pa.FixedSizeListArray.from_arrays(pa.array(emb.top_prob.astype(np.float32).ravel()), t),
            "label": pa.array(emb.labels, pa.string()),
            "caption": pa.array(emb.captions, pa.string()),
            "ingested": pa.array(np.asarray(ingested, np.int64), pa.int64()),
        },
        metadata={"encoder_version": encoder_version},
    )


def rows_in_name(name: str) -> int | None:
    """The row count a shard's name ends with (``...-004096.parquet``), or None for a name without one."""
    match = re.search(r"-(\d+)\.parquet$", name)
    return int(match.group(1)) if match else None


def job_tag(job: str) -> str:
    """A blob-name-safe tag for a job id in shard names (``j`` and 12 hex digits of its sha256)."""
    return "j" + hashlib.sha256(job.encode()).hexdigest()[:12]


def fill_records(catalog: Catalog, emb: EmbeddingSet) -> EmbeddingSet:
    """Complete the rows of shards written before shards carried the catalogue fields, one record
    request each (none for shards written since); a row whose record has gone keeps no label."""
    for row in np.flatnonzero(emb.unrecorded):
        try:
            record = catalog.get(emb.ids[row])
        except NotFound:
            continue
        emb.labels[row], emb.captions[row] = record.label, record.caption
        emb.ingested[row] = epoch(record.ingested_at)
    emb.unrecorded = np.zeros(len(emb.ids), bool)
    return emb


def epoch(iso: str) -> int:
    """UTC epoch seconds of an ISO time (a time without a zone is taken as UTC)."""
    when = datetime.fromisoformat(iso)
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def fixed_list(table: Any, column: str, n: int) -> np.ndarray:
    flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat).reshape(n, -1)


@dataclass
class EmbedStats:
    """What an embed run did, with per-stage seconds (decode overlaps inference)."""

    pending: int = 0
    embedded: int = 0
    done: int = 0  # of ``only``: found embedded already
    failed: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(
        default_factory=lambda: {"list": 0.0, "decode": 0.0, "infer": 0.0, "write": 0.0, "wait": 0.0, "total": 0.0}
    )

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds["total"] if self.seconds["total"] else 0.0


@dataclass
class _Batch:
    ids: list[str]
    pixels: np.ndarray
    failed: list[str]
    decode_seconds: float
    records: list[ImageRecord | None] = field(default_factory=list)  # of ``ids``
    done: list[str] = field(default_factory=list)  # found embedded already: neither embedded nor failed


@dataclass
class Loaded:
    """One image after its fetch and decode: its encoder input, or why there is none."""

    image_id: str
    pixels: np.ndarray | None  # (3, size, size) float32; None when the image was skipped
    decode_seconds: float = 0.0
    record: ImageRecord | None = None
    done: bool = False  # skipped because its embedding is stored already


def decode_workers(settings: Settings) -> int:
    """Decode threads: the setting, or one per core this process may run on (0)."""
    if settings.embed_decode_workers:
        return settings.embed_decode_workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def prefetch_batches(
    items: Sequence[str],
    fetch: Callable[[str], Any],
    decode: Callable[[Any], Loaded],
    batch_size: int,
    *,
    io_workers: int,
    decode_workers: int,
    window: int | None = None,
) -> Iterator[_Batch]:
    """Fetch items on ``io_workers`` threads, decode on ``decode_workers``, yield batches in ``items`` order.

    Fetching is I/O: its threads mostly wait on storage, so many requests are in flight at once and their
    latencies overlap instead of adding up (one task per item). Decoding is CPU work, one task per batch on
    a pool sized to the cores: it decodes each item as soon as its fetch is done, so a batch is ready
    moments after its last item arrives, while the next batches are being fetched. At most ``window``
    items (default: two batches, at least twice the fetch threads) are being fetched ahead.

    Args:
        fetch: reads one item (e.g. its record and bytes); its result goes to ``decode``.
        decode: turns a fetched item into encoder input (:class:`Loaded`; ``pixels`` None to skip it).
    """
    window = window or max(2 * batch_size, 2 * io_workers)
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    # The decode pool is entered first so it is shut down last (its tasks wait on fetches).
    with (
        ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode") as decoders,
        ThreadPoolExecutor(max_workers=io_workers, thread_name_prefix="fetch") as fetchers,
    ):

        def decode_batch(fetches: list[Future[Any]]) -> _Batch:
            return _stack([decode(f.result()) for f in fetches])

        fetching: deque[list[Future[Any]]] = deque()
        decoding: deque[Future[_Batch]] = deque()
        ahead = 0  # items submitted for fetching and not yet handed to a decode task
        next_batch = 0
        while True:
            while next_batch < len(batches) and (ahead < window or not fetching):
                fetching.append([fetchers.submit(fetch, item) for item in batches[next_batch]])
                ahead += len(batches[next_batch])
                next_batch += 1
            while fetching and len(decoding) < 2 * decode_workers:
                batch = fetching.popleft()
                ahead -= len(batch)
                decoding.append(decoders.submit(decode_batch, batch))
            if not decoding:
                return
            yield decoding.popleft().result()


def _stack(loaded: list[Loaded]) -> _Batch:
    kept = [x for x in loaded if x.pixels is not None]
    pixels = np.stack([x.pixels for x in kept]) if kept else np.zeros((0, 3, 1, 1), np.float32)  # type: ignore[misc]
    return _Batch(
        [x.image_id for x in kept],
        pixels,
        [x.image_id for x in loaded if x.pixels is None and not x.done],
        sum(x.decode_seconds for x in loaded),
        [x.record for x in kept],
        [x.image_id for x in loaded if x.done],
    )


def embed_pending(
    storage: Storage,
    settings: Settings,
    encoder: ImageEncoder,
    *,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    only: Collection[str] | None = None,
    job: str | None | Mapping[str, str | None] = None,
    tag: str | None = None,
    limit: int | None = None,
) -> EmbedStats:
    """Embed catalogued images that have no embedding for this encoder version yet.

    With ``only`` (an embedding job's own images), what is left to do is read from the images' pending
    markers (:meth:`Catalog.pending`: one request each, which also returns the record), so the job costs
    what its images cost whatever the size of the collection. Without it, every catalogued image is
    compared with every stored embedding (reads every shard: the full check, for a new encoder or a
    repair). Each image is read on one of ``settings.embed_io_workers`` threads (many requests in
    flight) and decoded on one of :func:`decode_workers` threads, ahead of inference
    (:func:`prefetch_batches`). Results are flushed every ``settings.embed_shard_size`` images; once a
    shard is stored, its images' pending markers are dropped.

    Args:
        progress: called with the number of images finished after each batch.
        on_total: called once with the number of pending images.
        only: consider only these image ids; one found embedded already is skipped (``stats.done``), one
            removed since counts as failed.
        job: the embedding job ``only`` was queued in (its markers' folder), or each id's job.
        tag: the id of the job running this (its shards are named for it): images an earlier, killed try
            of it stored are found in its own shards and skipped, though their markers may be left.
        limit: embed at most this many of the pending images (in id order, which for content hashes is
            a fixed random sample); ``stats.pending`` still counts them all.
    """
    stats = EmbedStats()
    leftover: list[str] = []  # stored by an earlier try of ``tag``: only their markers are left to drop
    t_start = time.perf_counter()
    store = EmbeddingStore(storage, encoder.version)
    catalog = Catalog(storage)
    if only is None:
        pending = sorted(set(catalog.ids()) - store.embedded_ids())
    else:
        pending = sorted(set(only))
        if tag:  # a killed try may have stored a shard and died before dropping its images' markers
            before = store.ids_written_by(tag)
            leftover = sorted(before & set(pending))
            stats.done += len(leftover)
            pending = [i for i in pending if i not in before]
    stats.pending = len(pending)
    pending = pending[:limit] if limit is not None else pending
    stats.seconds["list"] = time.perf_counter() - t_start
    if on_total:
        on_total(len(pending))

    def job_of(image_id: str) -> str | None:
        return job.get(image_id) if isinstance(job, Mapping) else job

    def record_of(image_id: str) -> tuple[ImageRecord | None, bool]:
        """The image's record and whether it is still to embed; (None, False) once removed."""
        if only is not None:
            record = catalog.pending(image_id, job_of(image_id))
            if record is not None:
                return record, True
        try:
            record = catalog.get(image_id)
        except NotFound:
            log.warning("image %s was removed while embedding; skipped", image_id)
            return None, False
        if only is None:
            return record, True
        # No marker where this job expected one: queued in another job, or embedded already.
        if record.job != job_of(image_id) and catalog.pending(image_id, record.job) is not None:
            return record, True
        return record, False

    def fetch(image_id: str) -> tuple[str, ImageRecord | None, bytes | ClusterlensError | None]:
        """Two reads, one after the other: the record (for the blob's name), then the bytes (or why not)."""
        record, todo = record_of(image_id)
        if record is None or not todo:
            return image_id, record, None
        try:
            return image_id, record, catalog.image_bytes(record)
        except ClusterlensError as exc:  # its bytes are gone: quarantined below, like bytes that no longer decode
            return image_id, record, exc

    def decode(fetched: tuple[str, ImageRecord | None, bytes | ClusterlensError | None]) -> Loaded:
        image_id, record, data = fetched
        if record is None:
            return Loaded(image_id, None)
        if data is None:
            return Loaded(image_id, None, done=True)
        t0 = time.perf_counter()
        try:
            if isinstance(data, ClusterlensError):
                raise data
            image = decode_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
        except ClusterlensError as exc:
            # Stored bytes that are gone or no longer decode: quarantine with the reason, so the run (and
            # the next one) goes on without them.
            log.warning("cannot embed %s, quarantining it: %s", image_id, exc.message)
            kept = data if isinstance(data, bytes) and data else None
            withdraw(storage, record, code=exc.code, reason=f"at embedding: {exc.message}", data=kept)
            return Loaded(image_id, None, time.perf_counter() - t0)
        pixels = encoder.preprocess([image.rgb])[0]
        return Loaded(image_id, pixels, time.perf_counter() - t0, record)

    buf_ids: list[str] = []
    buf_records: list[ImageRecord | None] = []
    buf_vecs: list[np.ndarray] = []
    buf_logits: list[np.ndarray] = []
    dropping: list[Future[Any]] = []

    writing: deque[Future[None]] = deque()  # shard writes in the background: one writing, one waiting

    def write(ids: list[str], vectors: np.ndarray, logits: np.ndarray, records: list[ImageRecord | None]) -> None:
        t0 = time.perf_counter()
        stats.shards.append(store.write_shard(ids, vectors, logits, records, tag))
        # Stored: these images are no longer pending. Their markers go in one batch request per 256 on
        # Blob Storage; a marker a crash leaves behind is found by the retry in this job's own shards
        # (``tag``), a failed delete costs a re-embedding.
        dropping.append(markers.submit(catalog.embedded_many, [(r.id, r.job) for r in records if r]))
        stats.seconds["write"] += time.perf_counter() - t0

    def flush() -> None:
        """Hand the buffered rows to a background write (the encoder goes on meanwhile)."""
        if not buf_ids:
            return
        while len(writing) >= 2:
            writing.popleft().result()  # a failed write fails the run: its images keep their markers
        vectors, logits = np.concatenate(buf_vecs), np.concatenate(buf_logits)
        writing.append(writers.submit(write, list(buf_ids), vectors, logits, list(buf_records)))
        buf_ids.clear()
        buf_records.clear()
        buf_vecs.clear()
        buf_logits.clear()

    with (
        ThreadPoolExecutor(max_workers=4, thread_name_prefix="marker") as markers,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard") as writers,
    ):
        t_wait = time.perf_counter()
        batches = prefetch_batches(
            pending,
            fetch,
            decode,
            settings.embed_batch_size,
            io_workers=settings.embed_io_workers,
            decode_workers=decode_workers(settings),
        )
        for batch in batches:
            stats.seconds["wait"] += time.perf_counter() - t_wait
            stats.seconds["decode"] += batch.decode_seconds
            stats.failed.extend(batch.failed)
            stats.done += len(batch.done)
            if batch.ids:
                t0 = time.perf_counter()
                out = encoder.encode_array(batch.pixels)
                stats.seconds["infer"] += time.perf_counter() - t0
                buf_ids.extend(batch.ids)
                buf_records.extend(batch.records)
                buf_vecs.append(out.vectors)
                buf_logits.append(out.logits)
                stats.embedded += len(batch.ids)
                if len(buf_ids) >= settings.embed_shard_size:
                    flush()
            if progress:
                progress(len(batch.ids) + len(batch.failed) + len(batch.done))
            t_wait = time.perf_counter()
        flush()
        while writing:
            writing.popleft().result()
        if leftover:
            dropping.append(markers.submit(catalog.embedded_many, [(i, job_of(i)) for i in leftover]))
        for f in dropping:
            if f.exception() is not None:
                log.warning("a pending marker was not dropped (its image will be embedded again): %s", f.exception())
    stats.seconds["total"] = time.perf_counter() - t_start
    stats.seconds = {k: round(v, 3) for k, v in stats.seconds.items()}
    log.info("embedded %d of %d pending images in %.1f s", stats.embedded, stats.pending, stats.seconds["total"])
    return stats
