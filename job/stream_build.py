"""A full index build in bounded memory: the shards are read one at a time, twice, never all at once.

What :func:`job.index_build.build_index` does with every vector in memory, :func:`build_streaming` does
with a sample and chunks:

1. **Scan** every shard once for its ids (kept as bytes: an id seen in an earlier shard, or deleted,
   is left out, as :meth:`EmbeddingStore.iter_chunks` does) and draw a seeded sample of rows, at the rate
   that gives the points training needs (``64 * nlist`` in large collections, as ``build_index``'s
   k-means takes, and at least :data:`PCA_SAMPLE`), written to a file on disk as it is drawn.
2. **Train** PCA on up to :data:`PCA_SAMPLE` of the sampled rows, then the centroids (and PQ codes) on the
   whole sample in the index's space. The recall gate's query rows are drawn from the sample too.
3. **Add** the shards again, one at a time: each chunk is power-normalised, transformed, added to the
   lists, coded into the IVF-PQ re-ranking file (``refine.npy``) and scanned exactly for the gate's
   queries (their true neighbours are merged chunk by chunk), so no step holds every vector.

What stays in memory is what the index keeps per row anyway (codes or vectors, cluster, label, classes,
ingest time) plus the ids as bytes while they are sorted; ``ids.npy`` (as the query side reads it) and
``refine.npy`` go to files that :func:`job.index_build.publish` uploads as they are. Up to
:data:`PCA_SAMPLE` rows, and ``64 * nlist`` (or ``256 * nlist``) training points, the sample is every
row and the build trains on exactly what ``build_index`` would.

**Compaction.** A full build reads every shard anyway, so it also rewrites the small ones: when the
shards under half ``compact_rows`` rows hold at least ``compact_rows`` rows between them, their rows
(each id once, every column, old shards' catalogue fields filled) are written into new shards of
``compact_rows`` rows. The index then stands on the new shards; the replaced ones are recorded in the
manifest (``source.replaced``) and deleted one generation later (see :func:`job.reindex.reindex`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from job.embeddings import EmbeddingSet, EmbeddingStore, embedding_set, fill_records, fixed_list, rows_in_name
from job.embeddings import shard_table as to_shard_table
from job.index_build import (
    PCA_SAMPLE,
    IndexParams,
    add_transformed,
    choose_nlist,
    cold_start_rows,
    label_codes_of,
    list_of_rows,
    new_index,
    new_manifest,
    recall_rows,
    settle,
    train_lists,
    training_points,
    tune_against,
)
from shared.catalog import Catalog
from shared.features import power_normalize
from shared.head import ProjectionHead
from shared.index import Captions, ClusterIndex, pretransform
from shared.refine import CODES_FILE, RAW_CODES_FILE, RefineCodec
from shared.rows import DIGEST, FileRows
from shared.storage import EMBEDDINGS

log = logging.getLogger(__name__)

CHUNK_ROWS = 16_384  # rows of the sample file read at once
UNNAMED_SHARD_ROWS = 4096  # assumed for a shard whose name does not say its rows (the default shard size)


@dataclass
class Compaction:
    """What a build's compaction did: the shards it replaced, those it wrote, rows and seconds."""

    replaced: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0


@dataclass
class StreamedBuild:
    """A built index and the shards it stands on (compacted ones in place of those they replaced)."""

    index: ClusterIndex
    shards: list[str]
    compaction: Compaction | None
    seconds: dict[str, float]


class NpyWriter:
    """A ``.npy`` file of a known shape written chunk by chunk, never held in memory.

    Raises:
        ValueError: from :meth:`close` when the rows written are not the rows announced.
    """

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.rows = 0
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by close())
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self._file, header)

    def append(self, rows: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> Path:
        self._file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: wrote {self.rows} rows, announced {self.shape[0]}")
        return self.path


class ShardRewriter:
    """Writes rows into new shards of ``rows_per_shard`` rows (a Parquet file on disk, uploaded whole)."""

    def __init__(self, store: EmbeddingStore, rows_per_shard: int, folder: Path):
        self.store, self.rows_per_shard, self.folder = store, rows_per_shard, folder
        self.written: list[str] = []
        self.rows = 0
        self._writer: Any = None
        self._path = folder / "compacted.parquet"
        self._count = 0

    def add(self, emb: EmbeddingSet) -> None:
        import pyarrow.parquet as pq

        if not emb.ids:
            return
        table = to_shard_table(self.store.encoder_version, emb)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path, table.schema, compression="zstd")
        self._writer.write_table(table)
        self._count += len(emb.ids)
        self.rows += len(emb.ids)
        if self._count >= self.rows_per_shard:
            self._finish()

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        name = self.store.shard_name(self._count)
        self.store.storage.upload_file(EMBEDDINGS, name, self._path)
        self._path.unlink()
        self.written.append(name)
        self._writer, self._count = None, 0

    def close(self) -> list[str]:
        """Write the last, partial shard; the names of every shard written."""
        self._finish()
        return self.written


