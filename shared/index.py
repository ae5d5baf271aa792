"""The cluster-routed index, query side: optional PCA, k-means centroids, per-cluster lists (FAISS IVF).

Vectors are power-normalised (x ** 0.5 by default) and L2-normalised (after PCA too), so inner
product is cosine similarity. A query is
assigned to its ``nprobe`` nearest centroids and compared only with the images in those clusters.

Published layout in the index container::

    index/v000007/index.faiss   IndexPreTransform(PCA, L2norm) + IndexIVFFlat with a direct map, or for
                                IVF-PQ IndexPreTransform(PCA + random rotation, L2norm) + IndexIVFPQFastScan
                                (4-bit codes, L2 on unit vectors)
    index/v000007/ids.npy       image id of each row: uint8 (n, 32), a content hash's bytes (strings
                                ``U64`` only for ids that are not 64-character hex); order.npy: the rows
                                sorted by id (int32), for lookups by id. Both memory-mapped.
    index/v000007/refine.npy    IVF-PQ only: every row's 8-bit re-ranking code (uint8 (n, dim)) and
    index/v000007/refine_codec.npy  its per-dimension range (see shared.refine): held in memory up to
                                ``index_refine_memory_mb``, else read per query (pread) for the shortlist
    index/v000007/raw.npy       with PCA: every row's power- and L2-normalised raw embedding, 8 bits a
    index/v000007/raw_codec.npy dimension (uint8 (n, input_dim)): a query's last ``k * raw_rerank``
                                candidates are re-ranked by raw cosine (see shared.refine)
    index/v000007/clusters.npy  cluster (IVF list) of each row
    index/v000007/labels.npy    label code of each row (-1: none); names in the manifest
    index/v000007/class_top.npy, class_prob.npy   each row's top ImageNet classes and probabilities
    index/v000007/ingested.npy  ingest time of each row (UTC epoch seconds), for filters
    index/v000007/cold_start.npy  rows to label first before any classifier, most typical first
    index/v000007/caption_rows.npy, caption_vectors.npy, captions.npy   rows with a caption, its text
                                embedding (MiniLM, float16) and text, for text search
    index/v000007/class_offsets.npy, class_rows.npy, class_probs.npy, class_mass.npy   the rows of
                                each ImageNet class, most probable first (:mod:`shared.class_lists`):
                                text search reads these instead of scoring every row
    index/v000007/head.onnx, head.json   the projection head, for an index in the head's space
    index/v000007/trained.faiss the same index with empty lists (PCA, centroids, codebook): what adding
                                rows to it needs, read by the job instead of the whole index
    index/v000007/manifest.json what it was built from, parameters, timings
    index/CURRENT.json          {"version": "v000007"}: swapped last, atomically

A version can also be a base plus delta segments: an incremental reindex writes only the new rows
(the same files, holding only them) in its own folder, and its manifest's ``segments`` lists the
folders that make up the version, base first (each with its row count and the label names its
codes refer to). The query side opens each folder and searches their lists side by side with the
same probes (:func:`join_segments`; per-row arrays through :class:`shared.rows.Column`), so opening a
new version reads its delta, never the base again; the job merges small deltas into bigger ones as
they accumulate (:func:`merge_segments`), and a full build (past ``index_retrain_fraction`` of growth)
starts a new base. Earlier versions' folders a kept version refers to are never pruned.

Three kinds, chosen by :func:`plan_index` from the collection size and a memory budget:

- ``flat``: small collections. The same clustered lists, but every list is searched: exact.
- ``ivf_flat``: the default. Full vectors in the lists; a query scans its ``nprobe`` nearest lists.
- ``ivf_pq``: large collections. The lists hold 4-bit product-quantised codes scanned with SIMD
  (FAISS fast-scan: ``dim / 4`` bytes a vector at one sub-quantiser per two dimensions); a query
  scans them for a shortlist of ``k * rerank`` rows, re-ranked with their 8-bit codes.

With many lists (``nlist`` >= 1,024 by default: 1M images have 4,000) the centroids are also linked in
an HNSW graph (FAISS ``IVF4000_HNSW32``): a query finds its nearest lists by walking the graph
(~0.04 ms) instead of comparing itself with every centroid (~0.3 ms at 4,000 x 256), with the same
lists found (measured: the 15 nearest of 4,000 agree in 99.8% of fresh queries at ``COARSE_EF``). A
query that asks for a quarter of the lists or more compares itself with every centroid exactly.

Whatever the kind, an index built with PCA ends with a re-rank in the raw space: the best
``k * raw_rerank`` candidates are scored by raw cosine from 8-bit codes of the raw embeddings, so the
results (and their scores) are those of the raw space, not PCA's (:mod:`shared.refine`).

An index lives in one of two spaces, recorded as ``space`` in its manifest: ``backbone`` (the raw
1280-d embeddings, power-normalised, PCA) or ``head`` (the 64-d output of a trained projection head).
Either way it takes raw backbone embeddings in :meth:`ClusterIndex.search`; an index in the head's
space carries its own copy of the head, so queries always use the head it was built with.

A version folder is never changed after publishing, so readers see the old index or the new one.
Building, tuning and publishing are job-side (:mod:`job.index_build`); this module loads and searches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from shared.class_lists import IMAGENET_CLASSES, LIST_FILES, ClassLists, SegmentLists, TopRows
from shared.errors import BadRequest, NotFound, NotReady
from shared.features import normalize, power_normalize
from shared.filters import SearchFilters
from shared.head import HEAD_FILE, ProjectionHead
from shared.index_files import folder_sizes, version_file
from shared.manifests import HeadManifest, IndexManifest
from shared.refine import CODEC_FILE, CODES_FILE, RAW_CODEC_FILE, RAW_CODES_FILE, RefineCodec, rerank_scores
from shared.rows import Column, FileRows, IdTable, column, compact_ids
from shared.storage import INDEX, Storage
from shared.versions import list_versions as _list_versions
from shared.versions import read_pointer, swap_pointer

log = logging.getLogger(__name__)

COARSE_EF = 32  # HNSW coarse quantiser: candidates kept while walking the graph (at least 2 x nprobe)
CAPTION_FILES = ("caption_rows.npy", "caption_vectors.npy", "captions.npy")
COLD_START_FILE = "cold_start.npy"  # rows offered first to label, the most typical first (may be empty)
FILES = (
    "index.faiss",
    "ids.npy",
    "clusters.npy",
    "labels.npy",
    "class_top.npy",
    "class_prob.npy",
    "ingested.npy",
    "order.npy",
    COLD_START_FILE,
    CODES_FILE,
    CODEC_FILE,
    RAW_CODES_FILE,
    RAW_CODEC_FILE,
    *CAPTION_FILES,
    *LIST_FILES,
)
# absent from older versions (and the re-ranking codes from every kind but ivf_pq)
OPTIONAL_FILES = (
    COLD_START_FILE,
    "class_top.npy",
    "class_prob.npy",
    "ingested.npy",
    "order.npy",
    CODES_FILE,
    CODEC_FILE,
    RAW_CODES_FILE,
    RAW_CODEC_FILE,
    *CAPTION_FILES,
    *LIST_FILES,
)


@dataclass
class Captions:
    """Image captions for text search.

    Attributes:
        rows: int64 (m,) index rows that have a caption, ascending.
        vectors: float16 (m, d) unit text embeddings of the captions.
        text: (m,) the caption strings.
    """

    rows: np.ndarray
    vectors: np.ndarray
    text: np.ndarray

    @classmethod
    def empty(cls, dim: int = 384) -> Captions:
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float16), np.array([], dtype="U1"))


@dataclass
class SearchHits:
    """Results for a batch of queries.

    Attributes:
        scores: float32 (nq, k) cosine similarity, best first.
        rows: int64 (nq, k) index rows (-1 where fewer than k were found).
        probe: int64 (nq, nprobe) clusters searched, nearest centroid first.
        probe_scores: float32 (nq, nprobe) query-to-centroid similarity.
    """

    scores: np.ndarray
    rows: np.ndarray
    probe: np.ndarray
    probe_scores: np.ndarray


@dataclass(frozen=True)
class Selection:
    """The rows a search may return: ``rows`` (int64, global row numbers), or every row but them (``negate``)."""

    negate: bool
    rows: np.ndarray


class ClusterIndex:
    """A built index with its row metadata: built by :func:`job.index_build.build_index`, loaded by
    :func:`load_version`, searched here."""

    def __init__(
        self,
        index: Any,
        ids: np.ndarray | IdTable,
        clusters: Any,
        labels: Any,
        manifest: IndexManifest,
        class_top: np.ndarray | None = None,
        class_prob: np.ndarray | None = None,
        head: ProjectionHead | None = None,
        captions: Captions | None = None,
        ingested: np.ndarray | None = None,
        vectors: Any = None,
        order: np.ndarray | None = None,
        codec: RefineCodec | None = None,
        raw: Any = None,
        raw_codec: RefineCodec | None = None,
    ):
        self.index = index
        # IVF-PQ: every row's 8-bit re-ranking code (uint8 (n, dim): an array, Column or FileRows) and
        # their codec; None for other kinds (see shared.refine)
        self.vectors = vectors
        self.codec = codec
        self.rerank = manifest.rerank if vectors is not None else 0
        # with PCA: every row's raw embedding as 8-bit codes (uint8 (n, input_dim)) and their codec; the
        # last k * raw_rerank candidates are re-ranked by raw cosine (see shared.refine)
        self.raw = raw if raw_codec is not None else None
        self.raw_codec = raw_codec
        self.raw_rerank = manifest.raw_rerank if self.raw is not None else 0
        self.head = head
        self.ingested = ingested
        self.hidden = np.zeros(0, np.int64)  # rows of deleted images, left out until the next build
        # rows to offer first for labelling before any classifier: the most typical image of each of as
        # many clusters of a sample, most typical first (job.index_build.cold_start_rows); empty: none
        self.cold_start = np.zeros(0, np.int64)
        # later rows of an id stored twice (an image embedded twice across delta segments), always hidden
        self.duplicates = np.zeros(0, np.int64)
        self.trained: bytes | None = None  # job side: the index before any row was added (trained.faiss)
        self.mapped: Path | None = None  # the file the FAISS lists are memory-mapped from, if they are
        # files of a version written already (a streamed build's ids and re-ranking codes), by name
        self.files: dict[str, Path] = {}
        self.captions = captions or Captions.empty()
        self._caption_of = {int(r): str(t) for r, t in zip(self.captions.rows, self.captions.text, strict=True)}
        # Stored as float16; widened once here rather than on every text query.
        self.caption_vectors = self.captions.vectors.astype(np.float32)
        self.ivf = faiss.extract_index_ivf(index)
        # the coarse quantiser: an HNSW graph over the centroids (many lists), else the centroids alone;
        # either way ``coarse_flat`` compares a query with every centroid (see :meth:`coarse`)
        quantizer: Any = faiss.downcast_index(self.ivf.quantizer)
        self.coarse_graph: Any = quantizer if isinstance(quantizer, faiss.IndexHNSW) else None
        self.coarse_flat: Any = quantizer.storage if self.coarse_graph is not None else self.ivf.quantizer
        self._coarse_params: dict[int, Any] = {}
        self._scan_params: dict[int, Any] = {}
        # The lists of each segment (the base's first), searched side by side with the same probes:
        # (IVF index, first row). One segment unless loaded from a version with deltas.
        self.segments: list[tuple[Any, int]] = [(self.ivf, 0)]
        self.owners: list[Any] = []  # the FAISS objects that own the segments' lists (freed with them)
        self.segment_files: list[Path | None] = []  # each segment's memory-mapped FAISS file, if mapped
        # fast-scan PQ lists rank by L2 on unit vectors (FAISS's 4-bit inner-product scan loses
        # recall); their distances are turned into cosine similarity: 1 - d / 2
        self.l2 = self.ivf.metric_type == faiss.METRIC_L2
        self.ids = ids if isinstance(ids, IdTable) else IdTable([(compact_ids(ids), order)])
        self.clusters = clusters
        n = len(self.ids)
        self.class_top = class_top if class_top is not None else np.zeros((n, 0), np.int16)
        self.class_prob = class_prob if class_prob is not None else np.zeros((n, 0), np.float32)
        self.manifest = manifest
        self.label_names: list[str] = list(manifest.label_names)
        # As built, never changed; the search service lays the label log over them as a small sorted
        # (rows, codes) pair (see overlay_labels), and the classifier's predictions beside them.
        self.built_labels = labels
        self.built_label_names = list(self.label_names)
        self._overlay: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int32))
        self._labelled_cache: tuple[Any, ...] = ()  # (overlay, rows, codes) computed from that overlay
        self._column_cache: tuple[Any, ...] = ()  # (overlay, labels column)
        self._built_labelled: np.ndarray | None = None  # rows labelled as built, found on first use
        # text search's per-class lists (shared.class_lists): loaded with the version, else built on first use
        self.class_lists: TopRows | None = None
        self._prediction_lists: tuple[Any, ...] = ()
        self.predicted = np.full(n, -1, np.int32)  # code into predicted_names, -1: no prediction
        self.predicted_prob = np.zeros(n, np.float32)
        self.predicted_names: list[str] = []

    # -- building -----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Rows in every segment."""
        return sum(int(ivf.ntotal) for ivf, _ in self.segments)

    @property
    def nprobe(self) -> int:
        return int(self.ivf.nprobe)

    def rows_of(self, image_ids: list[str]) -> np.ndarray:
        """int64 (m,) rows of ids, -1 for ids not indexed."""
        return self.ids.rows_of(image_ids)

    def overlay_labels(self, current: dict[str, str], extra_names: list[str] | None = None) -> None:
        """Take each image's current label (image id -> label) over the labels it was built with.

        ``extra_names`` (the label set's classes) join the label names even while no image has them.
        The built codes are left as they are: the overlay is a sorted (rows, codes) pair of the rows
        in ``current``, applied where labels are read (:meth:`label_of`, :meth:`labelled`,
        :attr:`labels`), so a new label costs O(labelled), not O(n). The pair is swapped in whole,
        so a query running meanwhile sees the old labels or the new (the names only ever grow).
        """
        names = list(self.built_label_names)
        known = set(names)
        names += sorted({lab for lab in [*current.values(), *(extra_names or [])] if lab not in known})
        code = {name: i for i, name in enumerate(names)}
        ids = list(current)
        rows = self.rows_of(ids)
        found = rows >= 0
        codes = np.array([code[current[i]] for i, f in zip(ids, found, strict=True) if f], np.int32)
        rows = rows[found]
        order = np.argsort(rows, kind="stable")
        self.label_names = names
        self._overlay = (rows[order].astype(np.int64), codes[order])

    def label_codes(self, rows: np.ndarray) -> np.ndarray:
        """int32 (m,) the label code of each of ``rows`` now (-1: none)."""
        rows = np.asarray(rows, np.int64)
        over_rows, over_codes = self._overlay
        codes = np.asarray(self.built_labels[rows], np.int32)
        if len(over_rows) and len(rows):
            pos = np.minimum(np.searchsorted(over_rows, rows), len(over_rows) - 1)
            hit = over_rows[pos] == rows
            codes = np.where(hit, over_codes[pos], codes).astype(np.int32)
        return codes

    def labelled(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows that have a label now (int64, ascending) and their codes (int32).

        The rows labelled as built are found once per index (O(n) on first use); after that this
        costs O(labelled) once per change of the overlay.
        """
        overlay = self._overlay
        cached = self._labelled_cache
        if cached and cached[0] is overlay:
            return cached[1], cached[2]
        if self._built_labelled is None:
            self._built_labelled = np.flatnonzero(np.asarray(self.built_labels) >= 0).astype(np.int64)
        over_rows, over_codes = overlay
        built = self._built_labelled
        if len(over_rows):
            pos = np.minimum(np.searchsorted(over_rows, built), len(over_rows) - 1)
            built = built[over_rows[pos] != built]
        rows = np.concatenate([built, over_rows])
        codes = np.concatenate([np.asarray(self.built_labels[built], np.int32), over_codes])
        order = np.argsort(rows, kind="stable")
        rows, codes = rows[order], codes[order]
        self._labelled_cache = (overlay, rows, codes)
        return rows, codes

    @property
    def labels(self) -> np.ndarray:
        """int32 (n,) every row's label code now (-1: none): the whole column, O(n) once per change of
        the overlay; the query path reads :meth:`label_codes` and :meth:`labelled` instead."""
        overlay = self._overlay
        cached = self._column_cache
        if cached and cached[0] is overlay:
            return cached[1]
        rows, codes = overlay
        if not len(rows):
            return self.built_labels
        column = np.array(self.built_labels, dtype=np.int32, copy=True)
        column[rows] = codes
        self._column_cache = (overlay, column)
        return column

    def text_lists(self) -> TopRows:
        """The per-class lists text search reads: the version's own, or built here (and kept) when it
        has none (a version published before them, or an index built in this process)."""
        lists = self.class_lists
        if lists is None:
            log.info("index %s has no class lists: building them in memory", self.manifest.version)
            lists = ClassLists.build(self.class_top, self.class_prob, IMAGENET_CLASSES)
            self.class_lists = lists
        return lists

    def prediction_lists(self) -> ClassLists:
        """The classifier's predictions as lists (one per predicted class, most probable first), built
        on first use after :meth:`set_predictions`."""
        predicted, prob = self.predicted, self.predicted_prob
        cached = self._prediction_lists
        if cached and cached[0] is predicted:
            return cached[1]
        has = predicted >= 0
        lists = ClassLists.build(
            np.where(has, predicted, 0)[:, None],
            np.where(has, prob, 0.0).astype(np.float32)[:, None],
            max(len(self.predicted_names), 1),
        )
        self._prediction_lists = (predicted, lists)
        return lists

    def set_predictions(self, names: list[str], codes: np.ndarray, probs: np.ndarray) -> None:
        """The classifier's prediction per row: ``codes`` int (n,) into ``names`` (-1: none), ``probs`` (n,)."""
        if len(codes) != self.count or len(probs) != self.count:
            raise ValueError(f"need {self.count} predictions, got {len(codes)}")
        self.predicted_names = list(names)
        self.predicted = np.asarray(codes, np.int32)
        self.predicted_prob = np.asarray(probs, np.float32)

    def prediction_of(self, row: int) -> dict[str, Any] | None:
        code = int(self.predicted[row])
        if code < 0:
            return None
        return {"label": self.predicted_names[code], "prob": round(float(self.predicted_prob[row]), 4)}

    def row_of(self, image_id: str) -> int | None:
        """Row of an image id, or None if it is not indexed."""
        return self.ids.row_of(image_id)

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, filters: SearchFilters | None = None
    ) -> SearchHits:
        """Search raw embeddings.

        Args:
            queries: float32 (nq, input_dim).
            k: results per query.
            nprobe: clusters to search (default: the index's).
            filters: conditions every result must meet (see :meth:`select`).

        Raises:
            BadRequest: for a filter this index cannot meet (unknown label, cluster out of range).
        """
        xt, raw = self.prepare(queries)
        return self.search_transformed(xt, k, nprobe, filters, raw=raw)

    def transform(self, queries: np.ndarray) -> np.ndarray:
        """Raw embeddings (nq, input_dim) into the index's space (nq, dim): head or power
        normalisation, then PCA and L2 norm, exactly as the indexed vectors were.

        Raises:
            ValueError: for a wrong shape.
        """
        return self.prepare(queries)[0]

    def prepare(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw embeddings (nq, input_dim) as a search takes them: in the index's space (as :meth:`transform`),
        and, for an index with raw codes, power- and L2-normalised in the raw space (else None).

        Raises:
            ValueError: for a wrong shape.
        """
        if queries.ndim != 2 or queries.shape[1] != self.manifest.input_dim:
            raise ValueError(f"queries must be (nq, {self.manifest.input_dim}), got {queries.shape}")
        if self.head is not None:
            xq = self.head.apply(queries).embedding
        else:
            xq = power_normalize(queries, self.manifest.power)
        return pretransform(self.index, xq), (xq if self.raw is not None else None)

    def search_row(
        self, row: int, k: int, nprobe: int | None = None, filters: SearchFilters | None = None
    ) -> SearchHits:
        """Search with an indexed image's own stored vector (and its raw one, for an index with raw codes)."""
        raw = None
        if self.raw is not None and self.raw_codec is not None:
            raw = normalize(self.raw_codec.decode(np.asarray(self.raw[np.array([int(row)])])))
        return self.search_transformed(self.vector_of(row)[None, :], k, nprobe, filters, raw=raw)

    def vector_of(self, row: int) -> np.ndarray:
        """float32 (dim,) an indexed row's vector in the index's space (IVF-PQ: decoded from its 8-bit
        re-ranking code)."""
        if self.vectors is not None and self.codec is not None:
            return self.codec.decode(np.asarray(self.vectors[np.array([int(row)])]))[0]
        ivf, start = self.segment_of(int(row))
        return np.asarray(ivf.reconstruct(int(row) - start), dtype=np.float32)

    def all_vectors(self) -> np.ndarray:
        """float32 (n, dim) every indexed vector in the index's space, row order (IVF-PQ: decoded)."""
        if self.vectors is not None and self.codec is not None:
            return self.codec.decode(np.asarray(self.vectors))
        return np.concatenate(
            [np.asarray(ivf.reconstruct_n(0, int(ivf.ntotal)), dtype=np.float32) for ivf, _ in self.segments]
        )

    def lists_copy(self) -> Any:
        """A new FAISS index, in memory, holding every segment's rows in one set of lists (job side: what
        rows are added to). A published (memory-mapped) file is never written into."""

        def whole(index: Any, mapped: Path | None) -> Any:
            if mapped is not None:
                return faiss.read_index(str(mapped))
            return faiss.deserialize_index(faiss.serialize_index(index))  # clone_index lacks L2norm

        files = self.segment_files or [self.mapped]
        first = whole(self.index, files[0])
        ivf = faiss.extract_index_ivf(first)
        fast_scan = isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)
        for (seg, start), path in zip(self.segments[1:], files[1:], strict=True):
            if fast_scan:  # FAISS cannot merge fast-scan lists: add the rows again from their codes
                assert self.codec is not None and self.vectors is not None
                rows = np.arange(start, start + int(seg.ntotal))
                ivf.add(self.codec.decode(np.asarray(self.vectors[rows])))
                continue
            owner = whole(seg, path)  # owns the lists extracted below: kept referenced while they are merged
            other = faiss.extract_index_ivf(owner)
            if ivf.direct_map.type != faiss.DirectMap.NoMap:  # type: ignore[attr-defined]
                ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # type: ignore[attr-defined]
            if other.direct_map.type != faiss.DirectMap.NoMap:  # type: ignore[attr-defined]
                other.set_direct_map_type(faiss.DirectMap.NoMap)  # type: ignore[attr-defined]
            ivf.merge_from(other, int(ivf.ntotal))
        first.ntotal = ivf.ntotal
        return first

    def segment_of(self, row: int) -> tuple[Any, int]:
        """(IVF index, first row) of the segment holding ``row``."""
        for ivf, start in reversed(self.segments):
            if row >= start:
                return ivf, start
        raise IndexError(row)

    def select(self, filters: SearchFilters | None) -> np.ndarray | None:
        """Rows meeting ``filters`` (int64, ascending), or None when there is nothing to filter.

        Raises:
            BadRequest: unknown label, cluster out of range, or a time filter on an index without times.
        """
        if filters is None or filters.is_empty():
            return None
        mask = np.ones(self.count, dtype=bool)
        if filters.label is not None:
            if filters.label not in self.label_names:
                known = ", ".join(self.label_names[:20]) or "none"
                raise BadRequest(f"unknown label {filters.label!r} (labels: {known})", code="unknown_label")
            rows, codes = self.labelled()
            wanted = np.zeros(len(mask), dtype=bool)
            wanted[rows[codes == self.label_names.index(filters.label)]] = True
            mask &= wanted
        if filters.labelled is not None:
            has = np.zeros(len(mask), dtype=bool)
            has[self.labelled()[0]] = True
            mask &= has == filters.labelled
        if filters.predicted is not None:
            if filters.predicted not in self.predicted_names:
                known = ", ".join(self.predicted_names[:20]) or "none: no classifier has been trained yet"
                raise BadRequest(
                    f"unknown predicted class {filters.predicted!r} (classes: {known})", code="unknown_label"
                )
            mask &= self.predicted == self.predicted_names.index(filters.predicted)
        if filters.cluster is not None:
            if filters.cluster >= self.ivf.nlist:
                raise BadRequest(f"cluster must be below {self.ivf.nlist} for this index", code="invalid_filter")
            mask &= self.clusters == filters.cluster
        if filters.imagenet_class is not None:
            if self.class_top.shape[1] == 0:
                raise BadRequest("this index has no class predictions: reindex first", code="invalid_filter")
            mask &= self.class_top[:, 0] == filters.imagenet_class
        if filters.ingested_after is not None or filters.ingested_before is not None:
            if self.ingested is None:
                raise BadRequest("this index has no ingest times: reindex first", code="invalid_filter")
            if filters.ingested_after is not None:
                mask &= self.ingested >= filters.ingested_after
            if filters.ingested_before is not None:
                mask &= self.ingested < filters.ingested_before
        mask[self.hidden] = False
        return np.flatnonzero(mask).astype(np.int64)

    def search_transformed(
        self,
        xt: np.ndarray,
        k: int,
        nprobe: int | None = None,
        filters: SearchFilters | None = None,
        *,
        raw: np.ndarray | None = None,
    ) -> SearchHits:
        """Assign to the nearest centroids, then search inside those clusters only.

        With filters, only the selected rows are candidates: a cluster filter searches exactly that
        cluster; other filters widen nprobe by the inverse of their selectivity (so as many
        candidates are expected as without a filter) and fall back to every cluster when a query
        still finds fewer than ``k`` of the selected rows.

        ``raw``: the queries in the raw space (:meth:`prepare`); given to an index with raw codes, the
        candidates are re-ranked there (without it, results rank in the index's space).
        """
        nlist = int(self.ivf.nlist)
        nprobe = max(1, min(nprobe or self.nprobe, nlist))
        xt = np.ascontiguousarray(xt, dtype=np.float32)
        n = len(xt)
        allowed = self.select(filters)
        hidden_rows = self.hidden  # read once: a delete may swap it meanwhile
        selection: Selection | None = None
        if allowed is None and len(hidden_rows):
            selection = Selection(True, hidden_rows)
        if allowed is not None:
            selection = Selection(False, allowed)
            if len(allowed) == 0:
                empty = np.full((n, k), -1, dtype=np.int64)
                return SearchHits(
                    np.full((n, k), -np.inf, np.float32), empty, empty[:, :0], np.zeros((n, 0), np.float32)
                )
        if filters is not None and filters.cluster is not None:
            centroid = self.coarse_flat.reconstruct(int(filters.cluster))
            probe = np.full((n, 1), filters.cluster, dtype=np.int64)
            if self.l2:  # what the quantiser would give: a squared distance
                probe_scores = np.asarray(((xt - centroid) ** 2).sum(1)[:, None], dtype=np.float32)
            else:
                probe_scores = (xt @ centroid)[:, None].astype(np.float32)
            return self.search_probed(xt, k, probe, probe_scores, selection, raw)
        if allowed is not None:
            nprobe = min(nlist, int(np.ceil(nprobe * self.count / len(allowed))))
        probe_scores, probe = self.coarse(xt, nprobe)
        hits = self.search_probed(xt, k, probe, probe_scores, selection, raw)
        if allowed is not None and nprobe < nlist and ((hits.rows >= 0).sum(1) < min(k, len(allowed))).any():
            probe_scores, probe = self.coarse(xt, nlist)
            hits = self.search_probed(xt, k, probe, probe_scores, selection, raw)
        return hits

    def search_probed(
        self,
        xt: np.ndarray,
        k: int,
        probe: np.ndarray,
        probe_scores: np.ndarray,
        selection: Selection | None = None,
        raw: np.ndarray | None = None,
    ) -> SearchHits:
        """The best ``k`` in the ``probe`` lists: a scan for as many candidates as the re-ranking stages
        take, then :meth:`finish`."""
        width = self.raw_width(k, raw)
        if self.vectors is not None and self.rerank:
            width = max(width, k * self.rerank)
        shortlist = self.scan(xt, min(width, self.count), probe, probe_scores, selection)
        return self.finish(xt, shortlist, k, raw)

    def coarse(self, xt: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's ``nprobe`` nearest lists, nearest first, with the quantiser's scores (squared L2 for
        fast-scan lists, else inner product): through the centroids' HNSW graph when there is one and
        fewer than a quarter of the lists are wanted, else exactly."""
        nprobe = min(int(nprobe), int(self.ivf.nlist))
        if self.coarse_graph is None or 4 * nprobe >= int(self.ivf.nlist):
            return self.coarse_flat.search(xt, nprobe)
        ef = max(COARSE_EF, 2 * nprobe)
        params = self._coarse_params.get(ef)
        if params is None:  # read-only during a search: shared by concurrent queries
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = ef
            self._coarse_params[ef] = params
        xt = np.ascontiguousarray(xt, dtype=np.float32)
        scores, lists = np.empty((len(xt), nprobe), np.float32), np.empty((len(xt), nprobe), np.int64)
        # the C call itself: the Python wrapper's checks cost as much as the walk at one query
        self.coarse_graph.search_c(
            len(xt), faiss.swig_ptr(xt), nprobe, faiss.swig_ptr(scores), faiss.swig_ptr(lists), params
        )
        return scores, lists

    def raw_width(self, k: int, raw: np.ndarray | None) -> int:
        """Candidates the raw-space re-rank takes for ``k`` results (``k`` when there is none)."""
        return k * self.raw_rerank if raw is not None and self.raw_rerank else k

    def finish(
        self,
        xt: np.ndarray,
        shortlist: SearchHits,
        k: int,
        raw: np.ndarray | None = None,
        raw_rerank: int | None = None,
    ) -> SearchHits:
        """A scan's shortlist (best first) down to the best ``k``: IVF-PQ re-ranks it with its index-space
        codes, then an index with raw codes re-ranks the best ``k * raw_rerank`` (the index's, unless given)
        by raw cosine."""
        keep = (
            self.raw_width(k, raw) if raw_rerank is None else (k * raw_rerank if raw is not None and raw_rerank else k)
        )
        if len(xt) == 1:  # one query (the serving path): the same steps on its valid rows, no batch bookkeeping
            valid = shortlist.rows[0] >= 0
            rows, scores = shortlist.rows[0][valid], shortlist.scores[0][valid]
            if self.vectors is not None and self.rerank and len(rows):
                assert self.codec is not None
                rows, scores = best_of(self.codec, self.vectors, rows, xt[0], min(keep, len(rows)))
            if keep > k and len(rows):
                assert self.raw_codec is not None and raw is not None
                rows, scores = best_of(self.raw_codec, self.raw, rows, raw[0], k, unit=True)
            one = SearchHits(scores[None, :k], rows[None, :k], shortlist.probe, shortlist.probe_scores)
            return top_k(one, k)  # padded when there are fewer than k
        hits = shortlist
        if self.vectors is not None and self.rerank:
            assert self.codec is not None  # an index with re-ranking codes has their codec
            hits = rerank_hits(self.codec, self.vectors, xt, hits, min(keep, hits.rows.shape[1]))
        if keep > k:
            assert self.raw_codec is not None and raw is not None
            return rerank_hits(self.raw_codec, self.raw, raw, hits, k, unit=True)
        return top_k(hits, k)

    def scan(
        self,
        xt: np.ndarray,
        k: int,
        probe: np.ndarray,
        probe_scores: np.ndarray,
        selection: Selection | None = None,
    ) -> SearchHits:
        """The best ``k`` rows in the ``probe`` lists of every segment (scores: cosine similarity)."""
        n = len(xt)
        xt = np.ascontiguousarray(xt, dtype=np.float32)
        probe = np.ascontiguousarray(probe, dtype=np.int64)
        probe_scores = np.ascontiguousarray(probe_scores, dtype=np.float32)
        # The Python wrapper of search_preassigned insists on the index's own nprobe; the C++ call
        # takes it per query through SearchParametersIVF (one per nprobe, cached: never changed once
        # made), so concurrent queries never share mutable state.
        nprobe = probe.shape[1]
        params = self._scan_params.get(nprobe)
        if params is None:
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            self._scan_params[nprobe] = params
        found_scores, found_rows = [], []
        for ivf, start in self.segments:
            seg_params, keep_alive = self._segment_params(params, selection, start, int(ivf.ntotal))
            scores = np.empty((n, k), dtype=np.float32)
            rows = np.empty((n, k), dtype=np.int64)
            ivf.search_preassigned_c(
                n,
                faiss.swig_ptr(xt),
                k,
                faiss.swig_ptr(probe),
                faiss.swig_ptr(probe_scores),
                faiss.swig_ptr(scores),
                faiss.swig_ptr(rows),
                False,
                seg_params,
            )
            del keep_alive
            if self.l2:
                scores = np.asarray(1 - scores / 2, dtype=np.float32)
            scores[rows < 0] = -np.inf
            found_scores.append(scores)
            found_rows.append(np.where(rows >= 0, rows + start, -1) if start else rows)
        if len(found_scores) == 1:
            scores, rows = found_scores[0], found_rows[0]
        else:
            all_scores, all_rows = np.concatenate(found_scores, 1), np.concatenate(found_rows, 1)
            top = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
            scores, rows = np.take_along_axis(all_scores, top, 1), np.take_along_axis(all_rows, top, 1)
        if self.l2:  # report centroid similarity, not distance
            probe_scores = (1 - probe_scores / 2).astype(np.float32)
        return SearchHits(scores=scores, rows=rows, probe=probe, probe_scores=probe_scores)

    @staticmethod
    def _segment_params(params: Any, selection: Selection | None, start: int, count: int) -> tuple[Any, list[Any]]:
        """``params`` for one segment, with ``selection`` as a selector in the segment's own row numbers.
        SWIG selectors hold raw pointers: what is returned beside them keeps their arrays alive."""
        if selection is None:
            return params, []
        out = faiss.SearchParametersIVF()
        out.nprobe = params.nprobe
        rows = selection.rows
        local = rows[(rows >= start) & (rows < start + count)] - start
        local = np.ascontiguousarray(local, dtype=np.int64)
        batch = faiss.IDSelectorBatch(len(local), faiss.swig_ptr(local))
        keep_alive: list[Any] = [local, batch]
        if selection.negate:
            keep_alive.append(faiss.IDSelectorNot(batch))
        out.sel = keep_alive[-1]
        return out, keep_alive

    def caption_of(self, row: int) -> str | None:
        return self._caption_of.get(row)

    def label_of(self, row: int) -> str | None:
        code = int(self.label_codes(np.array([row]))[0])
        return self.label_names[code] if code >= 0 else None


def pretransform(index: Any, x: np.ndarray) -> np.ndarray:
    """Apply an IndexPreTransform's chain (PCA, L2norm) to vectors; identity for a bare IVF."""
    if not isinstance(index, faiss.IndexPreTransform):
        return x
    chain: Any = index.chain  # a SWIG vector, typed as a list in faiss's stubs
    for i in range(chain.size()):
        x = chain.at(i).apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)


# -- loading -------------------------------------------------------------------------------------


def current_version(storage: Storage) -> str | None:
    """The published version name, or None before the first publish."""
    return read_pointer(storage, INDEX)


def list_versions(storage: Storage) -> list[str]:
    """Complete (manifest written) versions, oldest first."""
    return _list_versions(storage, INDEX)


def index_versions(storage: Storage) -> dict[str, Any]:
    """The published versions, oldest first, each with its headline parameters, and the current one."""
    versions = [{"version": v, **read_manifest(storage, v).summary()} for v in list_versions(storage)]
    return {"current": current_version(storage), "versions": versions}


def rollback(storage: Storage, to: str | None = None) -> tuple[str, str]:
    """Point readers back at an earlier published version (the one before the current by default).

    Returns:
        (previous current version, new current version).

    Raises:
        NotReady: if nothing is published or there is no earlier version.
        NotFound: if ``to`` is not a complete published version.
    """
    current = current_version(storage)
    versions = list_versions(storage)
    if current is None or not versions:
        raise NotReady("no index has been published yet", code="index_missing")
    if to is None:
        earlier = [v for v in versions if v < current]
        if not earlier:
            raise NotReady(f"{current} is the oldest version kept: nothing to roll back to", code="no_earlier_version")
        to = earlier[-1]
    elif to not in versions:
        raise NotFound(f"index version {to} is not available (kept: {', '.join(versions)})", code="version_not_found")
    swap_pointer(storage, INDEX, to)
    log.info("index rolled back from %s to %s", current, to)
    return current, to


def read_manifest(storage: Storage, version: str) -> IndexManifest:
    """A published version's manifest.

    Raises:
        NotReady: the version is incomplete or missing, or its manifest is not valid.
    """
    if not storage.exists(INDEX, f"{version}/manifest.json"):
        raise NotReady(f"index version {version} is incomplete", code="index_missing")
    return IndexManifest.parse(storage.get_json(INDEX, f"{version}/manifest.json"), f"index {version}")


def load_version(
    storage: Storage,
    version: str,
    cache_dir: Path,
    *,
    providers: list[str] | None = None,
    refine_memory_mb: float = 1024,
    mount: Path | None = None,  # the index share's mount (shared/index_files.py)
) -> ClusterIndex:
    """Open a published version, reading files in place when storage is local.

    A version made of segments (see the module docstring) opens each segment's folder and searches
    their lists side by side: nothing of the base is read again, so a new version costs its delta.

    Args:
        refine_memory_mb: IVF-PQ re-ranking codes up to this size are held in memory; larger ones
            are read per query from their file (see :mod:`shared.refine`).

    Raises:
        NotReady: if the version is incomplete or missing.
    """
    manifest = read_manifest(storage, version)
    head = None
    if manifest.space == "head":
        blob = f"{version}/{HEAD_FILE}"
        path = storage.local_path(INDEX, blob) or storage.download_file(INDEX, blob, Path(cache_dir) / blob)
        head_manifest = HeadManifest.parse(storage.get_json(INDEX, f"{version}/head.json"), f"index {version} head")
        head = ProjectionHead(path, head_manifest, providers=providers)
    segments = manifest.segments or [{"version": version, "label_names": manifest.label_names}]
    parts = [
        load_folder(
            storage,
            seg["version"],
            cache_dir,
            manifest.model_copy(update={"label_names": seg["label_names"]}),
            head=head,
            refine_memory_mb=refine_memory_mb / len(segments),
            mount=mount,
        )
        for seg in segments
    ]
    if len(parts) > 1:
        return join_segments(parts, manifest)
    loaded = parts[0]
    if loaded.class_top.shape[1]:
        loaded.text_lists()  # a version from before the lists: built now, not on the first text query
    return loaded


def load_segments(
    storage: Storage,
    segments: list[dict[str, Any]],
    cache_dir: Path,
    manifest: IndexManifest,
    *,
    head: ProjectionHead | None = None,
    mount: Path | None = None,
) -> list[ClusterIndex]:
    """The rows of each of ``segments`` (entries of a manifest's ``segments``), each read whole, not mapped:
    what :func:`merge_segments` merges (the job side)."""
    return [
        load_folder(
            storage,
            seg["version"],
            cache_dir,
            manifest.model_copy(update={"label_names": seg["label_names"]}),
            head=head,
            mapped=False,
            mount=mount,
        )
        for seg in segments
    ]


def load_folder(
    storage: Storage,
    folder: str,
    cache_dir: Path,
    manifest: IndexManifest,
    *,
    head: ProjectionHead | None = None,
    mapped: bool = True,
    refine_memory_mb: float = float("inf"),
    mount: Path | None = None,
) -> ClusterIndex:
    """The rows stored in one version folder, described by ``manifest`` (for a segment, its label names);
    each file read in place (local storage, the index share at ``mount``) or downloaded once to ``cache_dir``."""
    paths = {}
    sizes = folder_sizes(storage, folder)  # one listing gives every file's size and existence
    for name in FILES:
        path = version_file(storage, folder, name, mount=mount, cache_dir=cache_dir, sizes=sizes)
        if path is not None:
            paths[name] = path
        elif name not in OPTIONAL_FILES:  # (an optional one missing: an older version; text search asks to reindex)
            raise NotReady(f"index version {folder} has no {name}", code="index_missing")
    if mapped:
        index, is_mapped = _read_faiss(paths["index.faiss"])
    else:
        index, is_mapped = faiss.read_index(str(paths["index.faiss"])), False

    ivf = faiss.extract_index_ivf(index)
    if manifest.kind != "ivf_pq" and ivf.direct_map.type == faiss.DirectMap.NoMap:  # type: ignore[attr-defined]
        ivf.make_direct_map()  # a delta written without one: rows are reconstructed from the lists

    def load(name: str) -> np.ndarray | None:
        # Memory-mapped like the lists: a cold worker reads only the pages a query touches.
        return np.load(paths[name], mmap_mode="r", allow_pickle=False) if name in paths else None

    keys, clusters, labels = load("ids.npy"), load("clusters.npy"), load("labels.npy")
    assert keys is not None and clusters is not None and labels is not None  # required files
    class_top, class_prob, ingested = load("class_top.npy"), load("class_prob.npy"), load("ingested.npy")
    if ingested is not None and len(ingested) != len(keys):
        ingested = None  # written empty by a build that had no times
    vectors: Any = None
    codec = None
    if manifest.kind == "ivf_pq":
        if CODES_FILE not in paths or CODEC_FILE not in paths:
            raise NotReady(
                f"index version {folder} has no re-ranking codes (an older format): reindex", code="index_outdated"
            )
        codec = RefineCodec.from_array(np.load(paths[CODEC_FILE], allow_pickle=False))
        vectors, refine_memory_mb = _codes(Path(paths[CODES_FILE]), mapped, refine_memory_mb)
    raw: Any = None
    raw_codec = None
    if RAW_CODES_FILE in paths and RAW_CODEC_FILE in paths and manifest.raw_rerank:
        raw_codec = RefineCodec.from_array(np.load(paths[RAW_CODEC_FILE], allow_pickle=False))
        raw, _ = _codes(Path(paths[RAW_CODES_FILE]), mapped, refine_memory_mb)  # within what the refine codes left
    captions = None
    if all(name in paths for name in CAPTION_FILES):
        captions = Captions(
            np.load(paths["caption_rows.npy"], allow_pickle=False),
            np.load(paths["caption_vectors.npy"], allow_pickle=False),
            np.load(paths["captions.npy"], allow_pickle=False),
        )
    order = load("order.npy")
    loaded = ClusterIndex(
        index,
        IdTable([(keys, order)]),
        clusters,
        labels,
        manifest,
        class_top,
        class_prob,
        head,
        captions,
        ingested,
        vectors,
        codec=codec,
        raw=raw,
        raw_codec=raw_codec,
    )
    loaded.mapped = Path(paths["index.faiss"]) if is_mapped else None
    cold = load(COLD_START_FILE)
    if cold is not None and len(cold) and int(cold.max()) < len(keys):
        loaded.cold_start = np.asarray(cold, np.int64)
    if all(name in paths for name in LIST_FILES[:3]) and loaded.class_top.shape[1]:
        loaded.class_lists = ClassLists.from_files(paths)
    return loaded


def _codes(path: Path, mapped: bool, budget_mb: float) -> tuple[Any, float]:
    """8-bit codes from ``path``: memory-mapped when they fit ``budget_mb`` (resident as queries touch them,
    shared between workers), else read per query (:class:`FileRows`: ``pread``, outside this process's
    memory); and the budget left."""
    size = path.stat().st_size / 2**20
    if mapped and size > budget_mb:
        return FileRows(path), budget_mb
    mapped_codes = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)  # no np.memmap per-call overhead
    return mapped_codes, max(0.0, budget_mb - size)


