"""The cluster-routed index: optional PCA, k-means centroids, per-cluster lists (FAISS IVF).

Vectors are power-normalised (x ** 0.5 by default) and L2-normalised (after PCA too), so inner
product is cosine similarity. A query is
assigned to its ``nprobe`` nearest centroids and compared only with the images in those clusters.

Published layout in the index container::

    index/v000007/index.faiss   IndexPreTransform(PCA, L2norm) + IndexIVFFlat with a direct map, or for
                                IVF-PQ IndexPreTransform(PCA + random rotation, L2norm) + IndexIVFPQ
    index/v000007/ids.npy       image id of each row; order.npy: the rows sorted by id (id lookups)
    index/v000007/vectors.npy   IVF-PQ only: every row's exact vector in the index's space (float32),
                                memory-mapped and read only for the shortlist a query re-ranks
    index/v000007/clusters.npy  cluster (IVF list) of each row
    index/v000007/labels.npy    label code of each row (-1: none); names in the manifest
    index/v000007/class_top.npy, class_prob.npy   each row's top ImageNet classes and probabilities
    index/v000007/ingested.npy  ingest time of each row (UTC epoch seconds), for filters
    index/v000007/caption_rows.npy, caption_vectors.npy, captions.npy   rows with a caption, its text
                                embedding (MiniLM, float16) and text, for text search
    index/v000007/head.onnx, head.json   the projection head, for an index in the head's space
    index/v000007/manifest.json what it was built from, parameters, timings
    index/CURRENT.json          {"version": "v000007"}: swapped last, atomically

Three kinds, chosen by :func:`plan_index` from the collection size and a memory budget:

- ``flat``: small collections. The same clustered lists, but every list is searched: exact.
- ``ivf_flat``: the default. Full vectors in the lists; a query scans its ``nprobe`` nearest lists.
- ``ivf_pq``: large collections. The lists hold product-quantised codes (``m`` bytes a vector at 8
  bits); a query scans them for a shortlist of ``k * rerank`` rows, which are re-ranked exactly with
  their full vectors from ``vectors.npy`` (on disk, memory-mapped: only the shortlist is read).

An index lives in one of two spaces, recorded as ``space`` in its manifest: ``backbone`` (the raw
1280-d embeddings, power-normalised, PCA) or ``head`` (the 64-d output of a trained projection head).
Either way it takes raw backbone embeddings in :meth:`ClusterIndex.search`; an index in the head's
space carries its own copy of the head, so queries always use the head it was built with.

A version folder is never changed after publishing, so readers see the old index or the new one.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from shared.errors import BadRequest, NotReady
from shared.filters import SearchFilters
from shared.head import HEAD_FILE, ProjectionHead
from shared.storage import INDEX, Storage
from shared.versions import claim_next, prune, read_pointer, swap_pointer
from shared.versions import list_versions as _list_versions

log = logging.getLogger(__name__)

CAPTION_FILES = ("caption_rows.npy", "caption_vectors.npy", "captions.npy")
FILES = (
    "index.faiss",
    "ids.npy",
    "clusters.npy",
    "labels.npy",
    "class_top.npy",
    "class_prob.npy",
    "ingested.npy",
    "order.npy",
    "vectors.npy",
    *CAPTION_FILES,
)
# absent from older versions (and vectors.npy from every kind but ivf_pq)
OPTIONAL_FILES = ("class_top.npy", "class_prob.npy", "ingested.npy", "order.npy", "vectors.npy", *CAPTION_FILES)
FORMAT = 3  # bump when the files of a version change, so an up-to-date check rebuilds
KINDS = ("flat", "ivf_flat", "ivf_pq")
ID_BYTES = 8  # FAISS keeps an int64 id beside each code in the inverted lists
DIRECT_MAP_BYTES = 8  # IVF-Flat's row -> (list, offset) map, for reconstructing a stored row
# Above this n * nlist (about 130,000 vectors in 400 lists) k-means trains on 64 points a list for
# 10 iterations instead of FAISS's 256 and 25: at 1M vectors in 4,000 lists that is ~1 minute on
# 2 cores instead of ~15; the recall gate measures what the index loses by it.
LARGE_TRAINING = 5e7


def power_normalize(x: np.ndarray, power: float) -> np.ndarray:
    """Signed power normalisation ``sign(x) * |x| ** power`` (1.0: unchanged), then L2 per row.

    Damps the few large activations that dominate pooled CNN features; 0.5 raised Fashion-MNIST
    precision@10 by ~0.6 points over plain cosine on two disjoint query sets.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if power != 1.0:
        x = np.sign(x) * np.abs(x) ** np.float32(power)
    return normalize(x)


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of a float32 (n, d) array (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def choose_nlist(n: int, min_points_per_list: int) -> int:
    """Number of clusters for ``n`` vectors, with enough points to train each.

    About sqrt(n) up to 100,000 vectors, growing to 4 * sqrt(n) at 1,000,000 and beyond: more,
    smaller lists keep the share of the collection a query scans falling as it grows.
    """
    factor = float(np.clip(1 + 3 * np.log10(max(n, 1) / 1e5), 1, 4))
    return int(max(1, min(round(factor * np.sqrt(n)), n // min_points_per_list)))


@dataclass(frozen=True)
class IndexPlan:
    """What to build: the kind and its parameters, and why.

    Attributes:
        kind: ``flat``, ``ivf_flat`` or ``ivf_pq`` (see the module docstring).
        dim: dimension the index searches in (after PCA, if any).
        pca_dim: PCA output dimension, 0 for none.
        nlist: number of clusters (IVF lists).
        pq_m, pq_nbits: IVF-PQ code: ``pq_m`` sub-quantisers of ``pq_nbits`` bits (0 for other kinds).
        rerank: IVF-PQ shortlist factor: ``k * rerank`` candidates are re-ranked exactly (0 otherwise).
        bytes_per_vector: memory the index holds per vector (code plus its id in the list).
        reason: one line on why this kind was chosen.
    """

    kind: str
    dim: int
    pca_dim: int
    nlist: int
    pq_m: int = 0
    pq_nbits: int = 0
    rerank: int = 0
    bytes_per_vector: int = 0
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_index(
    n: int,
    input_dim: int,
    *,
    kind: str = "auto",
    memory_mb: float = 1024,
    pca_dim: int = 256,
    nlist: int = 0,
    pq_m: int = 0,
    pq_nbits: int = 8,
    rerank: int = 10,
    flat_max: int = 2000,
    min_points_per_list: int = 39,
) -> IndexPlan:
    """Choose the index kind and its parameters from the collection size and a memory budget.

    ``auto``: ``flat`` up to ``flat_max`` vectors (a full scan costs microseconds there); ``ivf_flat``
    while ``n`` full vectors (with their ids and direct-map entries) fit in ``memory_mb``; ``ivf_pq``
    beyond, with the largest code of at most 56 bytes (64 with its id) that fits the budget. Any
    parameter given (non-zero) is kept as is.

    Args:
        n: vectors to index; input_dim: their dimension before PCA.
        kind: ``auto`` or one of :data:`KINDS`.
        memory_mb: budget for what the index holds in memory (codes and ids, not the re-ranking file).
        pca_dim: PCA before the coarse quantiser; 0 (or >= input_dim, or n too small) for none.

    Raises:
        ValueError: unknown kind, or an IVF-PQ code that does not divide the dimension.
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"index kind must be auto or one of {', '.join(KINDS)}, not {kind!r}")
    if n < 1:
        raise ValueError("nothing to index: embed some images first")
    use_pca = 0 < pca_dim < input_dim and n > pca_dim
    dim = pca_dim if use_pca else input_dim
    budget = memory_mb * 2**20
    full = 4 * dim + ID_BYTES + DIRECT_MAP_BYTES
    if kind == "auto":
        if n <= flat_max:
            kind, reason = "flat", f"{n} vectors <= {flat_max}: a full scan is exact and cheap"
        elif n * full <= budget:
            kind, reason = "ivf_flat", f"{n} x {full} B = {n * full / 2**20:.0f} MiB fits the {memory_mb:g} MiB budget"
        else:
            kind, reason = "ivf_pq", f"{n} x {full} B = {n * full / 2**20:.0f} MiB exceeds the {memory_mb:g} MiB budget"
    else:
        reason = "set by CLUSTERLENS_INDEX_KIND"
    nlist = min(nlist or choose_nlist(n, min_points_per_list), n)
    if kind != "ivf_pq":
        return IndexPlan(kind, dim, dim if use_pca else 0, nlist, bytes_per_vector=full, reason=reason)
    if not pq_m:
        room = min(56.0, budget / n - ID_BYTES) * 8 / pq_nbits  # sub-quantisers the budget allows
        fits = [m for m in (64, 56, 48, 32, 24, 16, 8, 4, 2, 1) if dim % m == 0 and m <= min(room, dim)]
        pq_m = fits[0] if fits else min(m for m in (8, 4, 2, 1) if dim % m == 0)
    if dim % pq_m:
        raise ValueError(f"IVF-PQ needs pq_m to divide the dimension {dim}; {pq_m} does not")
    code = (pq_m * pq_nbits + 7) // 8
    return IndexPlan(
        "ivf_pq", dim, dim if use_pca else 0, nlist, pq_m, pq_nbits, max(1, rerank), code + ID_BYTES, reason
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


class ClusterIndex:
    """A built index with its row metadata. Build with :meth:`build`, persist with :func:`publish`."""

    def __init__(
        self,
        index: Any,
        ids: np.ndarray,
        clusters: np.ndarray,
        labels: np.ndarray,
        manifest: dict[str, Any],
        class_top: np.ndarray | None = None,
        class_prob: np.ndarray | None = None,
        head: ProjectionHead | None = None,
        captions: Captions | None = None,
        ingested: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
        order: np.ndarray | None = None,
    ):
        self.index = index
        # IVF-PQ: exact vectors (n, dim) in the index's space for re-ranking; None for other kinds
        self.vectors = vectors
        self.rerank = int(manifest.get("rerank", 0)) if vectors is not None else 0
        self.head = head
        self.ingested = ingested
        self.hidden = np.zeros(0, np.int64)  # rows of deleted images, left out until the next build
        self.mapped: Path | None = None  # the file the FAISS lists are memory-mapped from, if they are
        self.captions = captions or Captions.empty()
        self._caption_of = {int(r): str(t) for r, t in zip(self.captions.rows, self.captions.text, strict=True)}
        # Stored as float16; widened once here rather than on every text query.
        self.caption_vectors = self.captions.vectors.astype(np.float32)
        self.ivf = faiss.extract_index_ivf(index)
        self.ids = ids
        self.clusters = clusters
        self.labels = labels
        n = len(ids)
        self.class_top = class_top if class_top is not None else np.zeros((n, 0), np.int16)
        self.class_prob = class_prob if class_prob is not None else np.zeros((n, 0), np.float32)
        self.manifest = manifest
        self.label_names: list[str] = list(manifest.get("label_names", []))
        # As built; the search service lays the label log and the classifier's predictions over them.
        self.built_labels = labels
        self.built_label_names = list(self.label_names)
        self.predicted = np.full(n, -1, np.int32)  # code into predicted_names, -1: no prediction
        self.predicted_prob = np.zeros(n, np.float32)
        self.predicted_names: list[str] = []
        self._order = order if order is not None and len(order) == len(ids) else np.argsort(ids)

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: list[str],
        labels: list[str | None],
        *,
        encoder_version: str,
        kind: str = "ivf_flat",
        pca_dim: int = 256,
        nlist: int = 0,
        nprobe: int = 0,
        pq_m: int = 0,
        pq_nbits: int = 8,
        rerank: int = 10,
        memory_mb: float = 1024,
        flat_max: int = 2000,
        min_points_per_list: int = 39,
        power: float = 0.5,
        recall_target: float = 0.95,
        recall_sample: int = 1000,
        class_top: np.ndarray | None = None,
        class_prob: np.ndarray | None = None,
        head: ProjectionHead | None = None,
        captions: Captions | None = None,
        ingested: np.ndarray | None = None,
        source: dict[str, Any] | None = None,
        seed: int = 1234,
    ) -> ClusterIndex:
        """Train and fill an index.

        Args:
            vectors: float32 (n, d) raw embeddings (normalised here).
            ids: n image ids; labels: n label names or None.
            kind: ``flat``, ``ivf_flat``, ``ivf_pq`` or ``auto`` (see :func:`plan_index`, which also
                takes ``pq_m``, ``pq_nbits``, ``rerank``, ``memory_mb`` and ``flat_max``).
            pca_dim: reduce to this many dimensions first; 0 (or >= d, or n too small) skips PCA.
            power: power normalisation before L2 (see :func:`power_normalize`); 1.0 turns it off.
            nlist: number of clusters; 0 chooses about sqrt(n).
            nprobe: clusters searched per query; 0 picks the smallest that reaches ``recall_target``.
            recall_target, recall_sample: recall@10 to reach, measured against exact search on this
                many stored vectors (see :meth:`tune_nprobe`); the result goes in the manifest.
            class_top, class_prob: optional (n, t) top ImageNet classes and probabilities, for text search.
            head: build in this projection head's space (its own normalisation; ``power`` and PCA unused).
            captions: the rows that have a caption, with its text and text embedding.
            ingested: int64 (n,) ingest time of each row in UTC epoch seconds, for filters.

        Raises:
            ValueError: on mismatched lengths or an empty collection.
        """
        if vectors.ndim != 2 or len(vectors) != len(ids) or len(ids) != len(labels):
            raise ValueError(f"vectors {vectors.shape}, ids {len(ids)} and labels {len(labels)} must agree")
        n, d = vectors.shape
        if n == 0:
            raise ValueError("nothing to index: embed some images first")
        t0 = time.perf_counter()
        if head is not None:
            x = head.apply(vectors).embedding
            power, pca_dim = 1.0, 0
        else:
            x = power_normalize(vectors, power)
        plan = plan_index(
            n,
            x.shape[1],
            kind=kind,
            memory_mb=memory_mb,
            pca_dim=pca_dim,
            nlist=nlist,
            pq_m=pq_m,
            pq_nbits=pq_nbits,
            rerank=rerank,
            flat_max=flat_max,
            min_points_per_list=min_points_per_list,
        )
        nlist = plan.nlist
        if plan.kind == "ivf_pq":
            # A random rotation spreads the variance (PCA puts most of it in the first dimensions)
            # evenly over the sub-quantisers: recall@10 0.89 -> 0.98 on the real 70k, same code size.
            pre = f"PCAR{plan.pca_dim},L2norm," if plan.pca_dim else f"RR{x.shape[1]},"
            desc = f"{pre}IVF{nlist},PQ{plan.pq_m}x{plan.pq_nbits}"
        else:
            desc = (f"PCA{plan.pca_dim},L2norm," if plan.pca_dim else "") + f"IVF{nlist},Flat"
        index = faiss.index_factory(x.shape[1], desc, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.spherical = True
        ivf.cp.seed = seed
        ivf.cp.min_points_per_centroid = 1  # small collections: accept few points per cluster
        if n * nlist > LARGE_TRAINING:  # k-means on a sample: its cost grows with n * nlist
            ivf.cp.max_points_per_centroid, ivf.cp.niter = 64, 10
        if plan.kind == "ivf_pq":
            ivfpq: Any = faiss.downcast_index(ivf)
            ivfpq.pq.cp.min_points_per_centroid = 1  # the recall gate judges the codes
            # index_factory turns on polysemous training (code reordering for Hamming filtering, which
            # is not used here); it took 49 s of a 1,000-vector build and half of a 1M one.
            ivfpq.do_polysemous_training = False
        index.train(x)
        t_train = time.perf_counter() - t0
        index.add(x)
        if plan.kind != "ivf_pq":  # IVF-PQ reads exact vectors from its re-ranking file instead
            ivf.make_direct_map()
        xt = _transform(index, x)
        del x
        clusters = list_of_rows(ivf)
        names = sorted({lab for lab in labels if lab is not None})
        code = {name: i for i, name in enumerate(names)}
        label_codes = np.array([code[lab] if lab is not None else -1 for lab in labels], dtype=np.int32)
        sizes = np.bincount(clusters, minlength=nlist)
        manifest = {
            "encoder_version": encoder_version,
            "space": "head" if head is not None else "backbone",
            "head": _head_summary(head),
            "factory": desc,
            "kind": plan.kind,
            "plan": plan.to_json(),
            "rerank": plan.rerank,
            "bytes_per_vector": plan.bytes_per_vector,
            "count": n,
            "input_dim": d,
            "dim": int(ivf.d),
            "pca_dim": plan.pca_dim,
            "nlist": nlist,
            "metric": "cosine",
            "power": power,
            "label_names": names,
            "captions": len(captions.rows) if captions else 0,
            "cluster_sizes": _sizes(sizes),
            "trained_count": n,
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "train_seconds": round(t_train, 3),
            "train": {
                "points": min(n, int(ivf.cp.max_points_per_centroid) * nlist),
                "iterations": int(ivf.cp.niter),
            },
            "build_seconds": round(time.perf_counter() - t0, 3),
            "source": source or {},
        }
        if class_top is None or class_prob is None:
            class_top, class_prob = np.zeros((n, 0), np.int16), np.zeros((n, 0), np.float32)
        if class_top.shape != class_prob.shape or len(class_top) != n:
            raise ValueError("class_top and class_prob must be (n, t) arrays of the same shape")
        manifest["format"] = FORMAT
        built = cls(
            index,
            np.array(ids),
            clusters,
            label_codes,
            manifest,
            class_top.astype(np.int16),
            class_prob.astype(np.float32),
            head,
            captions,
            None if ingested is None else np.asarray(ingested, dtype=np.int64),
            xt if plan.kind == "ivf_pq" else None,
        )
        t1 = time.perf_counter()
        if plan.kind == "flat":
            nprobe = nlist  # every list: exact
        recall = built.tune_nprobe(xt, target=recall_target, sample=recall_sample, nprobe=nprobe, seed=seed)
        manifest.update(nprobe=built.nprobe, rerank=built.rerank, recall=recall)
        manifest["recall"]["seconds"] = round(time.perf_counter() - t1, 3)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        return built

    def extended(
        self,
        vectors: np.ndarray,
        ids: list[str],
        labels: list[str | None],
        *,
        nprobe: int = 0,
        recall_target: float = 0.95,
        recall_sample: int = 1000,
        class_top: np.ndarray | None = None,
        class_prob: np.ndarray | None = None,
        captions: Captions | None = None,
        ingested: np.ndarray | None = None,
        source: dict[str, Any] | None = None,
        seed: int = 1234,
    ) -> ClusterIndex:
        """A new index: this one plus more vectors, added to the existing clusters without retraining.

        The PCA, centroids and head stay as trained; recall is measured again over all vectors and
        nprobe re-chosen. This index is not changed (a published version never is).

        Args:
            vectors: float32 (m, input_dim) raw embeddings of images not in this index.
            ids, labels, class_top, class_prob, ingested: as for :meth:`build`, for the new rows.
            captions: the new rows' captions, rows counted from 0 within ``vectors``.

        Raises:
            ValueError: on mismatched lengths, an id already indexed, or a different dimension.
        """
        m = len(ids)
        if vectors.ndim != 2 or len(vectors) != m or len(labels) != m or vectors.shape[1] != self.manifest["input_dim"]:
            raise ValueError(f"vectors {vectors.shape}, {m} ids and {len(labels)} labels do not fit this index")
        if any(self.row_of(i) is not None for i in ids):
            raise ValueError("some ids are already in the index")
        t0 = time.perf_counter()
        n = self.count
        x = self.head.apply(vectors).embedding if self.head else power_normalize(vectors, self.manifest["power"])
        if self.mapped is not None:  # a mapped copy would write back into the published file: read it whole
            index = faiss.read_index(str(self.mapped))
        else:
            index = faiss.deserialize_index(faiss.serialize_index(self.index))  # clone_index lacks L2norm
        index.add(x)
        ivf = faiss.extract_index_ivf(index)
        if self.vectors is None:
            ivf.make_direct_map()
        xt_new = _transform(index, x)
        assign = list_of_rows(ivf)[n:]
        names = sorted(set(self.label_names) | {lab for lab in labels if lab is not None})
        code = {name: i for i, name in enumerate(names)}
        old = np.array([code[name] for name in self.label_names] + [-1], dtype=np.int32)[self.labels]
        new = np.array([code[lab] if lab is not None else -1 for lab in labels], dtype=np.int32)
        clusters = np.concatenate([self.clusters, assign])
        t = self.class_top.shape[1]
        if class_top is None or class_prob is None or class_top.shape[1] != t:
            class_top, class_prob = np.zeros((m, t), np.int16), np.zeros((m, t), np.float32)
        if captions is not None and len(captions.rows):
            captions = Captions(
                np.concatenate([self.captions.rows, captions.rows + n]),
                np.concatenate([self.captions.vectors, captions.vectors.astype(np.float16)]),
                np.concatenate([self.captions.text, captions.text]),
            )
        else:
            captions = self.captions
        times = None
        if self.ingested is not None and ingested is not None:
            times = np.concatenate([self.ingested, np.asarray(ingested, dtype=np.int64)])
        manifest = {k: v for k, v in self.manifest.items() if k not in ("version", "recall", "nprobe", "incremental")}
        manifest.update(
            count=n + m,
            label_names=names,
            captions=len(captions.rows),
            cluster_sizes=_sizes(np.bincount(clusters, minlength=int(ivf.nlist))),
            trained_count=int(self.manifest.get("trained_count", n)),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=source or {},
            incremental={"from": self.manifest.get("version"), "added": m},
        )
        grown = ClusterIndex(
            index,
            np.concatenate([self.ids.astype("U64"), np.array(ids, dtype="U64")]),
            clusters,
            np.concatenate([old, new]),  # old codes remapped to the merged names; -1 stays -1
            manifest,
            np.concatenate([self.class_top, class_top.astype(np.int16)]),
            np.concatenate([self.class_prob, class_prob.astype(np.float32)]),
            self.head,
            captions,
            times,
            None if self.vectors is None else np.concatenate([self.vectors, xt_new]),
        )
        xt = grown.all_vectors()
        if self.manifest.get("kind") == "flat":
            nprobe = int(ivf.nlist)
        recall = grown.tune_nprobe(xt, target=recall_target, sample=recall_sample, nprobe=nprobe, seed=seed)
        manifest.update(
            nprobe=grown.nprobe, rerank=grown.rerank, recall=recall, build_seconds=round(time.perf_counter() - t0, 3)
        )
        return grown

    def tune_nprobe(
        self, xt: np.ndarray, *, target: float = 0.95, sample: int = 1000, nprobe: int = 0, seed: int = 1234
    ) -> dict[str, Any]:
        """Measure recall@10 against exact search and set the smallest ``nprobe`` that reaches ``target``.

        Leave-one-out on ``sample`` stored vectors: each is a query against all the others, and its
        true 10 neighbours come from exact (flat) search over the same vectors the index holds, so
        this measures what cluster routing (and PQ) loses (PCA is part of the space, not of the error).
        nprobe is tried at 1, 2, 4, ... up to ``nlist`` (which is exact), or only at ``nprobe`` if given.

        For IVF-PQ the re-ranked shortlist is tuned with it: at each nprobe the shortlist factor is
        tried at 1, 2 and 4 times the plan's ``rerank`` (a shorter shortlist is a prefix of a longer
        one, so one scan serves all three), and the smallest nprobe, then the smallest factor, that
        reaches the target is kept.

        Args:
            xt: float32 (n, dim) every indexed vector, already transformed (row i is row i of the index).

        Returns:
            ``{"target", "at_10", "sample", "curve": [{"nprobe", "recall_at_10", "ms_per_query"}]}``
            (IVF-PQ entries also carry ``rerank``); ``at_10`` is the recall at the chosen setting,
            below ``target`` only when nothing tried reaches it.
        """
        n, nlist = len(xt), int(self.ivf.nlist)
        k = min(10, n - 1)
        if k < 1:
            self.ivf.nprobe = 1
            return {"target": target, "at_10": 1.0, "meets_target": True, "sample": 0, "curve": []}
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
        queries = np.ascontiguousarray(xt[rows])
        _, exact = faiss.knn(queries, xt, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        truth = [set(r[r != row][:k]) for r, row in zip(exact, rows, strict=True)]
        if nprobe:
            candidates = [min(nprobe, nlist)]
        else:
            candidates = sorted({min(2**i, nlist) for i in range(int(np.ceil(np.log2(max(nlist, 1)))) + 1)})
        base = int(self.manifest.get("plan", {}).get("rerank", self.rerank)) if self.vectors is not None else 0
        factors = [base, 2 * base, 4 * base] if base else [0]

        def recall_of(got: np.ndarray) -> float:
            found = [set(g[(g != row) & (g >= 0)][:k]) for g, row in zip(got, rows, strict=True)]
            return float(np.mean([len(f & t) / k for f, t in zip(found, truth, strict=True)]))

        curve: list[dict[str, Any]] = []
        recall = 0.0
        for p in candidates:
            t0 = time.perf_counter()
            if not base:
                got = self.search_transformed(queries, k + 1, p).rows
                ms = (time.perf_counter() - t0) * 1000 / len(rows)
                recall = recall_of(got)
                curve.append({"nprobe": p, "recall_at_10": round(recall, 4), "ms_per_query": round(ms, 4)})
                if recall >= target:
                    break
                continue
            # The raw PQ shortlist at the longest length, re-ranked by prefix below.
            probe_scores, probe = self.ivf.quantizer.search(queries, p)
            longest = self._scan(
                queries, min((k + 1) * factors[-1], n), probe, probe_scores, faiss.SearchParametersIVF()
            )
            scan_ms = (time.perf_counter() - t0) * 1000 / len(rows)
            for r in factors:
                t1 = time.perf_counter()
                width = min((k + 1) * r, n)
                prefix = SearchHits(
                    longest.scores[:, :width], longest.rows[:, :width], longest.probe, longest.probe_scores
                )
                recall = recall_of(self._rerank(queries, prefix, k + 1).rows)
                ms = scan_ms + (time.perf_counter() - t1) * 1000 / len(rows)
                curve.append({"nprobe": p, "rerank": r, "recall_at_10": round(recall, 4), "ms_per_query": round(ms, 4)})
                if recall >= target:
                    break
            if recall >= target:
                break
        self.ivf.nprobe = int(curve[-1]["nprobe"])
        if base:
            self.rerank = int(curve[-1]["rerank"])
        return {
            "target": target,
            "at_10": curve[-1]["recall_at_10"],
            "meets_target": recall >= target,
            "sample": len(rows),
            "curve": curve,
        }

    # -- queries ------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int:
        return int(self.ivf.nprobe)

    def rows_of(self, image_ids: list[str]) -> np.ndarray:
        """int64 (m,) rows of ids, -1 for ids not indexed."""
        if not len(image_ids) or not len(self.ids):
            return np.full(len(image_ids), -1, np.int64)
        keys = np.asarray(image_ids, dtype="U64")
        pos = np.minimum(np.searchsorted(self.ids, keys, sorter=self._order), len(self.ids) - 1)
        rows = self._order[pos]
        return np.where(self.ids[rows] == keys, rows, -1).astype(np.int64)

    def overlay_labels(self, current: dict[str, str], extra_names: list[str] | None = None) -> None:
        """Take each image's current label (image id -> label) over the labels it was built with.

        ``extra_names`` (the label set's classes) join the label names even while no image has them.

        New arrays are swapped in whole, so a query running meanwhile sees the old labels or the new.
        """
        names = list(self.built_label_names)
        extra = sorted({lab for lab in [*current.values(), *(extra_names or [])] if lab not in set(names)})
        names += extra
        code = {name: i for i, name in enumerate(names)}
        labels = np.array(self.built_labels, dtype=np.int32, copy=True)
        ids = list(current)
        rows = self.rows_of(ids)
        found = rows >= 0
        if found.any():
            labels[rows[found]] = np.array([code[current[i]] for i, f in zip(ids, found, strict=True) if f], np.int32)
        self.label_names = names
        self.labels = labels

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
        pos = int(np.searchsorted(self.ids, image_id, sorter=self._order))
        if pos < len(self.ids) and self.ids[self._order[pos]] == image_id:
            return int(self._order[pos])
        return None

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
        return self.search_transformed(self.transform(queries), k, nprobe, filters)

    def transform(self, queries: np.ndarray) -> np.ndarray:
        """Raw embeddings (nq, input_dim) into the index's space (nq, dim): head or power
        normalisation, then PCA and L2 norm, exactly as the indexed vectors were.

        Raises:
            ValueError: for a wrong shape.
        """
        if queries.ndim != 2 or queries.shape[1] != self.manifest["input_dim"]:
            raise ValueError(f"queries must be (nq, {self.manifest['input_dim']}), got {queries.shape}")
        if self.head is not None:
            xq = self.head.apply(queries).embedding
        else:
            xq = power_normalize(queries, float(self.manifest.get("power", 1.0)))
        return _transform(self.index, xq)

    def search_row(
        self, row: int, k: int, nprobe: int | None = None, filters: SearchFilters | None = None
    ) -> SearchHits:
        """Search with an indexed image's own stored vector."""
        return self.search_transformed(self.vector_of(row)[None, :], k, nprobe, filters)

    def vector_of(self, row: int) -> np.ndarray:
        """float32 (dim,) an indexed row's vector in the index's space (exact, also for IVF-PQ)."""
        if self.vectors is not None:
            return np.array(self.vectors[int(row)], dtype=np.float32)
        return np.asarray(self.ivf.reconstruct(int(row)), dtype=np.float32)

    def all_vectors(self) -> np.ndarray:
        """float32 (n, dim) every indexed vector in the index's space, row order (exact)."""
        if self.vectors is not None:
            return np.ascontiguousarray(self.vectors, dtype=np.float32)
        return np.ascontiguousarray(self.ivf.reconstruct_n(0, self.count), dtype=np.float32)

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
            mask &= self.labels == self.label_names.index(filters.label)
        if filters.labelled is not None:
            mask &= (self.labels >= 0) == filters.labelled
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
        self, xt: np.ndarray, k: int, nprobe: int | None = None, filters: SearchFilters | None = None
    ) -> SearchHits:
        """Assign to the nearest centroids, then search inside those clusters only.

        With filters, only the selected rows are candidates: a cluster filter searches exactly that
        cluster; other filters widen nprobe by the inverse of their selectivity (so as many
        candidates are expected as without a filter) and fall back to every cluster when a query
        still finds fewer than ``k`` of the selected rows.
        """
        nlist = int(self.ivf.nlist)
        nprobe = max(1, min(nprobe or self.nprobe, nlist))
        xt = np.ascontiguousarray(xt, dtype=np.float32)
        n = len(xt)
        allowed = self.select(filters)
        params = faiss.SearchParametersIVF()
        keep_alive: list[Any] = []  # SWIG selectors hold raw pointers: keep them referenced
        hidden_rows = self.hidden  # read once: a delete may swap it meanwhile
        if allowed is None and len(hidden_rows):
            hidden = faiss.IDSelectorBatch(len(hidden_rows), faiss.swig_ptr(hidden_rows))
            keep_alive += [hidden, faiss.IDSelectorNot(hidden)]
            params.sel = keep_alive[-1]
        if allowed is not None:
            keep_alive.append(faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed)))
            params.sel = keep_alive[-1]
            if len(allowed) == 0:
                empty = np.full((n, k), -1, dtype=np.int64)
                return SearchHits(
                    np.full((n, k), -np.inf, np.float32), empty, empty[:, :0], np.zeros((n, 0), np.float32)
                )
        if filters is not None and filters.cluster is not None:
            centroid = self.ivf.quantizer.reconstruct(int(filters.cluster))
            probe = np.full((n, 1), filters.cluster, dtype=np.int64)
            probe_scores = (xt @ centroid)[:, None].astype(np.float32)
            return self._search_probed(xt, k, probe, probe_scores, params)
        if allowed is not None:
            nprobe = min(nlist, int(np.ceil(nprobe * self.count / len(allowed))))
        probe_scores, probe = self.ivf.quantizer.search(xt, nprobe)
        hits = self._search_probed(xt, k, probe, probe_scores, params)
        if allowed is not None and nprobe < nlist and ((hits.rows >= 0).sum(1) < min(k, len(allowed))).any():
            probe_scores, probe = self.ivf.quantizer.search(xt, nlist)
            hits = self._search_probed(xt, k, probe, probe_scores, params)
        del keep_alive  # the searches above are done
        return hits

    def _search_probed(
        self, xt: np.ndarray, k: int, probe: np.ndarray, probe_scores: np.ndarray, params: Any
    ) -> SearchHits:
        if self.vectors is None or not self.rerank:
            return self._scan(xt, k, probe, probe_scores, params)
        shortlist = self._scan(xt, min(k * self.rerank, self.count), probe, probe_scores, params)
        return self._rerank(xt, shortlist, k)

    def _rerank(self, xt: np.ndarray, shortlist: SearchHits, k: int) -> SearchHits:
        """Exact inner products of the shortlist's full vectors; the best ``k`` of each query."""
        n, s = shortlist.rows.shape
        rows = shortlist.rows
        scores = np.full((n, s), -np.inf, dtype=np.float32)
        valid = rows >= 0
        if valid.any():
            wanted = np.unique(rows[valid])  # ascending: the memory-mapped file is read in order
            vecs = np.asarray(self.vectors[wanted], dtype=np.float32)  # type: ignore[index]
            where = np.searchsorted(wanted, np.where(valid, rows, wanted[0]))
            scores = np.einsum("nsd,nd->ns", vecs[where], xt, dtype=np.float32)
            scores[~valid] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out_scores = np.take_along_axis(scores, top, 1)
        out_rows = np.take_along_axis(rows, top, 1)
        out_rows[~np.isfinite(out_scores)] = -1
        if k > s:  # fewer candidates than asked for: pad like FAISS does
            out_scores = np.pad(out_scores, ((0, 0), (0, k - s)), constant_values=-np.inf)
            out_rows = np.pad(out_rows, ((0, 0), (0, k - s)), constant_values=-1)
        return SearchHits(out_scores.astype(np.float32), out_rows, shortlist.probe, shortlist.probe_scores)

    def _scan(self, xt: np.ndarray, k: int, probe: np.ndarray, probe_scores: np.ndarray, params: Any) -> SearchHits:
        n = len(xt)
        probe = np.ascontiguousarray(probe, dtype=np.int64)
        probe_scores = np.ascontiguousarray(probe_scores, dtype=np.float32)
        # The Python wrapper of search_preassigned insists on the index's own nprobe; the C++ call
        # takes it per query through SearchParametersIVF, so concurrent queries never share state.
        params.nprobe = probe.shape[1]
        scores = np.empty((n, k), dtype=np.float32)
        rows = np.empty((n, k), dtype=np.int64)
        ivf: Any = self.ivf  # search_preassigned_c is the SWIG entry point, absent from faiss's stubs
        ivf.search_preassigned_c(
            n,
            faiss.swig_ptr(xt),
            k,
            faiss.swig_ptr(probe),
            faiss.swig_ptr(probe_scores),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(rows),
            False,
            params,
        )
        return SearchHits(scores=scores, rows=rows, probe=probe, probe_scores=probe_scores)

    def caption_of(self, row: int) -> str | None:
        return self._caption_of.get(row)

    def label_of(self, row: int) -> str | None:
        code = int(self.labels[row])
        return self.label_names[code] if code >= 0 else None


def _sizes(sizes: np.ndarray) -> dict[str, int]:
    return {"min": int(sizes.min()), "max": int(sizes.max()), "empty": int((sizes == 0).sum())}


def _head_summary(head: ProjectionHead | None) -> dict[str, Any] | None:
    if head is None:
        return None
    m = head.manifest
    return {
        "version": head.version,
        "dim": head.dim,
        "classes": head.classes,
        "sha256": m["sha256"],
        "val_accuracy": m.get("train", {}).get("val_accuracy"),
        "val_knn10_accuracy": m.get("train", {}).get("val_knn10_accuracy"),
    }


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


def _transform(index: Any, x: np.ndarray) -> np.ndarray:
    """Apply an IndexPreTransform's chain (PCA, L2norm) to vectors; identity for a bare IVF."""
    if not isinstance(index, faiss.IndexPreTransform):
        return x
    chain: Any = index.chain  # a SWIG vector, typed as a list in faiss's stubs
    for i in range(chain.size()):
        x = chain.at(i).apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)


