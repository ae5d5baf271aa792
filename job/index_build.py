"""Building, tuning and publishing the cluster-routed index (job side; the query side is :mod:`shared.index`).

:func:`plan_index` chooses the kind (``flat``, ``ivf_flat``, ``ivf_pq``) from the collection size and a
memory budget; :func:`build_index` trains PCA, centroids (and PQ codes) and fills the lists;
:func:`extend_index` adds vectors to a published version's clusters without retraining;
:func:`tune_nprobe` is the recall gate; :func:`publish` writes a new immutable version and swaps the
pointer. Every parameter comes from one :class:`IndexParams`, built from the settings once.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from job.embeddings import TOP_CLASSES
from job.share import mirror_published, share_pruner
from shared.class_lists import write_class_lists
from shared.errors import NotReady
from shared.features import normalize, power_normalize, power_normalize_into
from shared.head import HEAD_FILE, ProjectionHead
from shared.index import (
    COLD_START_FILE,
    FILES,
    Captions,
    ClusterIndex,
    SearchHits,
    list_of_rows,
    merge_segments,
    pretransform,
    read_manifest,
    rerank_hits,
    top_k,
)
from shared.manifests import IndexManifest, RecallReport
from shared.refine import CODEC_FILE, CODES_FILE, RAW_CODEC_FILE, RAW_CODES_FILE, RefineCodec, rerank_scores
from shared.rows import compact_ids, id_order
from shared.settings import Settings
from shared.storage import INDEX, Storage
from shared.versions import claim_next, prune, swap_pointer

log = logging.getLogger(__name__)

FORMAT = 5  # bump when the files of a version change, so an up-to-date check rebuilds
KINDS = ("flat", "ivf_flat", "ivf_pq")
TRAINED_FILE = "trained.faiss"
ID_BYTES = 8  # FAISS keeps an int64 id beside each code in the inverted lists
DIRECT_MAP_BYTES = 8  # IVF-Flat's row -> (list, offset) map, for reconstructing a stored row
# Above this n * nlist (about 130,000 vectors in 400 lists) k-means trains on 64 points a list for
# 10 iterations instead of FAISS's 256 and 25: at 1M vectors in 4,000 lists that is ~1 minute on
# 2 cores instead of ~15; the recall gate measures what the index loses by it.
LARGE_TRAINING = 5e7
PCA_SAMPLE = 100_000  # rows PCA is trained on (1280-d: 512 MB); also the least a training sample holds
ADD_CHUNK = 65_536  # rows transformed and added at once
# From this many lists the centroids are linked in an HNSW graph (M links a node) that queries walk to
# find their nearest lists (see shared.index): at 4,000 lists 0.04 ms instead of 0.3 ms a query.
COARSE_GRAPH_LISTS = 1024
COARSE_GRAPH_M = 32
COARSE_ADD_EF = 16  # the graph's search breadth when rows are added: the exact list for 99.95% of rows (1M)
# With the graph (from COARSE_GRAPH_LISTS lists) k-means runs in two levels too (FAISS's hierarchical
# scheme, faiss.contrib.clustering): sqrt(nlist) clusters first, then each split into lists in proportion to
# its points. At 4,000 lists over 256k points 3 s instead of 24 s; mean cosine to the nearest centroid 0.838
# instead of 0.840, the same nprobe from the recall gate at 1M.
TWO_LEVEL_ITERATIONS = 10


@dataclass(frozen=True)
class IndexParams:
    """Everything an index build takes from the settings; defaults are the settings' defaults.

    Attributes:
        kind: ``auto`` or one of :data:`KINDS` (see :func:`plan_index`).
        memory_mb: budget for what the index holds in memory (codes and ids).
        flat_max: ``auto`` builds an exact index up to this many vectors.
        pq_m, pq_nbits, rerank: IVF-PQ code and shortlist factor (``pq_m`` 0 chooses).
        raw_rerank: with PCA, ``k`` times this many candidates are re-ranked by raw cosine (0: none).
        pca_dim: reduce to this many dimensions first; 0 (or >= d, or n too small) skips PCA.
        power: power normalisation before L2 (see :func:`shared.features.power_normalize`); 1 is off.
        nlist: number of clusters; 0 chooses from the collection size (:func:`choose_nlist`).
        nprobe: clusters searched per query; 0 picks the smallest that reaches ``recall_target``.
        recall_target, recall_sample: recall@10 to reach, measured against exact search on this many
            stored vectors (see :func:`tune_nprobe`); the result goes in the manifest.
        min_points_per_list: fewest training points per cluster when choosing ``nlist``.
        coarse_graph_lists: from this many lists, an HNSW graph over the centroids finds a query's lists.
        seed: k-means and recall-sample seed.
    """

    kind: str = "auto"
    memory_mb: float = 1024
    flat_max: int = 2000
    pq_m: int = 0
    pq_nbits: int = 4
    rerank: int = 10
    raw_rerank: int = 5
    pca_dim: int = 256
    power: float = 0.5
    nlist: int = 0
    nprobe: int = 0
    recall_target: float = 0.95
    recall_sample: int = 1000
    min_points_per_list: int = 39
    coarse_graph_lists: int = COARSE_GRAPH_LISTS
    seed: int = 1234

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexParams:
        """The parameters the settings ask for (``CLUSTERLENS_INDEX_*``)."""
        s = settings
        return cls(
            kind=s.index_kind,
            memory_mb=s.index_memory_mb,
            flat_max=s.index_flat_max,
            pq_m=s.index_pq_m,
            pq_nbits=s.index_pq_nbits,
            rerank=s.index_rerank,
            raw_rerank=s.index_raw_rerank,
            pca_dim=s.index_pca_dim,
            power=s.index_power,
            nlist=s.index_nlist,
            nprobe=s.index_nprobe,
            recall_target=s.index_recall_target,
            recall_sample=s.index_recall_sample,
            min_points_per_list=s.index_min_points_per_list,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def plan(self, n: int, input_dim: int, pca_dim: int) -> IndexPlan:
        """:func:`plan_index` for ``n`` vectors of ``input_dim`` with these parameters (``pca_dim`` as given:
        0 in a projection head's space).

        Raises:
            ValueError: as :func:`plan_index` does.
        """
        return plan_index(
            n,
            input_dim,
            kind=self.kind,
            memory_mb=self.memory_mb,
            pca_dim=pca_dim,
            nlist=self.nlist,
            pq_m=self.pq_m,
            pq_nbits=self.pq_nbits,
            rerank=self.rerank,
            raw_rerank=self.raw_rerank,
            flat_max=self.flat_max,
            min_points_per_list=self.min_points_per_list,
            coarse_graph_lists=self.coarse_graph_lists,
        )


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
        raw_rerank: with PCA, the best ``k * raw_rerank`` candidates are re-ranked by raw cosine (0: none).
        bytes_per_vector: memory the index holds per vector (code plus its id in the list).
        reason: one line on why this kind was chosen.
        coarse_graph: links a centroid has in the HNSW graph over the centroids; 0: no graph.
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
    raw_rerank: int = 0
    coarse_graph: int = 0

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
    pq_nbits: int = 4,
    rerank: int = 10,
    raw_rerank: int = 5,
    flat_max: int = 2000,
    min_points_per_list: int = 39,
    coarse_graph_lists: int = COARSE_GRAPH_LISTS,
) -> IndexPlan:
    """Choose the index kind and its parameters from the collection size and a memory budget.

    ``auto``: ``flat`` up to ``flat_max`` vectors (a full scan costs microseconds there; without PCA, so it is
    exact in the raw space); ``ivf_flat``
    while ``n`` full vectors (with their ids and direct-map entries) fit in ``memory_mb``; ``ivf_pq``
    beyond, with the largest code of at most 64 bytes that fits the budget with its id (4-bit fast-scan
    codes: up to one sub-quantiser per two dimensions; 8-bit: up to 56 bytes). Its 8-bit re-ranking codes
    (``dim`` bytes a vector, :mod:`shared.refine`) are budgeted apart, on the query side. Any parameter
    given (non-zero) is kept as is.

    Args:
        n: vectors to index; input_dim: their dimension before PCA.
        kind: ``auto`` or one of :data:`KINDS`.
        memory_mb: budget for what the index holds in memory (codes and ids, not the re-ranking file).
        pca_dim: PCA before the coarse quantiser; 0 (or >= input_dim, or n too small) for none.
        raw_rerank: with PCA, the last re-rank's factor in the raw space (kept only when PCA is used).
        coarse_graph_lists: from this many lists (not for ``flat``, which searches every list), the
            centroids are linked in an HNSW graph of :data:`COARSE_GRAPH_M` links.

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
    if kind == "flat" and use_pca:  # every vector is compared anyway: in the raw space, exact
        use_pca, dim = False, input_dim
        full = 4 * dim + ID_BYTES + DIRECT_MAP_BYTES
    nlist = min(nlist or choose_nlist(n, min_points_per_list), n)
    raw_rerank = raw_rerank if use_pca else 0
    graph = COARSE_GRAPH_M if kind != "flat" and nlist >= max(1, coarse_graph_lists) else 0
    if kind != "ivf_pq":
        return IndexPlan(
            kind,
            dim,
            dim if use_pca else 0,
            nlist,
            bytes_per_vector=full,
            reason=reason,
            raw_rerank=raw_rerank,
            coarse_graph=graph,
        )
    if not pq_m:
        most = 64.0 if pq_nbits == 4 else 56.0
        room = min(most, budget / n - ID_BYTES) * 8 / pq_nbits  # sub-quantisers the budget allows
        sizes = (128, 64, 32, 16, 8, 4, 2) if pq_nbits == 4 else (64, 56, 48, 32, 24, 16, 8, 4, 2, 1)
        fits = [m for m in sizes if dim % m == 0 and m <= min(room, dim)]
        pq_m = fits[0] if fits else min(m for m in (8, 4, 2, 1) if dim % m == 0)
    if dim % pq_m:
        raise ValueError(f"IVF-PQ needs pq_m to divide the dimension {dim}; {pq_m} does not")
    code = (pq_m * pq_nbits + 7) // 8
    return IndexPlan(
        "ivf_pq",
        dim,
        dim if use_pca else 0,
        nlist,
        pq_m,
        pq_nbits,
        max(1, rerank),
        code + ID_BYTES,
        reason,
        raw_rerank,
        graph,
    )


def new_index(plan: IndexPlan, d: int, n: int, seed: int) -> tuple[Any, str]:
    """An untrained FAISS index for ``plan`` over ``d``-dimensional input (n vectors to come), with its
    training settings; and its factory string."""
    metric = faiss.METRIC_INNER_PRODUCT
    ivf_desc = f"IVF{plan.nlist}" + (f"_HNSW{plan.coarse_graph}" if plan.coarse_graph else "")
    if plan.kind == "ivf_pq":
        # A random rotation spreads the variance (PCA puts most of it in the first dimensions)
        # evenly over the sub-quantisers: recall@10 0.89 -> 0.98 on the real 70k, same code size.
        pre = f"PCAR{plan.pca_dim},L2norm," if plan.pca_dim else f"RR{d},"
        if plan.pq_nbits == 4:
            # 4-bit codes scanned with SIMD (fast-scan); ranked by L2 on unit vectors, which orders
            # them as cosine does (FAISS 1.15's 4-bit inner-product scan stalled at ~0.77 recall@10)
            desc = f"{pre}{ivf_desc},PQ{plan.pq_m}x4fs"
            metric = faiss.METRIC_L2
        else:
            desc = f"{pre}{ivf_desc},PQ{plan.pq_m}x{plan.pq_nbits}"
    else:
        desc = (f"PCA{plan.pca_dim},L2norm," if plan.pca_dim else "") + f"{ivf_desc},Flat"
    index = faiss.index_factory(d, desc, metric)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.spherical = True
    ivf.cp.seed = seed
    ivf.cp.min_points_per_centroid = 1  # small collections: accept few points per cluster
    if n * plan.nlist > LARGE_TRAINING:  # k-means on a sample: its cost grows with n * nlist
        ivf.cp.max_points_per_centroid, ivf.cp.niter = 64, 10
    if plan.coarse_graph:  # the centroids (two-level k-means: train_lists) are linked in the graph
        graph: Any = faiss.downcast_index(ivf.quantizer)
        graph.hnsw.efConstruction, graph.hnsw.efSearch = 200, COARSE_ADD_EF
    if plan.kind == "ivf_pq":
        ivfpq: Any = faiss.downcast_index(ivf)
        ivfpq.pq.cp.min_points_per_centroid = 1  # the recall gate judges the codes
        if plan.pq_nbits != 4:
            # index_factory turns on polysemous training (code reordering for Hamming filtering, which
            # is not used here); it took 49 s of a 1,000-vector build and half of a 1M one.
            ivfpq.do_polysemous_training = False
    return index, desc


def label_codes_of(labels: list[str | None]) -> tuple[list[str], np.ndarray]:
    """The sorted label names and int32 (n,) each row's code into them (-1: none)."""
    names = sorted({lab for lab in labels if lab is not None})
    code = {name: i for i, name in enumerate(names)}
    return names, np.array([code[lab] if lab is not None else -1 for lab in labels], dtype=np.int32)


def new_manifest(
    plan: IndexPlan,
    desc: str,
    ivf: Any,
    *,
    encoder_version: str,
    head: ProjectionHead | None,
    n: int,
    input_dim: int,
    power: float,
    label_names: list[str],
    captions: Captions | None,
    clusters: np.ndarray,
    train_seconds: float,
    train_points: int,
    started: float,
    source: dict[str, Any] | None,
) -> IndexManifest:
    """The manifest of a freshly trained and filled index (the recall gate's fields are set after it)."""
    return IndexManifest(
        format=FORMAT,
        encoder_version=encoder_version,
        space="head" if head is not None else "backbone",
        head=_head_summary(head),
        factory=desc,
        kind=plan.kind,
        plan=plan.to_json(),
        rerank=plan.rerank,
        raw_rerank=plan.raw_rerank,
        bytes_per_vector=plan.bytes_per_vector,
        count=n,
        input_dim=input_dim,
        dim=int(ivf.d),
        pca_dim=plan.pca_dim,
        nlist=plan.nlist,
        metric="cosine",
        power=power,
        label_names=label_names,
        captions=len(captions.rows) if captions else 0,
        cluster_sizes=_sizes(np.bincount(clusters, minlength=plan.nlist)),
        trained_count=n,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        train_seconds=round(train_seconds, 3),
        train={"points": train_points, "iterations": int(ivf.cp.niter)}
        | ({"levels": 2, "iterations": TWO_LEVEL_ITERATIONS} if plan.coarse_graph else {}),
        build_seconds=round(time.perf_counter() - started, 3),
        source=source or {},
    )


def build_index(
    vectors: np.ndarray,
    ids: list[str],
    labels: list[str | None],
    *,
    encoder_version: str,
    params: IndexParams | None = None,
    class_top: np.ndarray | None = None,
    class_prob: np.ndarray | None = None,
    head: ProjectionHead | None = None,
    captions: Captions | None = None,
    ingested: np.ndarray | None = None,
    source: dict[str, Any] | None = None,
) -> ClusterIndex:
    """Train and fill an index.

    Args:
        vectors: float32 (n, d) raw embeddings (normalised here).
        ids: n image ids; labels: n label names or None.
        params: kind, PCA, lists, code, recall gate (see :class:`IndexParams`; default: its defaults).
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
    p = params or IndexParams()
    power, pca_dim, seed = p.power, p.pca_dim, p.seed
    t0 = time.perf_counter()
    if head is not None:
        power, pca_dim = 1.0, 0

    def features(raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.float32)
        return head.apply(raw).embedding if head is not None else power_normalize(raw, power)

    # Trained on a seeded sample (every row up to PCA_SAMPLE), then filled chunk by chunk: the
    # transformed vectors are never all in memory at once (``vectors`` may be a memory map).
    sample = training_rows(n, choose_nlist(n, p.min_points_per_list) if not p.nlist else p.nlist, seed)

    def features_of(rows: np.ndarray) -> np.ndarray:
        """Features of these rows: their copy (fancy indexing copies) transformed in place when it can be."""
        got = vectors[rows]
        if head is None and got.dtype == np.float32 and got.flags.c_contiguous:
            return power_normalize_into(got, got, power)
        return features(got)

    x = features_of(sample) if len(sample) < n else features(vectors)
    plan = p.plan(n, x.shape[1], pca_dim)
    nlist = plan.nlist
    index, desc = new_index(plan, x.shape[1], n, seed)
    ivf = faiss.extract_index_ivf(index)
    raw_codec = RefineCodec.train(x) if plan.raw_rerank else None
    if isinstance(index, faiss.IndexPreTransform):  # the chain (PCA, rotation) on at most PCA_SAMPLE rows
        chain: Any = index.chain
        pca_rows = x if len(x) <= PCA_SAMPLE else x[np.random.default_rng(seed).choice(len(x), PCA_SAMPLE, False)]
        for i in range(chain.size()):
            chain.at(i).train(pca_rows)
            pca_rows = chain.at(i).apply(pca_rows)
        del pca_rows
    xt = pretransform(index, x)
    del x
    train_lists(ivf, xt, plan, seed)
    index.is_trained = True
    trained = faiss.serialize_index(index)  # no rows yet: what an incremental reindex adds to
    codec = RefineCodec.train(xt) if plan.kind == "ivf_pq" else None
    del xt
    t_train = time.perf_counter() - t0
    k = min(10, n - 1)
    gate_rows = recall_rows(n, p.recall_sample, seed) if k >= 1 else np.zeros(0, np.int64)
    gate_x = features_of(gate_rows) if len(gate_rows) else None
    queries = pretransform(index, gate_x) if gate_x is not None else None
    # the gate's exact neighbours: in the raw space when the index re-ranks there, else in the index's
    raw_queries = gate_x if raw_codec is not None else None
    truth = faiss.ResultHeap(len(gate_rows), k + 1, keep_max=True) if queries is not None else None
    codes = np.empty((n, int(ivf.d)), np.uint8) if codec is not None else None
    raw_codes = np.empty((n, d), np.uint8) if raw_codec is not None else None
    buffer = np.empty((min(n, ADD_CHUNK), d), np.float32) if head is None else None
    for start in range(0, n, ADD_CHUNK):
        chunk = vectors[start : start + ADD_CHUNK]
        xf = features(chunk) if buffer is None else power_normalize_into(buffer[: len(chunk)], chunk, power)
        xt = pretransform(index, xf)
        add_transformed(index, xt)
        if codes is not None and codec is not None:
            codes[start : start + len(xt)] = codec.encode(xt)
        if raw_codes is not None and raw_codec is not None:
            raw_codes[start : start + len(xf)] = raw_codec.encode(xf)
        if truth is not None and queries is not None:
            q, xb = (raw_queries, xf) if raw_queries is not None else (queries, xt)
            scores, found = faiss.knn(q, xb, min(k + 1, len(xt)), metric=faiss.METRIC_INNER_PRODUCT)
            truth.add_result(scores, found + start)
    if truth is not None:
        truth.finalize()
    if plan.kind != "ivf_pq":  # IVF-PQ re-ranks from its codes instead
        ivf.make_direct_map()
    clusters = list_of_rows(ivf)
    names, label_codes = label_codes_of(labels)
    manifest = new_manifest(
        plan,
        desc,
        ivf,
        encoder_version=encoder_version,
        head=head,
        n=n,
        input_dim=d,
        power=power,
        label_names=names,
        captions=captions,
        clusters=clusters,
        train_seconds=t_train,
        train_points=min(len(sample), int(ivf.cp.max_points_per_centroid) * nlist),
        started=t0,
        source=source,
    )
    if class_top is None or class_prob is None:
        class_top, class_prob = np.zeros((n, 0), np.int16), np.zeros((n, 0), np.float32)
    if class_top.shape != class_prob.shape or len(class_top) != n:
        raise ValueError("class_top and class_prob must be (n, t) arrays of the same shape")
    built = ClusterIndex(
        index,
        np.asarray(ids),
        clusters,
        label_codes,
        manifest,
        class_top.astype(np.int16),
        class_prob.astype(np.float32),
        head,
        captions,
        None if ingested is None else np.asarray(ingested, dtype=np.int64),
        codes,
        codec=codec,
        raw=raw_codes,
        raw_codec=raw_codec,
    )
    built.trained = bytes(trained)
    built.cold_start = cold_start_rows(np.arange(n), lambda rows: pretransform(index, features_of(rows)), seed)
    t1 = time.perf_counter()
    nprobe = nlist if plan.kind == "flat" else p.nprobe  # flat: every list, exact
    exact = truth.I if truth is not None else np.zeros((0, k + 1), np.int64)
    recall = tune_against(
        built,
        gate_rows,
        queries if queries is not None else np.zeros((0, int(ivf.d)), np.float32),
        exact,
        n,
        target=p.recall_target,
        nprobe=nprobe,
        raw_queries=raw_queries,
    )
    recall.seconds = round(time.perf_counter() - t1, 3)
    settle(manifest, built, recall)
    manifest.build_seconds = round(time.perf_counter() - t0, 3)
    return built


COLD_SAMPLE = 20_000  # rows the cold start is chosen among
COLD_START = 500  # rows it offers, at most: one per cluster of the sample


def cold_start_rows(rows: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray], seed: int) -> np.ndarray:
    """The rows a labelling loop should ask about first, before any classifier: the most typical image of
    each of up to :data:`COLD_START` k-means clusters of a seeded sample of at most :data:`COLD_SAMPLE` of
    ``rows`` (in the index's space: ``vectors_of(positions into rows)``), most typical first
    (:func:`job.active_learning.typical_first`). Empty for fewer than 20 rows (the label queue's
    round-robin over the index's clusters does then)."""
    from job.active_learning import typical_first

    if len(rows) < 20:
        return np.zeros(0, np.int64)
    at = np.sort(np.random.default_rng(seed).choice(len(rows), min(len(rows), COLD_SAMPLE), replace=False))
    picked = typical_first(vectors_of(at), min(COLD_START, len(at) // 4), seed=seed)
    return np.asarray(rows)[at[picked]].astype(np.int64)


def train_lists(ivf: Any, xt: np.ndarray, plan: IndexPlan, seed: int) -> None:
    """Train an IVF index's lists (and codes) on ``xt`` (its space): for a plan with the coarse graph the
    centroids come from :func:`two_level_centroids` and are added to the quantiser first (FAISS then skips
    its own k-means; the graph links them), else FAISS's k-means as set up by :func:`new_index`."""
    nlist = int(ivf.nlist)
    if plan.coarse_graph and len(xt) > nlist and ivf.quantizer.ntotal == 0:
        ivf.quantizer.add(two_level_centroids(xt, nlist, seed))
    ivf.train(xt)


def two_level_centroids(xt: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """float32 (nlist, d) unit centroids of ``xt`` (m > nlist unit rows) by two-level spherical k-means: round(
    sqrt(nlist)) clusters, then each cluster's points into as many lists as its share of the points (at
    least one a non-empty cluster, never more than its points)."""
    m, d = xt.shape
    top = max(2, round(np.sqrt(nlist)))
    first = faiss.Kmeans(
        d,
        top,
        niter=TWO_LEVEL_ITERATIONS,
        spherical=True,
        seed=seed,
        max_points_per_centroid=2000,
        min_points_per_centroid=1,
    )
    first.train(xt)
    assign = first.index.search(xt, 1)[1][:, 0]
    sizes = np.bincount(assign, minlength=top)
    share = np.minimum(sizes, sizes * nlist // m)
    while (gap := nlist - int(share.sum())) > 0:  # the rest to the clusters with most points a list, room left
        per_list = np.where(share < sizes, sizes / (share + 1), 0.0)
        pick = np.argsort(-per_list, kind="stable")[:gap]
        share[pick[per_list[pick] > 0]] += 1
    parts = []
    for c in np.flatnonzero(share):
        points = np.ascontiguousarray(xt[assign == c])
        lists = int(share[c])
        if lists >= len(points):
            parts.append(points[:lists])
            continue
        second = faiss.Kmeans(
            d,
            lists,
            niter=2 * TWO_LEVEL_ITERATIONS,
            spherical=True,
            seed=seed + int(c) + 1,
            min_points_per_centroid=1,
        )
        second.train(points)
        assert second.centroids is not None  # set by train
        parts.append(second.centroids)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def add_transformed(index: Any, xt: np.ndarray) -> None:
    """Add vectors already in the index's space (transformed once, for the lists, the re-ranking codes and
    the gate alike) to its lists."""
    if isinstance(index, faiss.IndexPreTransform):
        ivf = faiss.extract_index_ivf(index)
        ivf.add(xt)
        index.ntotal = ivf.ntotal
    else:
        index.add(xt)


def training_points(n: int, nlist: int) -> int:
    """Points k-means trains on for ``n`` vectors in ``nlist`` lists, as :func:`new_index` sets FAISS up."""
    return min(n, (64 if n * nlist > LARGE_TRAINING else 256) * nlist)


def training_rows(n: int, nlist: int, seed: int) -> np.ndarray:
    """int64 the rows (ascending) an index of ``n`` vectors trains on: every row up to ``PCA_SAMPLE`` (and
    as many as k-means takes), else a seeded sample of that many."""
    want = max(training_points(n, nlist), min(PCA_SAMPLE, n))
    if want >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=want, replace=False)).astype(np.int64)


def extend_index(
    base: ClusterIndex,
    vectors: np.ndarray,
    ids: list[str],
    labels: list[str | None],
    *,
    params: IndexParams | None = None,
    class_top: np.ndarray | None = None,
    class_prob: np.ndarray | None = None,
    captions: Captions | None = None,
    ingested: np.ndarray | None = None,
    source: dict[str, Any] | None = None,
) -> ClusterIndex:
    """A new index: ``base`` plus more vectors, added to the existing clusters without retraining.

    The PCA, centroids and head stay as trained; recall is measured again over all vectors and
    nprobe re-chosen. ``base`` is not changed (a published version never is).

    Args:
        base: the index to grow (a loaded, published version).
        vectors: float32 (m, input_dim) raw embeddings of images not in this index.
        ids, labels, class_top, class_prob, ingested: as for :func:`build_index`, for the new rows.
        params: the recall gate's settings (``nprobe``, ``recall_target``, ``recall_sample``, ``seed``).
        captions: the new rows' captions, rows counted from 0 within ``vectors``.

    Raises:
        ValueError: on mismatched lengths, an id already indexed, or a different dimension.
    """
    m = len(ids)
    if vectors.ndim != 2 or len(vectors) != m or len(labels) != m or vectors.shape[1] != base.manifest.input_dim:
        raise ValueError(f"vectors {vectors.shape}, {m} ids and {len(labels)} labels do not fit this index")
    if any(base.row_of(i) is not None for i in ids):
        raise ValueError("some ids are already in the index")
    p = params or IndexParams()
    t0 = time.perf_counter()
    n = base.count
    x = base.head.apply(vectors).embedding if base.head else power_normalize(vectors, base.manifest.power)
    index = base.lists_copy()  # every segment's rows in one set of lists, read whole (never the published file)
    index.add(x)
    ivf = faiss.extract_index_ivf(index)
    if base.vectors is None:
        ivf.make_direct_map()
    xt_new = pretransform(index, x)
    assign = list_of_rows(ivf)[n:]
    codec = base.codec
    names = sorted(set(base.label_names) | {lab for lab in labels if lab is not None})
    code = {name: i for i, name in enumerate(names)}
    old = np.array([code[name] for name in base.label_names] + [-1], dtype=np.int32)[np.asarray(base.labels)]
    new = np.array([code[lab] if lab is not None else -1 for lab in labels], dtype=np.int32)
    clusters = np.concatenate([np.asarray(base.clusters), assign])
    t = base.class_top.shape[1]
    if class_top is None or class_prob is None or class_top.shape[1] != t:
        class_top, class_prob = np.zeros((m, t), np.int16), np.zeros((m, t), np.float32)
    if captions is not None and len(captions.rows):
        captions = Captions(
            np.concatenate([base.captions.rows, captions.rows + n]),
            np.concatenate([base.captions.vectors, captions.vectors.astype(np.float16)]),
            np.concatenate([base.captions.text, captions.text]),
        )
    else:
        captions = base.captions
    times = None
    if base.ingested is not None and ingested is not None:
        times = np.concatenate([np.asarray(base.ingested), np.asarray(ingested, dtype=np.int64)])
    manifest = base.manifest.model_copy(
        deep=True,
        update=dict(
            version=None,
            recall=None,
            nprobe=0,
            published=None,
            count=n + m,
            label_names=names,
            captions=len(captions.rows),
            cluster_sizes=_sizes(np.bincount(clusters, minlength=int(ivf.nlist))),
            trained_count=base.manifest.trained_count or n,
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=source or {},
            incremental={"from": base.manifest.version, "added": m},
        ),
    )
    trained = faiss.deserialize_index(faiss.serialize_index(index))
    trained.reset()  # lists emptied: the next incremental reindex adds its delta to this
    grown = ClusterIndex(
        index,
        np.concatenate([np.asarray(base.ids), np.array(ids, dtype="U64")]),
        clusters,
        np.concatenate([old, new]),  # old codes remapped to the merged names; -1 stays -1
        manifest,
        np.concatenate([np.asarray(base.class_top), class_top.astype(np.int16)]),
        np.concatenate([np.asarray(base.class_prob), class_prob.astype(np.float32)]),
        base.head,
        captions,
        times,
        None
        if base.vectors is None or codec is None
        else np.concatenate([np.asarray(base.vectors), codec.encode(xt_new)]),
        codec=codec,
        raw=None
        if base.raw is None or base.raw_codec is None
        else np.concatenate([np.asarray(base.raw), base.raw_codec.encode(x)]),
        raw_codec=base.raw_codec,
    )
    grown.trained = bytes(faiss.serialize_index(trained))
    grown.cold_start = base.cold_start  # the base's rows keep their numbers
    xt = grown.all_vectors()
    nprobe = int(ivf.nlist) if base.manifest.kind == "flat" else p.nprobe
    recall = tune_nprobe(grown, xt, target=p.recall_target, sample=p.recall_sample, nprobe=nprobe, seed=p.seed)
    settle(manifest, grown, recall)
    manifest.build_seconds = round(time.perf_counter() - t0, 3)
    return grown


def build_delta(
    trained: bytes,
    manifest: IndexManifest,
    vectors: np.ndarray,
    ids: list[str],
    labels: list[str | None],
    *,
    head: ProjectionHead | None = None,
    class_top: np.ndarray | None = None,
    class_prob: np.ndarray | None = None,
    captions: Captions | None = None,
    ingested: np.ndarray | None = None,
    codec: RefineCodec | None = None,
    raw_codec: RefineCodec | None = None,
) -> ClusterIndex:
    """A delta segment: new rows added to a copy of the base's trained index (``trained.faiss``), alone.

    Costs what the new rows cost: the base's lists are never read. The result holds only the new rows
    (rows counted from 0); ``manifest`` is the version it will belong to (see :func:`grow_version`).

    Args:
        trained: the base's index before any row was added (PCA, centroids, codebook).
        manifest: the current version's manifest (its power, kind and dimension are used).
        vectors: float32 (m, input_dim) raw embeddings; the rest as for :func:`build_index`.
        codec: IVF-PQ: the base's re-ranking codec (``refine_codec.npy``), which the new rows are coded with.
        raw_codec: the base's raw codec (``raw_codec.npy``), for a base with raw codes.

    Raises:
        ValueError: on mismatched lengths, or an IVF-PQ delta without the base's codec.
    """
    m = len(ids)
    if vectors.ndim != 2 or len(vectors) != m or len(labels) != m or (m and vectors.shape[1] != manifest.input_dim):
        raise ValueError(f"vectors {vectors.shape}, {m} ids and {len(labels)} labels do not fit this index")
    if manifest.kind == "ivf_pq" and codec is None:
        raise ValueError("an IVF-PQ delta needs the base's re-ranking codec")
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    ivf = faiss.extract_index_ivf(index)
    x = np.zeros((0, int(index.d)), np.float32)
    if m:
        x = head.apply(vectors).embedding if head is not None else power_normalize(vectors, manifest.power)
        index.add(x)
    if manifest.kind != "ivf_pq":
        ivf.make_direct_map()  # a stored row's vector is read back from the lists (search by id)
    names, codes = label_codes_of(labels)
    if class_top is None or class_prob is None:  # as wide as the shards' (a narrower part drops them on load)
        class_top, class_prob = np.zeros((m, TOP_CLASSES), np.int16), np.zeros((m, TOP_CLASSES), np.float32)
    seg_manifest = manifest.model_copy(update={"label_names": names})
    delta = ClusterIndex(
        index,
        np.array(ids, dtype="U64"),
        list_of_rows(ivf),
        codes,
        seg_manifest,
        class_top.astype(np.int16),
        class_prob.astype(np.float32),
        head,
        captions,
        None if ingested is None else np.asarray(ingested, dtype=np.int64),
        codec.encode(pretransform(index, x)) if codec is not None and manifest.kind == "ivf_pq" else None,
        codec=codec if manifest.kind == "ivf_pq" else None,
        raw=raw_codec.encode(x) if raw_codec is not None and manifest.raw_rerank else None,
        raw_codec=raw_codec if manifest.raw_rerank else None,
    )
    return delta


def grow_version(
    current: IndexManifest, parts: list[ClusterIndex], keep: list[dict[str, Any]], source: dict[str, Any], added: int
) -> ClusterIndex:
    """The segment a new version writes (``parts`` merged: a new delta, and the older deltas it absorbs)
    with the version's manifest: ``keep`` (the segments it still refers to) plus this one.

    The recall gate is not run again (it needs every vector): the base's measurement and nprobe stand
    until the next full build, which comes after ``index_retrain_fraction`` of growth.
    """
    names = sorted(set(current.label_names).union(*(p.label_names for p in parts)))
    rows = sum(len(p.ids) for p in parts)
    seg_manifest = current.model_copy(update={"label_names": sorted(set().union(*(p.label_names for p in parts)))})
    segment = merge_segments(parts, seg_manifest) if len(parts) > 1 else parts[0]
    segment.duplicates = np.zeros(0, np.int64)  # kept as written: the query side hides repeats across segments
    clusters = np.bincount(segment.clusters, minlength=current.nlist)
    manifest = current.model_copy(
        deep=True,
        update=dict(
            version=None,
            published=None,
            count=sum(int(seg["rows"]) for seg in keep) + rows,
            label_names=names,
            captions=current.captions + len(parts[-1].captions.rows),
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=source,
            segments=[*keep, {"version": None, "rows": rows, "label_names": seg_manifest.label_names}],
            incremental={
                "from": current.version,
                "added": added,
                "segment_rows": rows,
                "merged_segments": len(parts) - 1,
                "recall": "measured when the base was built",
                "largest_list_in_segment": int(clusters.max()) if len(clusters) else 0,
            },
        ),
    )
    segment.manifest = manifest
    segment.trained = None
    return segment


def tune_nprobe(
    index: ClusterIndex, xt: np.ndarray, *, target: float = 0.95, sample: int = 1000, nprobe: int = 0, seed: int = 1234
) -> RecallReport:
    """Measure recall@10 against exact search and set the smallest ``nprobe`` that reaches ``target``.

    Leave-one-out on ``sample`` stored vectors: each is a query against all the others, and its
    true 10 neighbours come from exact (flat) search over the same vectors the index holds, so
    this measures what cluster routing (and PQ) loses; for an index with raw codes, over the decoded
    raw vectors, so PCA's loss is counted too.
    nprobe is doubled from 1 until the target is reached (up to ``nlist``, which is exact), then the
    smallest nprobe that reaches it is found by bisection; or only ``nprobe`` is tried, if given. A
    setting reaches the target when its sample's mean recall less one standard error does (about 0.003
    at 1,000 queries), so the figure holds for queries the gate never saw, not only for its sample.

    The shortlists (IVF-PQ's and the raw re-rank's) are tuned with nprobe, and the cheapest setting that
    reaches the target is kept: see :func:`tune_against`.

    Args:
        index: the index to tune (its ``nprobe`` and re-rank factor are set).
        xt: float32 (n, dim) every indexed vector, already transformed (row i is row i of the index).

    Returns:
        the target, ``at_10``, the sample size and the curve (``{"nprobe", "recall_at_10", "stderr",
        "cost_us"}`` per setting tried; entries also carry the shortlist factor tuned, ``rerank`` or
        ``raw_rerank``); ``at_10`` is the mean recall at the chosen setting, ``meets_target`` whether its
        mean less one standard error reaches ``target``.
    """
    n = len(xt)
    k = min(10, n - 1)
    if k < 1:
        return tune_against(index, np.zeros(0, np.int64), xt[:0], np.zeros((0, 1), np.int64), n, target=target)
    rows = recall_rows(n, sample, seed)
    queries = np.ascontiguousarray(xt[rows])
    if index.raw is None or index.raw_codec is None:
        _, exact = faiss.knn(queries, xt, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        return tune_against(index, rows, queries, exact, n, target=target, nprobe=nprobe)
    # an index with raw codes: exact neighbours among the decoded raw vectors, chunk by chunk
    codec = index.raw_codec
    raw = normalize(codec.decode(np.asarray(index.raw[rows])))
    heap = faiss.ResultHeap(len(rows), k + 1, keep_max=True)
    for start in range(0, n, ADD_CHUNK):
        chunk = normalize(codec.decode(np.asarray(index.raw[np.arange(start, min(n, start + ADD_CHUNK))])))
        scores, found = faiss.knn(raw, chunk, min(k + 1, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, found + start)
    heap.finalize()
    return tune_against(index, rows, queries, heap.I, n, target=target, nprobe=nprobe, raw_queries=raw)


def recall_rows(n: int, sample: int, seed: int) -> np.ndarray:
    """int64 the rows (ascending) of ``n`` that the recall gate queries with: ``sample`` of them, seeded."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))


# The gate's cost model of one query (microseconds per row), to choose between settings that all reach
# the target: measured on this VM (2 cores, AVX-512) at 1M rows, 256-d lists, 1280-d raw codes. Scanning
# a list row: 4-bit fast-scan PQ ~0.08 ns a dimension, a float row ~0.45 ns; re-ranking a shortlist row
# from mapped 8-bit codes ~1.4 ns a dimension; a raw row is one ``pread`` (~3 us) plus its scoring.
SCAN_US_PER_DIM = {"ivf_pq": 0.08e-3, "ivf_flat": 0.45e-3}
REFINE_US_PER_DIM = 1.4e-3
RAW_US = 3.0
RAW_US_PER_DIM = 0.8e-3


def tune_against(
    index: ClusterIndex,
    rows: np.ndarray,
    queries: np.ndarray,
    exact: np.ndarray,
    n: int,
    *,
    target: float = 0.95,
    nprobe: int = 0,
    raw_queries: np.ndarray | None = None,
) -> RecallReport:
    """:func:`tune_nprobe` once the exact neighbours are known, however they were found.

    The smallest nprobe at which the widest setting of :func:`gate_grid` reaches the target is found by
    doubling then bisection (measuring that setting alone); there and at nprobe up to half as much again
    every setting is measured, as prefixes of one scan (a narrower shortlist may need a few more lists and
    still cost less: scanning a list is cheap, reading a raw row is not); of every setting that reaches
    the target, the one the cost model (:func:`query_cost`: rows scanned, re-ranked and read) finds
    cheapest is kept.

    Args:
        rows: int64 (q,) the query rows; queries: float32 (q, dim) their vectors in the index's space.
        exact: int64 (q, k + 1) each query's exact nearest rows among all ``n``, best first (its own row
            among them), k = min(10, n - 1).
        raw_queries: float32 (q, input_dim) the same queries in the raw space, for an index with raw codes
            (``exact`` then holds the raw space's neighbours).
    """
    nlist = int(index.ivf.nlist)
    k = min(10, n - 1)
    if k < 1 or not len(rows):
        index.ivf.nprobe = 1
        return RecallReport(target=target, at_10=1.0, meets_target=True, sample=0, curve=[])
    truth = [set(r[r != row][:k]) for r, row in zip(exact, rows, strict=True)]
    raw = raw_queries if index.raw_rerank else None
    grid = gate_grid(index, raw is not None)
    sizes = list_sizes(index)

    def recall_of(got: np.ndarray) -> tuple[float, float]:
        """Mean recall@10 over the sample's queries, and its standard error."""
        found = [set(g[(g != row) & (g >= 0)][:k]) for g, row in zip(got, rows, strict=True)]
        per_query = np.array([len(f & t) / k for f, t in zip(found, truth, strict=True)])
        return float(per_query.mean()), float(per_query.std() / np.sqrt(len(per_query)))

    def sure(e: dict[str, Any]) -> float:
        """What the sample shows with some confidence: its mean less one standard error. Judged on the mean
        alone, a setting that just reaches the target falls short on fresh queries about half the time."""
        return float(e["recall"] - e["stderr"])

    measured: dict[int, list[dict[str, Any]]] = {}  # nprobe -> one entry per shortlist setting measured
    widest = [max(grid)]  # the longest shortlists: they reach the target wherever any setting does

    def reaches(p: int, full: bool = False) -> bool:
        """Measure at ``p`` lists (once; every setting when ``full``, else the widest alone, all that the
        search for the smallest nprobe needs) and say whether its best setting reaches the target."""
        if p not in measured or (full and len(measured[p]) < len(grid)):
            measured[p] = _measure(index, queries, raw, p, k, n, grid if full else widest, recall_of, sizes)
        return max(sure(e) for e in measured[p]) >= target

    if nprobe:
        chosen = min(nprobe, nlist)
        reaches(chosen, full=True)
    else:
        # Doubling brackets the smallest nprobe that reaches the target, then bisection finds it, so the
        # gate stops at e.g. 22 rather than 32: recall is close to monotone in nprobe.
        low, p = 0, 1
        while not reaches(p) and p < nlist:
            low, p = p, min(2 * p, nlist)
        high = p
        while high - low > 1 and reaches(high):
            mid = (low + high) // 2
            if reaches(mid):
                high = mid
            else:
                low = mid
        chosen = high
        if len(grid) > 1 and reaches(chosen, full=True):
            step = max(1, chosen // 8)
            for p in range(chosen + step, min(nlist, chosen + chosen // 2) + 1, step):
                reaches(p, full=True)
    good = [e for p_ in sorted(measured) for e in measured[p_] if sure(e) >= target]
    pick = min(good, key=lambda e: e["cost_us"]) if good else max(measured[chosen], key=sure)
    index.ivf.nprobe = int(pick["nprobe"])
    if index.vectors is not None and "rerank" in pick:
        index.rerank = int(pick["rerank"])
    if raw is not None:
        index.raw_rerank = int(pick["raw_rerank"])
    curve = [
        {
            **{key: v for key, v in e.items() if key not in ("recall", "stderr")},
            "recall_at_10": round(e["recall"], 4),
            "stderr": round(e["stderr"], 4),
        }
        for p_ in sorted(measured)
        for e in measured[p_]
    ]
    return RecallReport(
        target=target,
        at_10=round(pick["recall"], 4),
        meets_target=sure(pick) >= target,
        sample=len(rows),
        curve=curve,
        nprobe=index.nprobe,
        rerank=index.rerank if index.vectors is not None else None,
        raw_rerank=index.raw_rerank if raw is not None else None,
        space="raw" if raw is not None else "index",
    )


def gate_grid(index: ClusterIndex, raw: bool) -> list[tuple[int, int]]:
    """The (shortlist factor, raw factor) settings the gate measures at each nprobe: IVF-PQ's shortlist at
    1, 2 and 4 times the plan's, each with the raw re-rank at three fifths of, four fifths of and the
    plan's factor; without PCA codes of its own (IVF-Flat), the raw factor at those and 2 and 4 times
    the plan's; (0, 0) for an index with neither."""
    plan = index.manifest.plan
    raw_base = int(plan.get("raw_rerank", index.raw_rerank)) if raw else 0
    narrow = [max(1, -(-f * raw_base // 5)) for f in (3, 4, 5)]  # ceil(0.6, 0.8 and 1 x base)
    if index.vectors is not None and index.rerank:
        base = int(plan.get("rerank", index.rerank))
        raws = list(dict.fromkeys(narrow)) if raw_base else [0]
        return [(s, r) for s in (base, 2 * base, 4 * base) for r in raws]
    if raw_base:
        return [(0, r) for r in dict.fromkeys([*narrow, 2 * raw_base, 4 * raw_base])]
    return [(0, 0)]


def list_sizes(index: ClusterIndex) -> np.ndarray:
    """int64 (nlist,) rows in each list, over every segment."""
    return np.bincount(np.asarray(index.clusters), minlength=int(index.ivf.nlist)).astype(np.int64)


def query_cost(index: ClusterIndex, scanned: float, shortlist: int, raw_width: int) -> float:
    """Estimated microseconds of one query that scans ``scanned`` list rows, re-ranks ``shortlist`` rows
    with IVF-PQ's codes and ``raw_width`` rows with raw codes (constants above)."""
    dim = int(index.ivf.d)
    scan = SCAN_US_PER_DIM["ivf_pq" if index.vectors is not None else "ivf_flat"] * dim
    raw = RAW_US + RAW_US_PER_DIM * int(index.manifest.input_dim)
    return scanned * scan + shortlist * REFINE_US_PER_DIM * dim + raw_width * raw


def settle(manifest: IndexManifest, index: ClusterIndex, recall: RecallReport) -> None:
    """Record what the recall gate chose (and measured) in ``manifest``."""
    manifest.nprobe, manifest.rerank, manifest.raw_rerank = index.nprobe, index.rerank, index.raw_rerank
    manifest.recall = recall


def _measure(
    index: ClusterIndex,
    queries: np.ndarray,
    raw: np.ndarray | None,
    p: int,
    k: int,
    n: int,
    grid: list[tuple[int, int]],
    recall_of: Callable[[np.ndarray], tuple[float, float]],
    sizes: np.ndarray,
) -> list[dict[str, Any]]:
    """The gate's measurements at ``p`` lists: one per shortlist setting of ``grid``, or one (``grid == [(0,
    0)]``); each with its estimated cost (:func:`query_cost`). What a search returns for each setting, with the
    work shared: one scan of the longest shortlist; per IVF-PQ shortlist one re-rank by its codes (sorted, so
    each raw width is a prefix of it) and one raw scoring of the widest raw width, whose prefixes give the
    narrower ones (a stable sort of a prefix's scores is what :meth:`ClusterIndex.finish` does)."""
    probe_scores, probe = index.coarse(queries, p)
    scanned = float(sizes[probe].sum(1).mean())

    def entry(s: int, r: int, got: np.ndarray) -> dict[str, Any]:
        mean, se = recall_of(got)
        cost = query_cost(index, scanned, k * s, k * r)
        out: dict[str, Any] = {"nprobe": p, **({"rerank": s} if s else {}), **({"raw_rerank": r} if r else {})}
        return out | {"recall": mean, "stderr": se, "cost_us": round(cost, 1)}

    if grid == [(0, 0)]:
        got = index.search_probed(queries, k + 1, probe, probe_scores, None, raw).rows
        return [entry(0, 0, got)]
    k1 = k + 1
    longest = index.scan(queries, min(k1 * max((s or r) for s, r in grid), n), probe, probe_scores)
    found: dict[tuple[int, int], np.ndarray] = {}
    for s in dict.fromkeys(s for s, _ in grid):
        raws = [r for s_, r in grid if s_ == s]
        keep = k1 * max(max(raws), 1)
        if s:  # IVF-PQ: the shortlist of k1 * s, re-ranked by its codes, best ``keep`` first
            assert index.codec is not None
            width = min(k1 * s, n)
            prefix = SearchHits(longest.scores[:, :width], longest.rows[:, :width], longest.probe, longest.probe_scores)
            stage = rerank_hits(index.codec, index.vectors, queries, prefix, min(keep, width))
        else:  # IVF-Flat: the scan's own order (exact in the index's space)
            stage = top_k(longest, min(keep, longest.rows.shape[1]))
        if max(raws) == 0:
            found[s, 0] = top_k(stage, k1).rows
            continue
        assert index.raw_codec is not None and raw is not None
        raw_scores = rerank_scores(index.raw_codec, index.raw, stage.rows, raw, unit=True)
        for r in raws:
            w = min(k1 * r, stage.rows.shape[1])
            part = SearchHits(raw_scores[:, :w], stage.rows[:, :w], stage.probe, stage.probe_scores)
            found[s, r] = top_k(part, k1, sort=True).rows
    return [entry(s, r, found[s, r]) for s, r in grid]


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
        "sha256": m.sha256,
        "val_accuracy": m.train.get("val_accuracy"),
        "val_knn10_accuracy": m.train.get("val_knn10_accuracy"),
    }


# -- publishing ----------------------------------------------------------------------------------


def fingerprint(encoder_version: str, shards: list[str], params: dict[str, Any]) -> str:
    """Identifies the inputs of a build: same fingerprint, same index."""
    text = "\n".join([f"format {FORMAT}", encoder_version, repr(sorted(params.items())), *sorted(shards)])
    return hashlib.sha256(text.encode()).hexdigest()


def _referenced(storage: Storage, kept: list[str]) -> set[str]:
    """The folders the ``kept`` versions are made of (their segments): pruning must leave them."""
    out: set[str] = set()
    for version in kept:
        try:
            out.update(seg["version"] for seg in read_manifest(storage, version).segments)
        except NotReady:
            continue
    return out


def publish(
    storage: Storage,
    built: ClusterIndex,
    keep: int = 3,
    *,
    swap_if: Callable[[], bool] | None = None,
    share_dir: Path | None = None,
) -> str:
    """Write a new version, then swap the pointer to it; prune versions beyond ``keep``.

    Args:
        swap_if: asked right before the swap; False leaves the version written (complete, kept
            for rollback) but not current, and sets ``manifest["published"]`` to False.
        share_dir: the index share's mount (``job/share.py``): the version is copied there before its
            manifest is written, and pruned versions are removed from it.

    Returns:
        the new version name.
    """
    version = claim_next(storage, INDEX)
    segments = [dict(seg, version=seg.get("version") or version) for seg in built.manifest.segments]
    manifest = built.manifest.model_copy(update={"version": version, "segments": segments})
    with tempfile.TemporaryDirectory(prefix="clusterlens-index-") as tmp:
        faiss.write_index(built.index, str(Path(tmp) / "index.faiss"))
        if "ids.npy" not in built.files:  # a streamed build has written it (and refine.npy, raw.npy) already
            keys = built.ids.keys[0] if len(built.ids.keys) == 1 else compact_ids(np.asarray(built.ids))
            np.save(Path(tmp) / "ids.npy", keys)
            order = built.ids.orders[0] if len(built.ids.keys) == 1 else id_order(keys)
            np.save(Path(tmp) / "order.npy", np.asarray(order))
        np.save(Path(tmp) / "clusters.npy", np.asarray(built.clusters))
        np.save(Path(tmp) / "labels.npy", np.asarray(built.built_labels))
        np.save(Path(tmp) / "class_top.npy", np.asarray(built.class_top))
        np.save(Path(tmp) / "class_prob.npy", np.asarray(built.class_prob))
        # text search reads these, not all rows
        write_class_lists(Path(tmp), np.asarray(built.class_top), np.asarray(built.class_prob))
        ingested = np.asarray(built.ingested) if built.ingested is not None else np.zeros(0, np.int64)
        np.save(Path(tmp) / "ingested.npy", ingested)
        np.save(Path(tmp) / COLD_START_FILE, np.asarray(built.cold_start, dtype=np.int64))
        np.save(Path(tmp) / "caption_rows.npy", built.captions.rows.astype(np.int64))
        np.save(Path(tmp) / "caption_vectors.npy", built.captions.vectors.astype(np.float16))
        np.save(Path(tmp) / "captions.npy", built.captions.text)
        if built.vectors is not None and CODES_FILE not in built.files:
            np.save(Path(tmp) / CODES_FILE, np.asarray(built.vectors, dtype=np.uint8))
        if built.codec is not None:
            np.save(Path(tmp) / CODEC_FILE, built.codec.to_array())
        if built.raw is not None and built.raw_codec is not None:
            if RAW_CODES_FILE not in built.files:
                np.save(Path(tmp) / RAW_CODES_FILE, np.asarray(built.raw, dtype=np.uint8))
            np.save(Path(tmp) / RAW_CODEC_FILE, built.raw_codec.to_array())
        if built.trained is not None:
            (Path(tmp) / TRAINED_FILE).write_bytes(built.trained)
        for name in (*FILES, TRAINED_FILE):
            path = built.files.get(name, Path(tmp) / name)
            if path.is_file():
                storage.upload_file(INDEX, f"{version}/{name}", path)
        if share_dir is not None:  # on the share before the manifest and pointer name the version
            mirror_published(share_dir, version, Path(tmp), built, manifest)
    if built.head is not None:
        storage.upload_file(INDEX, f"{version}/{HEAD_FILE}", built.head.path)
        storage.put_json(INDEX, f"{version}/head.json", built.head.manifest.to_json())
    storage.put_json(INDEX, f"{version}/manifest.json", manifest.to_json())  # marks the version complete
    built.manifest = manifest
    if swap_if is not None and not swap_if():
        built.manifest = manifest.model_copy(update={"published": False})
        log.warning("index %s written but not published: a newer build is current", version)
        return version
    swap_pointer(storage, INDEX, version)
    prune(storage, INDEX, keep, current=version, referenced=_referenced, on_delete=share_pruner(share_dir))
    log.info("published index %s (%d vectors, %d clusters)", version, built.count, manifest.nlist)
    return version
