"""Search benchmark: IVF-Flat and IVF-PQ against exact search, on real and on grown embeddings.

Run by ``make bench-search``; writes ``bench/results/search.json``. Two collections in one run:

- **real 70k**: the stored embeddings of all Fashion-MNIST images (train + test; see
  :mod:`bench.collection`), indexed exactly as ``clusterlens reindex`` does (power normalisation,
  PCA 256, L2). Queries: 1,000 stored images, each searched leave-one-out (its own row is not
  counted), like the recall gate.
- **grown 1M**: 1,000,000 vectors drawn from a Gaussian mixture fitted to the real 70k in the
  index's 256-d space (k-means into components, then each component's mean and shrunk full
  covariance), L2-normalised; queries are 1,000 more draws that are not indexed. Not uniform random
  data: its neighbour structure is checked against the real set (``nn_cosine`` in the JSON).

Each index is built with the product's code (:func:`job.index_build.build_index`: training, recall gate on
its own 1,000-vector sample, nprobe chosen for recall@10 >= 0.95), published to a local store and
measured on queries it has not tuned on:

- ``recall_at_10``: against exact search over the same vectors (the index's space);
- ``p50_ms`` / ``p99_ms``: one query at a time, one thread, through ``ClusterIndex.search`` (query
  transform included); ``flat_p50_ms``: exact search (``faiss.knn``, SIMD scan) of the same query,
  one thread; ``faiss.cvar.distance_compute_blas_threshold`` is set to 20, so single queries take
  the scan and batches take BLAS, each the faster path for it;
- ``qps_batch``: 1,000 queries in one call, all threads (``flat_qps_batch``: the same for exact);
- ``bytes_per_vector``: the published FAISS file over n (codes, ids, centroids, PCA);
  IVF-PQ also reads ``rerank_bytes_per_vector`` from a memory-mapped file of exact vectors, on
  disk, touching only each query's shortlist;
- ``build_s``: train + add + recall gate; ``load_s``: a new Python process, from its start to the
  first answer (imports, memory-mapped load, one query), median of 3, page cache warm;
  ``load_cold_s``: the same after evicting the version's files from the page cache.

This is a benchmark, not a test: about 25 minutes on 2 CPU cores once the collection is embedded
(building the collection first takes another 15-20).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.collection import real_embeddings
from bench.embed import device
from job.index_build import IndexParams, build_index, publish
from shared.features import normalize
from shared.index import load_current
from shared.storage import INDEX, LocalStorage

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "cache" / "search"
QUERIES = 1000
K = 10


# -- growing a large collection from real embeddings ------------------------------------------


def fit_mixture(
    real: np.ndarray, components: int = 512, shrink: float = 0.05, seed: int = 0
) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """A Gaussian mixture fitted to real unit vectors by hard EM.

    k-means splits ``real`` into ``components``; each becomes (weight, mean, Cholesky factor of its
    covariance shrunk towards a scaled identity by ``shrink``, so small components stay full rank).

    Args:
        real: float32 (n, d) unit vectors in the index's space.

    Returns:
        [(weight, mean (d,), lower-triangular factor (d, d))] for each non-empty component.
    """
    n, d = real.shape
    km = faiss.Kmeans(d, components, niter=20, seed=seed, spherical=True)
    km.train(real)
    _, assign = km.index.search(real, 1)
    assign = assign[:, 0]
    out = []
    for c in range(components):
        members = real[assign == c].astype(np.float64)
        if len(members) < 2:
            continue
        cov = np.cov(members, rowvar=False)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / d * np.eye(d)
        out.append((len(members) / n, members.mean(0), np.linalg.cholesky(cov)))
    return out


def sample_mixture(mixture: list[tuple[float, np.ndarray, np.ndarray]], n: int, seed: int) -> np.ndarray:
    """float32 (n, d) L2-normalised draws from :func:`fit_mixture`'s mixture, in random order."""
    rng = np.random.default_rng(seed)
    weights = np.array([w for w, _, _ in mixture])
    counts = rng.multinomial(n, weights / weights.sum())
    d = len(mixture[0][1])
    out = np.empty((n, d), dtype=np.float32)
    pos = 0
    for (_, mean, chol), m in zip(mixture, counts, strict=True):
        for start in range(0, m, 65536):
            z = rng.standard_normal((min(65536, m - start), d))
            out[pos : pos + len(z)] = mean + z @ chol.T
            pos += len(z)
    out = out[rng.permutation(n)]
    return normalize(out)