# -- publishing and loading -----------------------------------------------------------------------


def fingerprint(encoder_version: str, shards: list[str], params: dict[str, Any]) -> str:
    """Identifies the inputs of a build: same fingerprint, same index."""
    text = "\n".join([f"format {FORMAT}", encoder_version, repr(sorted(params.items())), *sorted(shards)])
    return hashlib.sha256(text.encode()).hexdigest()


def current_version(storage: Storage) -> str | None:
    """The published version name, or None before the first publish."""
    return read_pointer(storage, INDEX)


def list_versions(storage: Storage) -> list[str]:
    """Complete (manifest written) versions, oldest first."""
    return _list_versions(storage, INDEX)


def publish(storage: Storage, built: ClusterIndex, keep: int = 3, *, swap_if: Callable[[], bool] | None = None) -> str:
    """Write a new version, then swap the pointer to it; prune versions beyond ``keep``.

    Args:
        swap_if: asked right before the swap; False leaves the version written (complete, kept
            for rollback) but not current, and sets ``manifest["published"]`` to False.

    Returns:
        the new version name.
    """
    version = claim_next(storage, INDEX)
    manifest = dict(built.manifest, version=version)
    with tempfile.TemporaryDirectory(prefix="clusterlens-index-") as tmp:
        faiss.write_index(built.index, str(Path(tmp) / "index.faiss"))
        np.save(Path(tmp) / "ids.npy", built.ids.astype("U64"))
        np.save(Path(tmp) / "clusters.npy", built.clusters)
        np.save(Path(tmp) / "labels.npy", built.labels)
        np.save(Path(tmp) / "class_top.npy", built.class_top)
        np.save(Path(tmp) / "class_prob.npy", built.class_prob)
        ingested = built.ingested if built.ingested is not None else np.zeros(0, np.int64)
        np.save(Path(tmp) / "ingested.npy", ingested)
        np.save(Path(tmp) / "caption_rows.npy", built.captions.rows.astype(np.int64))
        np.save(Path(tmp) / "caption_vectors.npy", built.captions.vectors.astype(np.float16))
        np.save(Path(tmp) / "captions.npy", built.captions.text)
        np.save(Path(tmp) / "order.npy", built._order.astype(np.int64))
        if built.vectors is not None:
            np.save(Path(tmp) / "vectors.npy", np.asarray(built.vectors, dtype=np.float32))
        for name in FILES:
            if (Path(tmp) / name).is_file():
                storage.upload_file(INDEX, f"{version}/{name}", Path(tmp) / name)
    if built.head is not None:
        storage.upload_file(INDEX, f"{version}/{HEAD_FILE}", built.head.path)
        storage.put_json(INDEX, f"{version}/head.json", built.head.manifest)
    storage.put_json(INDEX, f"{version}/manifest.json", manifest)  # marks the version complete
    built.manifest = manifest
    if swap_if is not None and not swap_if():
        built.manifest = dict(manifest, published=False)
        log.warning("index %s written but not published: a newer build is current", version)
        return version
    swap_pointer(storage, INDEX, version)
    prune(storage, INDEX, keep, current=version)
    log.info("published index %s (%d vectors, %d clusters)", version, built.count, manifest["nlist"])
    return version


