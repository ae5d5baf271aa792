"""The search benchmark's pure helpers: growing vectors, exact search by blocks, recall, eviction."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from bench.grow import LowRankMixture, write_draws
from bench.search import evict, exact_knn, mapped_files, recall_at_k
from shared.features import normalize


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d))
    return normalize((centres[rng.integers(0, 8, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32))


def test_low_rank_mixture_draws_unit_vectors_of_the_input_dimension_near_the_real_ones(tmp_path: Path) -> None:
    real = _clustered(2000, 96)
    mixture = LowRankMixture.fit(real, components=8, rank=4)
    assert mixture.dim == 96 and mixture.factors.shape == (8, 4, 96) and mixture.noise.shape == (8, 96)
    assert np.allclose(mixture.axes @ mixture.axes.T, np.eye(96), atol=1e-4)
    assert np.isclose(mixture.weights.sum(), 1)
    grown = write_draws(mixture, tmp_path / "g.npy", 3000, seed=1, desc="test")
    assert isinstance(grown, np.memmap) and grown.shape == (3000, 96) and grown.dtype == np.float32
    assert np.allclose(np.linalg.norm(grown, axis=1), 1, atol=1e-5)
    # each draw lies near the real data (its nearest real vector is about as close as real ones are to each other)
    real_nn = faiss.knn(real[:200], real, 2, metric=faiss.METRIC_INNER_PRODUCT)[0][:, 1].mean()
    grown_nn = faiss.knn(np.asarray(grown[:200]), real, 1, metric=faiss.METRIC_INNER_PRODUCT)[0][:, 0].mean()
    assert abs(grown_nn - real_nn) < 0.1, (grown_nn, real_nn)
    # the same seed draws the same vectors; another seed others
    again = write_draws(mixture, tmp_path / "h.npy", 3000, seed=1, desc="test")
    assert np.array_equal(grown, again)
    assert not np.array_equal(grown, write_draws(mixture, tmp_path / "i.npy", 3000, seed=2, desc="test"))


def test_exact_knn_by_blocks_matches_one_search_and_recall_counts_overlap() -> None:
    base, queries = _clustered(5000, 32), _clustered(50, 32, seed=3)
    sims, rows = exact_knn(queries, (base[i : i + 700] for i in range(0, len(base), 700)), k=10)
    want_sims, want_rows = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert np.allclose(sims, want_sims, atol=1e-5)
    assert recall_at_k(rows, want_rows) > 0.99  # ties may swap rows, not scores
    assert recall_at_k(want_rows, want_rows) == 1.0
    half = want_rows.copy()
    half[:, 5:] = -1
    assert recall_at_k(half, want_rows) == 0.5


def test_evict_unmaps_and_drops_a_memory_mapped_file(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(1 << 20, dtype=np.float32))
    x = np.load(path, mmap_mode="r")
    total = float(x.sum())
    assert path.resolve() in mapped_files(tmp_path)
    evict([path])
    assert float(x.sum()) == total  # the mapping still reads the file's contents after eviction


def test_load_probe_times_a_saved_index(tmp_path: Path) -> None:
    """``bench.load_probe --time`` (what ``bench.search_repeat`` runs): a fresh process opens the saved index as
    the app does and times one query at a time, answering what the index answers. (Its hnswlib side needs the
    benchmark's packages: ``make bench-search`` runs it.)"""
    import json
    import subprocess
    import sys

    from job.index_build import IndexParams, build_index, publish
    from shared.storage import LocalStorage

    base, queries = _clustered(3000, 96), _clustered(40, 96, seed=5)
    ids = [f"{i:064x}" for i in range(len(base))]
    params = IndexParams(kind="ivf_flat", pca_dim=32, power=1.0, flat_max=0)
    built = build_index(base, ids, [None] * len(ids), encoder_version="t", params=params)
    store = tmp_path / "store"
    publish(LocalStorage(store), built)
    np.save(tmp_path / "q.npy", queries)
    done = subprocess.run(
        [sys.executable, "-m", "bench.load_probe", "clusterlens", str(store), str(tmp_path / "q.npy"), "--time"],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["queries"] == 40 and 0 < got["p50_ms"] <= got["p99_ms"]
    assert got["rows"] == built.search(queries[:1], 10).rows[0].tolist()
