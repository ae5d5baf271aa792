"""Bounded-memory passes over every stored embedding: what retrain, analysis and head training read.

A whole-collection job reads the shards one at a time (:meth:`job.embeddings.EmbeddingStore.iter_chunks`)
and never holds every embedding. :func:`collect` is the first read: it keeps every row's id, the vectors
of the labelled rows (what a classifier or head is trained on) and of a seeded sample (what a feature
space, k-means or an Isolation Forest is fitted on, and what maps draw). :meth:`Collected.chunks` reads
the same shards again, chunk by chunk, for what every row needs from an already-fitted model
(predictions, cluster assignments, anomaly scores): a small per-row output is all that is kept.

Held at once: one shard's rows, the labelled rows and the sample (``rows_held_max`` reports the peak),
plus every id (as the dedup across shards holds them already). Labels come from the shards' ``label``
column (given at ingest) under the label log's latest entries, so no catalogue record is read, except
one each for rows of shards written before shards carried the catalogue fields (:func:`fill_records`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from job.embeddings import EmbeddingSet, EmbeddingStore, fill_records
from shared.catalog import Catalog

log = logging.getLogger(__name__)

Vectors = Callable[[np.ndarray], np.ndarray]


@dataclass
class Collected:
    """What one read of every shard kept.

    Attributes:
        ids: (n,) every row's image id, in stream order (shard order, each id once).
        labelled: int64 (m,) rows (positions in ``ids``) with a current label, ascending.
        labels: (m,) their current labels.
        from_ingest: bool (m,) whether each was given a label at ingest (the log may have changed it since).
        labelled_vectors: float32 (m, d) their vectors (after ``vectors``, e.g. the head).
        sample: int64 (s,) rows of the seeded sample, ascending (every row when n <= the sample size).
        sample_vectors: float32 (s, d) their vectors.
        shards: the shards read (a later :meth:`chunks` reads the same ones).
        rows_held_max: the most embedding rows held at once so far (a chunk, the labelled rows and the
            sample), the observable that says the pass stays bounded.
    """

    ids: list[str]
    labelled: np.ndarray
    labels: list[str]
    from_ingest: np.ndarray
    labelled_vectors: np.ndarray
    sample: np.ndarray
    sample_vectors: np.ndarray
    shards: list[str]
    rows_held_max: int = 0
    _store: EmbeddingStore | None = field(default=None, repr=False)
    _skip: set[str] = field(default_factory=set, repr=False)
    _catalog: Catalog | None = field(default=None, repr=False)
    _vectors: Vectors | None = field(default=None, repr=False)

    @property
    def held(self) -> int:
        """Embedding rows held between chunks: the labelled rows and the sample."""
        return len(self.labelled) + len(self.sample)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Read the same shards again: (first row, float32 (c, d) vectors) per shard, rows in ``ids`` order.

        Raises:
            RuntimeError: the shards no longer give the rows the first read gave.
        """
        if self._store is None:
            raise RuntimeError("this pass has no store to read again")
        start = 0
        for chunk in self._store.iter_chunks(self.shards, self._skip):
            if chunk.ids != self.ids[start : start + len(chunk.ids)]:
                raise RuntimeError(f"shard {chunk.shards[0]} changed between two reads of the same pass")
            vectors = self._vectors(chunk.vectors) if self._vectors else chunk.vectors
            self.rows_held_max = max(self.rows_held_max, len(chunk.ids) + self.held)
            yield start, vectors
            start += len(chunk.ids)
        if start != len(self.ids):
            raise RuntimeError("the shards gave fewer rows on the second read")