def load_version(
    storage: Storage, version: str, cache_dir: Path, *, providers: list[str] | None = None
) -> ClusterIndex:
    """Load a published version, reading files in place when storage is local.

    Raises:
        NotReady: if the version is incomplete or missing.
    """
    if not storage.exists(INDEX, f"{version}/manifest.json"):
        raise NotReady(f"index version {version} is incomplete", code="index_missing")
    manifest = storage.get_json(INDEX, f"{version}/manifest.json")
    paths = {}
    for name in FILES:
        blob = f"{version}/{name}"
        if name in OPTIONAL_FILES and not storage.exists(INDEX, blob):
            continue  # an older version: similarity search works, text search asks for a reindex
        paths[name] = storage.local_path(INDEX, blob) or storage.download_file(
            INDEX, blob, Path(cache_dir) / version / name
        )
    index, mapped = _read_faiss(paths["index.faiss"])

    def load(name: str) -> np.ndarray | None:
        # Memory-mapped like the lists: a cold worker reads only the pages a query touches.
        return np.load(paths[name], mmap_mode="r", allow_pickle=False) if name in paths else None

    ids, clusters, labels = load("ids.npy"), load("clusters.npy"), load("labels.npy")
    assert ids is not None and clusters is not None and labels is not None  # required files
    class_top, class_prob, ingested = load("class_top.npy"), load("class_prob.npy"), load("ingested.npy")
    if ingested is not None and len(ingested) != len(ids):
        ingested = None  # written empty by a build that had no times
    vectors = load("vectors.npy") if manifest.get("kind") == "ivf_pq" else None
    if manifest.get("kind") == "ivf_pq" and vectors is None:
        raise NotReady(f"index version {version} has no re-ranking vectors", code="index_missing")
    captions = None
    if all(name in paths for name in CAPTION_FILES):
        captions = Captions(
            np.load(paths["caption_rows.npy"], allow_pickle=False),
            np.load(paths["caption_vectors.npy"], allow_pickle=False),
            np.load(paths["captions.npy"], allow_pickle=False),
        )
    head = None
    if manifest.get("space") == "head":
        blob = f"{version}/{HEAD_FILE}"
        path = storage.local_path(INDEX, blob) or storage.download_file(INDEX, blob, Path(cache_dir) / blob)
        head = ProjectionHead(path, storage.get_json(INDEX, f"{version}/head.json"), providers=providers)
    order = load("order.npy")
    loaded = ClusterIndex(
        index, ids, clusters, labels, manifest, class_top, class_prob, head, captions, ingested, vectors, order
    )
    loaded.mapped = Path(paths["index.faiss"]) if mapped else None
    return loaded


def _read_faiss(path: Path) -> tuple[Any, bool]:
    """Read an index file memory-mapped (the lists stay in the page cache, shared between workers and
    read on demand, so a cold worker answers sooner); an ordinary read where mapping is refused."""
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP), True
    except RuntimeError as exc:
        log.info("memory-mapping %s failed (%s); reading it whole", path, exc)
        return faiss.read_index(str(path)), False


def load_current(storage: Storage, cache_dir: Path) -> ClusterIndex:
    """Load the published version.

    Raises:
        NotReady: if nothing has been published yet.
    """
    version = current_version(storage)
    if version is None:
        raise NotReady(
            "no index has been built yet: run `clusterlens embed` then `clusterlens reindex`", code="index_missing"
        )
    return load_version(storage, version, cache_dir)