def compaction_plan(shards: list[str], compact_rows: int) -> list[str]:
    """The shards a build should rewrite: those under half ``compact_rows`` rows, when there are at least two
    and they hold ``compact_rows`` rows between them (else none). Row counts come from the names."""
    if compact_rows <= 0:
        return []
    small = [s for s in shards if (rows_in_name(s) or compact_rows) < compact_rows // 2]
    if len(small) < 2 or sum(rows_in_name(s) or 0 for s in small) < compact_rows:
        return []
    return small


def _is_hex(ids: np.ndarray) -> bool:
    """Whether every id (ASCII bytes) is lowercase hex."""
    text = b"".join(ids.tolist())
    return not text.translate(None, b"0123456789abcdef")


def _picked(select: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """A mask over ``select``'s positions that is set at the ``pick``-th set positions of ``select``."""
    out = np.zeros(len(select), bool)
    out[np.flatnonzero(select)[pick]] = True
    return out


def build_streaming(
    store: EmbeddingStore,
    catalog: Catalog,
    shards: list[str],
    *,
    deleted: set[str],
    params: IndexParams,
    workdir: Path,
    head: ProjectionHead | None = None,
    embed_captions: Callable[[np.ndarray, list[str]], Captions | None] | None = None,
    compact_rows: int = 0,
    source: dict[str, Any] | None = None,
) -> StreamedBuild:
    """Train and fill an index over ``shards`` reading one shard at a time (see the module docstring).

    Args:
        shards: the shards to read, in order (an id's first appearance is the one indexed).
        deleted: ids to leave out.
        workdir: a folder for the sample and the files the index publishes from; it must outlive
            the returned index until it is published.
        embed_captions: turns (rows, texts) into the index's :class:`Captions` (None: no captions).
        compact_rows: rewrite small shards into shards of this many rows (0: never; see
            :func:`compaction_plan`).

    Raises:
        ValueError: when the shards hold nothing to index.
    """
    p = params
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    small = compaction_plan(shards, compact_rows)
    small_set = set(small)
    order = [s for s in shards if s not in small_set] + small

    # 1. scan: ids, and a sample drawn at the rate training needs
    n_est = max(1, sum(rows_in_name(s) or UNNAMED_SHARD_ROWS for s in order))
    nlist_est = min(p.nlist or choose_nlist(n_est, p.min_points_per_list), n_est)
    want = max(training_points(n_est, nlist_est), min(PCA_SAMPLE, n_est))
    rate = min(1.0, 1.05 * want / n_est)
    rng = np.random.default_rng(p.seed)
    id_parts: list[np.ndarray] = []
    drawn: list[np.ndarray] = []
    sample_path = workdir / "sample.f32"
    total, input_dim = 0, 0
    sizes: list[int] = []
    with open(sample_path, "wb") as sample_file:
        for name in order:
            table = store._read_table(name, ["id", "embedding"])
            m = table.num_rows
            id_parts.append(np.array([i.encode() for i in table.column("id").to_pylist()], dtype=bytes))
            pick = rng.random(m) < rate if rate < 1 else np.ones(m, bool)
            if m and pick.any():
                vectors = fixed_list(table, "embedding", m)[pick]
                input_dim = vectors.shape[1]
                sample_file.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
                drawn.append(total + np.flatnonzero(pick))
            total += m
            sizes.append(m)
            del table
    all_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, bytes)
    del id_parts
    first = np.zeros(total, bool)
    first[np.unique(all_ids, return_index=True)[1]] = True  # first occurrence (np.unique sorts stably)
    keep = first.copy()
    if deleted and total:
        keep &= ~np.isin(all_ids, np.array([d.encode() for d in deleted], dtype=bytes))
    n = int(keep.sum())
    if n == 0:
        raise ValueError("nothing to index: embed some images first")
    kept_ids = all_ids[keep]
    del all_ids
    # ASCII bytes sort as the strings do; lowercase hex sorts as the bytes it spells
    id_order = np.argsort(kept_ids, kind="stable").astype(np.int32 if n < 2**31 else np.int64)
    binary = bool(np.all(np.char.str_len(kept_ids) == 2 * DIGEST)) and all(
        _is_hex(kept_ids[start : start + (1 << 20)]) for start in range(0, n, 1 << 20)
    )
    ids_file = NpyWriter(workdir / "ids.npy", "uint8" if binary else "U64", (n, DIGEST) if binary else (n,))
    step = 1 << 20
    for start in range(0, n, step):
        part = kept_ids[start : start + step]
        if binary:
            ids_file.append(
                np.frombuffer(bytes.fromhex(b"".join(part.tolist()).decode()), np.uint8).reshape(-1, DIGEST)
            )
        else:
            ids_file.append(part.astype("U64"))
    ids_path = ids_file.close()
    order_path = workdir / "order.npy"
    np.save(order_path, id_order)
    del kept_ids
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    seconds["scan"] = time.perf_counter() - t0

    # 2. train on the sample
    t1 = time.perf_counter()
    sampled = np.concatenate(drawn) if drawn else np.zeros(0, np.int64)
    usable = keep[sampled]  # sampled rows that are indexed (not a repeat, not deleted)
    row_of = np.cumsum(keep) - 1  # position in the whole scan -> index row
    sample_rows = row_of[sampled[usable]]
    power, pca_dim = (1.0, 0) if head is not None else (p.power, p.pca_dim)
    feature_dim = head.dim if head is not None else input_dim
    plan = p.plan(n, feature_dim, pca_dim)
    raw_codec: RefineCodec | None = None
    index, desc = new_index(plan, feature_dim, n, p.seed)
    ivf = faiss.extract_index_ivf(index)

    def features(raw: np.ndarray) -> np.ndarray:
        return head.apply(raw).embedding if head is not None else power_normalize(raw, power)

    def read_sample(select: np.ndarray, transform: bool) -> np.ndarray:
        """The sampled rows where ``select`` (over the sample file's rows) is set, as features, then
        (``transform``) in the index's space."""
        parts = []
        row_bytes = 4 * input_dim
        with open(sample_path, "rb") as f:
            for start in range(0, len(select), CHUNK_ROWS):
                part = select[start : start + CHUNK_ROWS]
                raw = np.frombuffer(f.read(len(part) * row_bytes), np.float32).reshape(len(part), input_dim)
                if part.any():
                    x = features(raw[part])
                    parts.append(pretransform(index, x) if transform else x)
        return np.concatenate(parts) if parts else np.zeros((0, ivf.d if transform else feature_dim), np.float32)

    m = int(usable.sum())
    if isinstance(index, faiss.IndexPreTransform):  # train the chain (PCA, rotation) first, as FAISS would
        for_pca = usable.copy()
        if m > PCA_SAMPLE:
            keep_pca = np.zeros(m, bool)
            keep_pca[np.random.default_rng(p.seed).choice(m, PCA_SAMPLE, replace=False)] = True
            for_pca[np.flatnonzero(usable)] = keep_pca
        x = read_sample(for_pca, transform=False)
        raw_codec = RefineCodec.train(x) if plan.raw_rerank else None
        chain: Any = index.chain
        for i in range(chain.size()):
            step = chain.at(i)
            if not step.is_trained:
                step.train(x)
            x = step.apply(x)
        del x
    xt_train = read_sample(usable, transform=True)
    train_lists(ivf, xt_train, plan, p.seed)
    cold_start = cold_start_rows(sample_rows, xt_train.__getitem__, p.seed)
    codec = RefineCodec.train(xt_train) if plan.kind == "ivf_pq" else None
    index.is_trained = True
    k = min(10, n - 1)
    gate_pick = recall_rows(m, p.recall_sample, p.seed) if k >= 1 else np.zeros(0, np.int64)
    gate_rows = sample_rows[gate_pick]
    queries = np.ascontiguousarray(xt_train[gate_pick])
    del xt_train
    # the gate's exact neighbours: in the raw space when the index re-ranks there
    raw_queries = read_sample(_picked(usable, gate_pick), transform=False) if raw_codec is not None else None
    os.unlink(sample_path)
    trained = faiss.serialize_index(index)  # no rows yet: what an incremental reindex adds its delta to
    seconds["train"] = time.perf_counter() - t1

    # 3. add, shard by shard; compact the small ones on the way
    t2 = time.perf_counter()
    pq_file = NpyWriter(workdir / CODES_FILE, "uint8", (n, int(ivf.d))) if codec is not None else None
    raw_file = NpyWriter(workdir / RAW_CODES_FILE, "uint8", (n, feature_dim)) if raw_codec is not None else None
    truth = faiss.ResultHeap(len(gate_rows), k + 1, keep_max=True) if len(gate_rows) else None
    rewriter = ShardRewriter(store, compact_rows, workdir) if small else None
    class_top: np.ndarray | None = None
    class_prob: np.ndarray | None = None
    ingested = np.full(n, -1, np.int64)
    labels: list[str | None] = []
    caption_rows: list[int] = []
    caption_texts: list[str] = []
    row = 0
    for s, name in enumerate(order):
        firsts = first[bounds[s] : bounds[s + 1]]
        if not firsts.any():
            continue
        chunk = embedding_set(name, store._read_table(name), firsts)
        if chunk.unrecorded.any():
            chunk = fill_records(catalog, chunk)
        if rewriter is not None and name in small_set:
            rewriter.add(chunk)
        take = keep[bounds[s] : bounds[s + 1]][firsts]
        if not take.any():
            continue
        xf = features(chunk.vectors[take])
        xt = pretransform(index, xf)
        add_transformed(index, xt)
        if pq_file is not None and codec is not None:
            pq_file.append(codec.encode(xt))
        if raw_file is not None and raw_codec is not None:
            raw_file.append(raw_codec.encode(xf))
        if truth is not None:
            q, xb = (raw_queries, xf) if raw_queries is not None else (queries, xt)
            scores, found = faiss.knn(q, xb, min(k + 1, len(xt)), metric=faiss.METRIC_INNER_PRODUCT)
            truth.add_result(scores, found + row)
        m_rows = int(take.sum())
        if class_top is None:
            class_top = np.zeros((n, chunk.top_class.shape[1]), np.int16)
            class_prob = np.zeros((n, chunk.top_prob.shape[1]), np.float32)
        assert class_prob is not None
        class_top[row : row + m_rows] = chunk.top_class[take]
        class_prob[row : row + m_rows] = chunk.top_prob[take]
        ingested[row : row + m_rows] = chunk.ingested[take]
        for j, r in enumerate(np.flatnonzero(take)):
            labels.append(chunk.labels[r])
            if chunk.captions[r]:
                caption_rows.append(row + j)
                caption_texts.append(str(chunk.captions[r]))
        row += m_rows
    if row != n:
        raise RuntimeError(f"added {row} rows, the scan counted {n}: a shard changed while it was read")
    compaction = None
    if rewriter is not None:
        written = rewriter.close()
        compaction = Compaction(small, written, rewriter.rows)
    if plan.kind != "ivf_pq":  # IVF-PQ re-ranks from its codes instead
        ivf.make_direct_map()
    vectors_path = pq_file.close() if pq_file is not None else None
    raw_path = raw_file.close() if raw_file is not None else None
    if truth is not None:
        truth.finalize()
    seconds["add"] = time.perf_counter() - t2

    clusters = list_of_rows(ivf)
    names, label_codes = label_codes_of(labels)
    del labels
    captions = embed_captions(np.array(caption_rows, np.int64), caption_texts) if embed_captions else None
    manifest = new_manifest(
        plan,
        desc,
        ivf,
        encoder_version=store.encoder_version,
        head=head,
        n=n,
        input_dim=input_dim,
        power=power,
        label_names=names,
        captions=captions,
        clusters=clusters,
        train_seconds=seconds["scan"] + seconds["train"],
        train_points=min(m, int(ivf.cp.max_points_per_centroid) * plan.nlist),
        started=t0,
        source=source,
    )
    built = ClusterIndex(
        index,
        np.load(ids_path, mmap_mode="r"),  # not read here: only publish needs it, from the file
        clusters,
        label_codes,
        manifest,
        class_top,
        class_prob,
        head,
        captions,
        ingested,
        FileRows(vectors_path) if vectors_path is not None else None,  # read per row, never mapped
        id_order,
        codec=codec,
        raw=FileRows(raw_path) if raw_path is not None else None,
        raw_codec=raw_codec,
    )
    built.trained = bytes(trained)
    built.cold_start = cold_start
    built.files = {"ids.npy": ids_path, "order.npy": order_path}
    built.files |= {CODES_FILE: vectors_path} if vectors_path else {}
    built.files |= {RAW_CODES_FILE: raw_path} if raw_path else {}
    t3 = time.perf_counter()
    nprobe = plan.nlist if plan.kind == "flat" else p.nprobe  # flat: every list, exact
    exact = truth.I if truth is not None else np.zeros((0, k + 1), np.int64)
    recall = tune_against(
        built, gate_rows, queries, exact, n, target=p.recall_target, nprobe=nprobe, raw_queries=raw_queries
    )
    recall.seconds = round(time.perf_counter() - t3, 3)
    seconds["gate"] = recall.seconds
    settle(manifest, built, recall)
    manifest.build_seconds = round(time.perf_counter() - t0, 3)
    manifest.train |= {"sampled": m, "stage_seconds": {k_: round(v, 3) for k_, v in seconds.items()}}
    if compaction is not None:
        compaction.seconds = round(seconds["add"], 3)
    kept = [s for s in order if s not in small_set]
    stands_on = kept + compaction.written if compaction is not None else list(order)
    log.info("streamed build of %d vectors: %s", n, ", ".join(f"{k_} {v:.1f} s" for k_, v in seconds.items()))
    return StreamedBuild(built, stands_on, compaction, {k_: round(v, 3) for k_, v in seconds.items()})