def join_segments(parts: list[ClusterIndex], manifest: IndexManifest) -> ClusterIndex:
    """One index over ``parts`` (a base and its deltas) without copying their rows: their lists are
    searched side by side, their per-row arrays read through :class:`shared.rows.Column`. Label codes
    are mapped onto ``manifest.label_names``; an id stored in more than one part keeps its first row,
    the later ones go to ``duplicates`` (never answered).
    """
    first = parts[0]
    starts = np.cumsum([0] + [p.count for p in parts]).astype(np.int64)
    widths = {p.class_top.shape[1] for p in parts}
    class_top = column([p.class_top for p in parts]) if len(widths) == 1 else None
    class_prob = column([p.class_prob for p in parts]) if len(widths) == 1 else None
    captions = Captions(
        np.concatenate([p.captions.rows + start for p, start in zip(parts, starts, strict=False)]).astype(np.int64),
        np.concatenate([p.captions.vectors for p in parts]),
        np.concatenate([p.captions.text for p in parts]),
    )
    ingested = None if any(p.ingested is None for p in parts) else column([p.ingested for p in parts])
    ids = IdTable([(k, o) for p in parts for k, o in zip(p.ids.keys, p.ids.orders, strict=True)])
    joined = ClusterIndex(
        first.index,
        ids,
        Column([p.clusters for p in parts]),
        Column([_remap_labels(p, manifest.label_names) for p in parts]),
        manifest,
        class_top,
        class_prob,
        first.head,
        captions if len(captions.rows) else None,
        ingested,
        Column([p.vectors for p in parts]) if manifest.kind == "ivf_pq" else None,
        codec=first.codec,
        raw=Column([p.raw for p in parts]) if all(p.raw is not None for p in parts) else None,
        raw_codec=first.raw_codec,
    )
    joined.segments = [(p.ivf, int(start)) for p, start in zip(parts, starts, strict=False)]
    joined.owners = [p.index for p in parts]  # each IVF index is owned by its segment's wrapper: keep them
    joined.segment_files = [p.mapped for p in parts]
    joined.duplicates = ids.repeats()
    joined.hidden = joined.duplicates
    joined.cold_start = first.cold_start  # the base's rows keep their numbers
    if joined.class_top.shape[1]:
        joined.class_lists = _segment_lists(parts, joined)
    return joined