def collect(
    store: EmbeddingStore,
    *,
    skip: set[str] | None = None,
    log_labels: Mapping[str, str] | None = None,
    vectors: Vectors | None = None,
    sample_size: int = 50_000,
    seed: int = 0,
    catalog: Catalog | None = None,
    keep_labelled: bool = True,
) -> Collected:
    """Read every shard once, keeping ids, the labelled rows and a seeded sample.

    A row's current label is its latest label-log entry, else the label it was given at ingest (the
    shard's ``label`` column). The sample keeps the ``sample_size`` rows with the smallest seeded
    random keys (drawn in stream order), so it is the same on every run over the same shards, and
    every row when there are no more than ``sample_size``.

    Args:
        skip: ids to leave out (deleted images).
        log_labels: image id -> its latest label in the label log.
        vectors: applied to each chunk's vectors before anything is kept (e.g. the projection head).
        sample_size: rows in the sample (0: none).
        catalog: completes rows of shards written before they carried labels (one request a row);
            None leaves those rows unlabelled.
        keep_labelled: keep the labelled rows' vectors (else only their rows and labels).
    """
    from_log = log_labels or {}
    shards = store.shards()
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    lab_rows: list[np.ndarray] = []
    lab_names: list[str] = []
    lab_ingest: list[bool] = []
    lab_vecs: list[np.ndarray] = []
    held_lab = 0
    sample = _Sample(sample_size)
    peak = 0
    for chunk in store.iter_chunks(shards, skip):
        chunk = _filled(chunk, catalog)
        x = vectors(chunk.vectors) if vectors else chunk.vectors
        start = len(ids)
        ids.extend(chunk.ids)
        current = [from_log.get(i) or (lab or None) for i, lab in zip(chunk.ids, chunk.labels, strict=True)]
        have = np.flatnonzero([c is not None for c in current])
        if len(have):
            lab_rows.append(start + have)
            lab_names.extend(str(current[r]) for r in have)
            lab_ingest.extend(bool(chunk.labels[r]) for r in have)
            if keep_labelled:
                lab_vecs.append(x[have])
                held_lab += len(have)
        sample.add(start, rng.random(len(x)), x)
        peak = max(peak, len(x) + held_lab + sample.size)
    s_rows, s_vecs = sample.result()
    dim = s_vecs.shape[1]
    collected = Collected(
        ids=ids,
        labelled=np.concatenate(lab_rows) if lab_rows else np.zeros(0, np.int64),
        labels=lab_names,
        from_ingest=np.array(lab_ingest, dtype=bool),
        labelled_vectors=np.concatenate(lab_vecs) if lab_vecs else np.zeros((0, dim), np.float32),
        sample=s_rows,
        sample_vectors=s_vecs,
        shards=shards,
        rows_held_max=peak,
        _store=store,
        _skip=set(skip or ()),
        _catalog=catalog,
        _vectors=vectors,
    )
    log.info(
        "read %d rows from %d shards: %d labelled, %d sampled, at most %d rows held",
        len(ids),
        len(shards),
        len(collected.labelled),
        len(s_rows),
        peak,
    )
    return collected


def _filled(chunk: EmbeddingSet, catalog: Catalog | None) -> EmbeddingSet:
    """The chunk with its legacy rows' labels completed from the catalogue (when one is given)."""
    if catalog is not None and len(chunk.unrecorded) and chunk.unrecorded.any():
        return fill_records(catalog, chunk)
    return chunk


class _Sample:
    """A seeded sample of at most ``size`` rows: the rows with the smallest random keys seen so far.

    Held in one buffer: a row that enters takes the slot of the row with the largest key, so the sample
    never holds more than ``size`` rows (nor copies itself per chunk).
    """

    def __init__(self, size: int):
        self.capacity = size
        self.size = 0
        self.rows = np.zeros(size, np.int64)
        self.keys = np.zeros(size, np.float64)
        self.vectors: np.ndarray | None = None

    def add(self, start: int, keys: np.ndarray, x: np.ndarray) -> None:
        """Offer rows ``start .. start + len(x)`` with their random keys (float (c,)) and vectors (c, d)."""
        if not self.capacity:
            return
        if self.vectors is None:
            self.vectors = np.zeros((self.capacity, x.shape[1]), np.float32)
        free = min(self.capacity - self.size, len(x))
        if free:
            self._put(np.arange(self.size, self.size + free), start, np.arange(free), keys, x)
            self.size += free
        if free == len(x):
            return
        rest = np.arange(free, len(x))
        rest = rest[keys[rest] < self.keys.max()]
        if not len(rest):
            return
        both = np.concatenate([self.keys, keys[rest]])
        kept = np.zeros(len(both), bool)
        kept[np.argpartition(both, self.capacity - 1)[: self.capacity]] = True
        slots = np.flatnonzero(~kept[: self.capacity])
        entering = rest[kept[self.capacity :]]
        self._put(slots, start, entering, keys, x)

    def _put(self, slots: np.ndarray, start: int, new: np.ndarray, keys: np.ndarray, x: np.ndarray) -> None:
        assert self.vectors is not None
        self.rows[slots] = start + new
        self.keys[slots] = keys[new]
        self.vectors[slots] = x[new]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 (s,) sampled rows ascending and float32 (s, d) their vectors."""
        if self.vectors is None:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        order = np.argsort(self.rows[: self.size], kind="stable")
        return self.rows[: self.size][order], self.vectors[: self.size][order]