def nn_cosine(queries: np.ndarray, base: np.ndarray, leave_one_out: bool) -> dict[str, float]:
    """Mean cosine similarity of each query's 1st and 10th nearest neighbour: how tight the
    neighbourhoods are, to compare a grown collection with the real one."""
    skip = 1 if leave_one_out else 0
    sims, _ = faiss.knn(queries, base, K + skip, metric=faiss.METRIC_INNER_PRODUCT)
    return {"nn1": round(float(sims[:, skip].mean()), 4), "nn10": round(float(sims[:, K - 1 + skip].mean()), 4)}


# -- measuring ---------------------------------------------------------------------------------


def recall_at_10(found: np.ndarray, truth: np.ndarray, self_rows: np.ndarray | None) -> float:
    """Mean share of the true 10 neighbours found; with ``self_rows``, each query's own row is dropped
    from both lists (leave-one-out)."""
    total = 0.0
    for i, (f, t) in enumerate(zip(found, truth, strict=True)):
        if self_rows is not None:
            f, t = f[f != self_rows[i]], t[t != self_rows[i]]
        total += len(set(f[:K].tolist()) & set(t[:K].tolist())) / K
    return total / len(found)


def timed_singles(fn: Any, queries: np.ndarray) -> np.ndarray:
    """Milliseconds of ``fn(query[None])`` for each query, after a short warm-up."""
    for q in queries[:20]:
        fn(q[None])
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        fn(q[None])
        out[i] = (time.perf_counter() - t0) * 1000
    return out


def load_time(store: Path, query_file: Path, expect: list[int], cold: bool) -> float:
    """Seconds from starting a new Python process to its first answer from the published index."""
    if cold:
        _evict(store)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load_probe", str(store), str(query_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - t0
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got != expect:
        raise RuntimeError(f"the new process answered {got}, this one {expect}")
    return seconds