def rerank_hits(
    codec: RefineCodec, codes: Any, xq: np.ndarray, shortlist: SearchHits, k: int, *, unit: bool = False
) -> SearchHits:
    """The best ``k`` of ``shortlist`` by the inner products (``unit``: cosines) of ``xq`` (nq, d) with the
    rows' decoded ``codes`` (see :func:`shared.refine.rerank_scores`)."""
    scores = rerank_scores(codec, codes, shortlist.rows, xq, unit=unit)
    return top_k(SearchHits(scores, shortlist.rows, shortlist.probe, shortlist.probe_scores), k, sort=True)


def best_of(
    codec: RefineCodec, codes: Any, rows: np.ndarray, xq: np.ndarray, keep: int, *, unit: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One query's best ``keep`` (>= 1) of ``rows`` (distinct, valid) by the inner products (``unit``: cosines)
    of ``xq`` with their decoded ``codes``, best first: (rows, scores). What :func:`rerank_hits` does for a
    batch, without its bookkeeping (a full sort, -1 padding)."""
    scores = rerank_scores(codec, codes, rows[None], xq[None], unit=unit)[0]
    if len(rows) > keep:
        part = np.argpartition(-scores, keep - 1)[:keep]
        rows, scores = rows[part], scores[part]
    order = np.argsort(-scores, kind="stable")
    return rows[order], scores[order]


def top_k(hits: SearchHits, k: int, *, sort: bool = False) -> SearchHits:
    """The first ``k`` of ``hits`` (best first already, or ``sort`` them by score), padded like FAISS pads
    (-1 rows, -inf scores) when there are fewer."""
    scores, rows = hits.scores, hits.rows
    s = rows.shape[1]
    if sort:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        at = np.arange(len(top))[:, None]  # plain fancy indexing: take_along_axis costs ~10 us a call
        scores, rows = scores[at, top], rows[at, top]
        rows[~np.isfinite(scores)] = -1
    else:
        scores, rows = scores[:, :k], rows[:, :k]
    if k > s:  # fewer candidates than asked for
        scores = np.pad(scores, ((0, 0), (0, k - s)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, k - s)), constant_values=-1)
    return SearchHits(np.asarray(scores, np.float32), rows, hits.probe, hits.probe_scores)


def _remap_labels(part: ClusterIndex, names: list[str]) -> np.ndarray:
    """A part's label codes in terms of ``names`` (the part's own array when they already are)."""
    if list(part.label_names) == list(names[: len(part.label_names)]):
        return part.labels  # the same codes: no copy
    code = {name: i for i, name in enumerate(names)}
    table = np.array([code[name] for name in part.label_names] + [-1], dtype=np.int32)
    return table[np.asarray(part.labels)]


def merge_segments(parts: list[ClusterIndex], manifest: IndexManifest) -> ClusterIndex:
    """One index holding the rows of ``parts`` in order, in one set of lists (the job side, when deltas
    merge): :func:`join_segments`, then its lists copied into one (:meth:`ClusterIndex.lists_copy`: fast-scan
    PQ lists, which FAISS cannot merge, take the later parts' rows again from their decoded re-ranking codes)
    and its per-row arrays concatenated. Label codes are mapped onto ``manifest.label_names``; an id stored in
    more than one part keeps its first row, the later ones go to ``duplicates``.
    """
    joined = join_segments(parts, manifest) if len(parts) > 1 else parts[0]
    index = joined.lists_copy()
    ivf = faiss.extract_index_ivf(index)
    if manifest.kind != "ivf_pq" and ivf.direct_map.type == faiss.DirectMap.NoMap:  # type: ignore[attr-defined]
        ivf.make_direct_map()  # a stored row's vector is read back from the lists

    def whole(column: Any) -> np.ndarray | None:
        return None if column is None else np.asarray(column)

    merged = ClusterIndex(
        index,
        joined.ids,
        list_of_rows(ivf),
        np.asarray(joined.built_labels),
        manifest,
        whole(joined.class_top),
        whole(joined.class_prob),
        joined.head,
        joined.captions if len(joined.captions.rows) else None,
        whole(joined.ingested),
        whole(joined.vectors),
        codec=joined.codec,
        raw=whole(joined.raw),
        raw_codec=joined.raw_codec,
    )
    merged.duplicates = joined.duplicates
    merged.hidden = merged.duplicates
    merged.class_lists = joined.class_lists
    merged.cold_start = joined.cold_start
    return merged


def list_of_rows(ivf: Any) -> np.ndarray:
    """int32 (ntotal,) the IVF list (cluster) each row was added to, read from the lists themselves
    (assigning every vector to its nearest centroid again would cost as much as adding them)."""
    out = np.full(int(ivf.ntotal), -1, dtype=np.int32)
    invlists = ivf.invlists
    for lst in range(int(ivf.nlist)):
        size = int(invlists.list_size(lst))
        if size:
            out[faiss.rev_swig_ptr(invlists.get_ids(lst), size)] = lst
    return out


def _segment_lists(parts: list[ClusterIndex], merged: ClusterIndex) -> TopRows:
    """Each part's own lists (as published with its segment), or, where one has none, lists built in memory
    for all the merged rows."""
    starts = np.cumsum([0] + [len(p.ids) for p in parts])
    own = [(int(start), p.class_lists) for p, start in zip(parts, starts, strict=False)]
    if all(isinstance(lists, ClassLists) for _, lists in own):
        return SegmentLists([(start, lists) for start, lists in own if isinstance(lists, ClassLists)], len(merged.ids))
    log.info("a segment of index %s has no class lists: building them in memory", merged.manifest.version)
    return ClassLists.build(merged.class_top, merged.class_prob, IMAGENET_CLASSES)


def _read_faiss(path: Path) -> tuple[Any, bool]:
    """Read an index file memory-mapped (the lists stay in the page cache, shared between workers and
    read on demand, so a cold worker answers sooner); an ordinary read where mapping is refused."""
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP), True
    except RuntimeError as exc:
        log.info("memory-mapping %s failed (%s); reading it whole", path, exc)
        return faiss.read_index(str(path)), False


def load_current(storage: Storage, cache_dir: Path, *, mount: Path | None = None) -> ClusterIndex:
    """Load the published version.

    Raises:
        NotReady: if nothing has been published yet.
    """
    version = current_version(storage)
    if version is None:
        raise NotReady(
            "no index has been built yet: run `clusterlens embed` then `clusterlens reindex`", code="index_missing"
        )
    return load_version(storage, version, cache_dir, mount=mount)