def _evict(store: Path) -> None:
    """Drop the store's files from the page cache (POSIX_FADV_DONTNEED; no root needed)."""
    for path in store.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(
    name: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    kind: str,
    self_rows: np.ndarray | None,
    build: IndexParams,
) -> dict[str, Any]:
    """Build, publish and measure one index of ``vectors``; queries are raw (the index transforms them)."""
    n = len(vectors)
    ids = [f"{i:064x}" for i in range(n)]
    threads = faiss.omp_get_max_threads()
    print(f"\n== {name}: {n} vectors, kind {kind}")
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    built = build_index(vectors, ids, [None] * n, encoder_version="bench", params=replace(build, kind=kind))
    build_s = time.perf_counter() - t0
    m = built.manifest
    assert m.recall is not None  # every build runs the recall gate
    print(f"built {m.factory} in {build_s:.1f} s; gate: nprobe {built.nprobe}, recall {m.recall.at_10}")
    store = WORK / f"{name}-{kind}"
    shutil.rmtree(store, ignore_errors=True)
    version = publish(LocalStorage(store), built)
    index_bytes = (store / INDEX / version / "index.faiss").stat().st_size
    rerank_file = store / INDEX / version / "vectors.npy"
    del built
    index = load_current(LocalStorage(store), store / "cache")  # measured as served: memory-mapped

    xq = index.transform(queries)
    xb = index.all_vectors()
    faiss.cvar.distance_compute_blas_threshold = 20
    _, truth = faiss.knn(xq, xb, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    found = index.search(queries, K + 1).rows
    recall = recall_at_10(found, truth, self_rows)

    faiss.omp_set_num_threads(1)
    singles = timed_singles(lambda q: index.search(q, K), queries)
    flat = timed_singles(lambda q, xb=xb: faiss.knn(q, xb, K, metric=faiss.METRIC_INNER_PRODUCT), xq)
    faiss.omp_set_num_threads(threads)
    index.search(queries[:50], K)
    t0 = time.perf_counter()
    index.search(queries, K)
    qps = len(queries) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    faiss.knn(xq, xb, K, metric=faiss.METRIC_INNER_PRODUCT)
    flat_qps = len(queries) / (time.perf_counter() - t0)
    del xb

    qfile = store / "query.npy"
    np.save(qfile, queries[:1])
    expect = index.search(queries[:1], K).rows[0].tolist()
    warm = sorted(load_time(store, qfile, expect, cold=False) for _ in range(3))
    cold = sorted(load_time(store, qfile, expect, cold=True) for _ in range(3))
    p50, flat_p50 = float(np.percentile(singles, 50)), float(np.percentile(flat, 50))
    row = {
        "collection": name,
        "n": n,
        "dim": m.dim,
        "input_dim": m.input_dim,
        "kind": m.kind,
        "factory": m.factory,
        "nlist": m.nlist,
        "nprobe": index.nprobe,
        "rerank_shortlist": K * index.rerank if index.rerank else None,
        "gate_curve": m.recall.curve,
        "recall_at_10": round(recall, 4),
        "gate_recall_at_10": m.recall.at_10,
        "p50_ms": round(p50, 3),
        "p99_ms": round(float(np.percentile(singles, 99)), 3),
        "qps_batch": round(qps, 1),
        "flat_p50_ms": round(flat_p50, 3),
        "flat_qps_batch": round(flat_qps, 1),
        "speedup_vs_flat": round(flat_p50 / p50, 1),
        "bytes_per_vector": round(index_bytes / n, 1),
        "memory_bytes_per_vector": m.bytes_per_vector,
        "rerank_bytes_per_vector": round(rerank_file.stat().st_size / n, 1) if rerank_file.is_file() else None,
        "build_s": round(build_s, 1),
        "train_s": m.train_seconds,
        "gate_s": m.recall.seconds,
        "load_s": round(warm[1], 3),
        "load_cold_s": round(cold[1], 3),
        "threads": threads,
    }
    print(json.dumps(row))
    shutil.rmtree(store, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grown", type=int, default=1_000_000, help="size of the grown collection")
    parser.add_argument("--components", type=int, default=512, help="Gaussian mixture components")
    parser.add_argument("--kinds", nargs="+", default=["ivf_flat", "ivf_pq"], choices=["flat", "ivf_flat", "ivf_pq"])
    parser.add_argument("--collections", nargs="+", default=["real", "grown"], choices=["real", "grown"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.json")
    args = parser.parse_args(argv)

    settings, _, encoder, emb = real_embeddings()
    n_real = len(emb.ids)
    rng = np.random.default_rng(7)  # not the recall gate's seed: queries the gate has not tuned on
    self_rows = np.sort(rng.choice(n_real, QUERIES, replace=False))
    defaults = IndexParams.from_settings(settings)
    rows = []
    for kind in args.kinds if "real" in args.collections else []:
        rows.append(
            measure("real-70k", emb.vectors, emb.vectors[self_rows], kind=kind, self_rows=self_rows, build=defaults)
        )

    # Grow 1M in the real index's space (power-normalised, PCA 256, L2), and index it there.
    print("\n== growing the large collection from the real embeddings")
    real_index = build_index(
        emb.vectors, emb.ids, [None] * n_real, encoder_version="bench", params=replace(defaults, kind="flat")
    )
    real_space = real_index.all_vectors()
    del real_index
    t0 = time.perf_counter()
    mixture = fit_mixture(real_space, components=args.components)
    grown = sample_mixture(mixture, args.grown + QUERIES, seed=1)
    grown, grown_queries = grown[: args.grown], grown[args.grown :]
    grow_s = time.perf_counter() - t0
    realism = {
        "real_70k": nn_cosine(real_space[self_rows], real_space, leave_one_out=True),
        f"grown_first_{n_real}": nn_cosine(grown_queries, grown[:n_real], leave_one_out=False),  # like for like
        f"grown_{args.grown}": nn_cosine(grown_queries, grown, leave_one_out=False),
    }
    print(f"grown {len(grown)} vectors from a {len(mixture)}-component mixture in {grow_s:.1f} s; {realism}")
    grown_build = replace(defaults, pca_dim=0, power=1.0)  # already in the index's space
    name = f"grown-{args.grown // 1000}k" if args.grown < 1_000_000 else f"grown-{args.grown // 1_000_000}M"
    for kind in args.kinds if "grown" in args.collections else []:
        rows.append(measure(name, grown, grown_queries, kind=kind, self_rows=None, build=grown_build))

    big = {r["kind"]: r for r in rows if r["collection"] == name}
    targets: dict[str, bool] = {}
    if "ivf_flat" in big:
        targets["ivf_flat_recall_at_10_ge_0.95"] = big["ivf_flat"]["recall_at_10"] >= 0.95
        targets["ivf_flat_speedup_vs_flat_ge_20"] = big["ivf_flat"]["speedup_vs_flat"] >= 20
    if "ivf_pq" in big:
        targets["ivf_pq_bytes_per_vector_le_64"] = big["ivf_pq"]["memory_bytes_per_vector"] <= 64
        targets["ivf_pq_recall_at_10_ge_0.90"] = big["ivf_pq"]["recall_at_10"] >= 0.90
    targets["load_s_le_2"] = all(r["load_s"] <= 2 for r in big.values())
    result = {
        "results": rows,
        "targets_at_1M": targets,
        "grown": {
            "n": len(grown),
            "components": len(mixture),
            "method": "Gaussian mixture (k-means hard EM, shrunk full covariances) fitted to the real 70k "
            "in the index's 256-d space; L2-normalised draws",
            "seconds": round(grow_s, 1),
            "nn_cosine": realism,
        },
        "queries": QUERIES,
        "k": K,
        "encoder": encoder.version,
        "device": device(),
        "faiss": faiss.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(targets, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
