"""Index kinds (exact, IVF-Flat, IVF-PQ with exact re-ranking), chosen from size and memory, on real embeddings."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from job.datasets import png_bytes
from job.embeddings import EmbeddingStore, embed_pending
from job.index_build import IndexParams, build_delta, build_index, plan_index, publish, two_level_centroids
from job.reindex import reindex
from shared.features import normalize, power_normalize
from shared.health import health
from shared.index import ClusterIndex, load_current, load_version
from shared.ingest import IngestItem, ingest_bytes
from shared.rows import FileRows
from shared.search import SearchService
from shared.storage import INDEX, LocalStorage
from tests.conftest import Collection, make_settings


@pytest.fixture(scope="module")
def real(collection: Collection) -> tuple[np.ndarray, list[str]]:
    emb = EmbeddingStore(collection.storage, collection.encoder.version).load()
    return emb.vectors, emb.ids


def _exact(index: ClusterIndex, queries: np.ndarray, k: int, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over the raw embeddings ``vectors`` (the index's rows) for an index that re-ranks in the
    raw space, else over the index's own vectors in its space: (scores, rows)."""
    if index.raw is not None:
        sims = index.prepare(queries)[1] @ power_normalize(vectors, index.manifest.power).T
    else:
        sims = index.transform(queries) @ index.all_vectors().T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, 1), rows


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def test_plan_follows_size_and_memory_budget() -> None:
    small = plan_index(1500, 1280)
    assert small.kind == "flat" and small.pca_dim == 0 and small.dim == 1280  # exact in the raw space
    assert (small.raw_rerank, plan_index(70_000, 1280).raw_rerank, plan_index(70_000, 1280, pca_dim=0).raw_rerank) == (
        0,
        5,
        0,
    )
    mid = plan_index(70_000, 1280)
    assert mid.kind == "ivf_flat" and mid.bytes_per_vector == 4 * 256 + 16 and mid.nlist == 265
    big = plan_index(10_000_000, 1280)  # 10M x 1040 B is 9.7 GiB: over the 1 GiB default
    assert big.kind == "ivf_pq" and big.rerank == 10
    assert (big.pq_m, big.pq_nbits, big.bytes_per_vector) == (128, 4, 72)  # 4-bit fast-scan: 64 B + its id
    assert 10_000_000 * big.bytes_per_vector <= 1024 * 2**20
    assert big.nlist == round(4 * np.sqrt(10_000_000))  # more, smaller lists as the collection grows
    tight = plan_index(10_000_000, 1280, memory_mb=200)  # 20 bytes a vector: a smaller code
    assert tight.kind == "ivf_pq" and tight.bytes_per_vector <= 21 and tight.pq_m == 16
    head = plan_index(5_000_000, 64, pca_dim=0, memory_mb=100)
    assert head.kind == "ivf_pq" and head.pca_dim == 0 and 64 % head.pq_m == 0
    roomy = plan_index(1_000_000, 1280, memory_mb=4096)
    assert roomy.kind == "ivf_flat"
    forced = plan_index(50_000, 1280, kind="ivf_pq", pq_m=16, nlist=100)
    assert (forced.kind, forced.pq_m, forced.nlist, forced.bytes_per_vector) == ("ivf_pq", 16, 100, 16)
    eight = plan_index(50_000, 1280, kind="ivf_pq", pq_m=16, pq_nbits=8, nlist=100)
    assert eight.bytes_per_vector == 24  # the classic 8-bit scan is still there
    with pytest.raises(ValueError, match="divide"):
        plan_index(50_000, 1280, kind="ivf_pq", pq_m=48)
    with pytest.raises(ValueError, match="kind"):
        plan_index(50_000, 1280, kind="hnsw")


def test_flat_kind_is_exact(real) -> None:  # type: ignore[no-untyped-def]
    vectors, ids = real
    index = build_index(vectors, ids, [None] * len(ids), encoder_version="t", params=IndexParams(kind="auto"))
    assert index.manifest.kind == "flat" and index.nprobe == index.ivf.nlist  # 1,000 vectors: exact
    assert index.manifest.recall is not None and index.manifest.recall.at_10 == 1.0
    queries = vectors[::25]
    scores, rows = _exact(index, queries, 10, vectors)
    hits = index.search(queries, 10)
    assert _recall(hits.rows, rows) >= 0.99  # ties at the 10th place may swap
    np.testing.assert_allclose(hits.scores, scores, atol=1e-4)


def test_ivf_pq_reranks_its_shortlist_exactly(real, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vectors, ids = real
    labels: list[str | None] = [None] * len(ids)
    pq = build_index(vectors, ids, labels, encoder_version="t", params=IndexParams(kind="ivf_pq", pq_m=16, rerank=4))
    m = pq.manifest
    assert m.kind == "ivf_pq" and m.factory.endswith("PQ16x4fs") and m.bytes_per_vector == 16
    assert m.recall is not None and m.recall.meets_target and m.recall.at_10 >= 0.95
    tuned = pq.rerank  # the gate may widen the shortlist to 2 or 4 times the plan's
    assert tuned in (4, 8, 16) and m.rerank == tuned and m.recall.rerank == tuned
    queries = vectors[1::20]
    _, truth = _exact(pq, queries, 10, vectors)
    hits = pq.search(queries, 10)
    assert _recall(hits.rows, truth) >= 0.93
    # Scores are raw cosines from the 8-bit raw codes, not PQ estimates.
    assert pq.raw is not None and pq.raw_codec is not None
    decoded = pq.raw_codec.decode(np.asarray(pq.raw))
    exact_scores = np.einsum("nkd,nd->nk", decoded[hits.rows], pq.prepare(queries)[1])
    exact_scores /= np.linalg.norm(decoded[hits.rows], axis=2)
    np.testing.assert_allclose(hits.scores, exact_scores, atol=1e-5)
    # One query at a time (the serving path, without the batch's bookkeeping) finds the same
    for i in range(0, len(queries), 5):
        one = pq.search(queries[i : i + 1], 10)
        np.testing.assert_array_equal(np.sort(one.rows[0]), np.sort(hits.rows[i]))
        np.testing.assert_allclose(one.scores[0], hits.scores[i], atol=1e-6)
    # Without re-ranking (a shortlist of exactly k) the 16-byte codes alone find less.
    pq.rerank, pq.raw_rerank = 1, 1
    codes_only = _recall(pq.search(queries, 10).rows, truth)
    pq.rerank, pq.raw_rerank = tuned, m.raw_rerank
    assert codes_only < _recall(hits.rows, truth) - 0.05, codes_only

    # Published and loaded: the re-ranking codes in memory (under the budget) or read per query from
    # their file (over it); ids are 32-byte digests, memory-mapped.
    storage = LocalStorage(tmp_path)
    version = publish(storage, pq)
    codes = tmp_path / INDEX / version / "refine.npy"
    assert np.load(codes).dtype == np.uint8 and np.load(codes).shape == (len(ids), 256)
    loaded = load_current(storage, tmp_path / "cache")
    assert isinstance(loaded.vectors.base, np.memmap) and loaded.rerank == tuned  # mapped, read as an ndarray
    assert loaded.ids.keys[0].shape == (len(ids), 32) and loaded.row_of(ids[123]) == 123 and loaded.ids[123] == ids[123]
    again = loaded.search(queries, 10)
    np.testing.assert_array_equal(again.rows, hits.rows)
    np.testing.assert_allclose(again.scores, hits.scores, atol=1e-6)
    own = loaded.search_row(7, 1)  # its stored (decoded) vector: finds itself
    assert own.rows[0, 0] == 7 and own.scores[0, 0] == pytest.approx(1.0, abs=0.02)
    from_file = load_version(storage, version, tmp_path / "cache", refine_memory_mb=0)
    assert isinstance(from_file.vectors, FileRows)
    by_file = from_file.search(queries, 10)
    np.testing.assert_array_equal(by_file.rows, hits.rows)
    np.testing.assert_allclose(by_file.scores, hits.scores, atol=1e-6)


def test_two_level_kmeans_splits_clusters_into_lists_by_their_points(real) -> None:  # type: ignore[no-untyped-def]
    """Two-level k-means: exactly ``nlist`` unit centroids, close to one-level k-means' fit, and a tiny
    first-level cluster (a few far-off points) gets a list without breaking the split."""
    import faiss

    x = power_normalize(real[0][:20000], 0.5)
    c = two_level_centroids(x, 100, seed=0)
    assert c.shape == (100, x.shape[1]) and np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-4)
    flat = faiss.Kmeans(x.shape[1], 100, niter=10, spherical=True, seed=0)
    flat.train(x)

    def fit(centroids: np.ndarray) -> float:
        return float((x @ centroids.T).max(axis=1).mean())

    assert flat.centroids is not None and fit(c) >= fit(flat.centroids) - 0.01
    assert len(np.unique((x @ c.T).argmax(axis=1))) >= 95  # (almost) every list gets rows
    odd = np.concatenate([x[:3000], normalize(-np.ones((3, x.shape[1]), np.float32))])
    c2 = two_level_centroids(odd, 64, seed=1)
    assert c2.shape == (64, x.shape[1]) and np.isfinite(c2).all()
    assert (odd[-3:] @ c2.T).max() > 0.99  # the far-off points have a list of their own


def test_many_lists_are_found_through_a_graph_over_the_centroids(real, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """From ``coarse_graph_lists`` lists the centroids are linked in an HNSW graph: a query walks it to its
    nearest lists (the ones comparing it with every centroid finds), published, loaded and in a delta."""
    vectors, ids = real
    labels: list[str | None] = [None] * len(ids)
    params = IndexParams(kind="ivf_flat", nlist=64, coarse_graph_lists=64)
    built = build_index(vectors[:-50], ids[:-50], labels[:-50], encoder_version="t", params=params)
    assert "IVF64_HNSW32" in built.manifest.factory and built.coarse_graph is not None
    assert built.manifest.plan["coarse_graph"] == 32 and built.manifest.recall.meets_target  # type: ignore[union-attr]
    assert built.manifest.train["levels"] == 2  # with the graph, k-means in two levels
    fewer = build_index(vectors[:300], ids[:300], labels[:300], encoder_version="t", params=replace(params, nlist=8))
    assert fewer.coarse_graph is None and "HNSW" not in fewer.manifest.factory  # 8 lists: compared one by one

    queries = vectors[::7]
    xt = built.transform(queries)
    _, exact = built.coarse_flat.search(xt, 8)
    _, walked = built.coarse(xt, 8)
    assert _recall(walked, exact) >= 0.99
    # a quarter of the lists or more: every centroid compared, exactly
    np.testing.assert_array_equal(built.coarse(xt, 16)[1], built.coarse_flat.search(xt, 16)[1])
    hits = built.search(queries, 10)
    assert _recall(hits.rows, built.search(queries, 10, nprobe=64).rows) >= 0.9

    # published and opened memory-mapped, as the app serves it: the same graph, the same answers
    storage = LocalStorage(tmp_path)
    publish(storage, built)
    loaded = load_current(storage, tmp_path / "cache")
    assert loaded.coarse_graph is not None
    np.testing.assert_array_equal(loaded.search(queries, 10).rows, hits.rows)
    # trained.faiss carries the graph: a delta's rows go to their nearest lists through it
    assert built.trained is not None
    delta = build_delta(
        built.trained, built.manifest, vectors[-50:], ids[-50:], labels[-50:], raw_codec=built.raw_codec
    )
    assert delta.coarse_graph is not None
    nearest = delta.coarse_flat.search(delta.transform(vectors[-50:]), 1)[1][:, 0]
    assert np.mean(np.asarray(delta.clusters) == nearest) >= 0.98


def test_ivf_pq_collection_adds_finds_and_deletes(tmp_path: Path, collection: Collection, fashion_test) -> None:  # type: ignore[no-untyped-def]
    """The product path with CLUSTERLENS_INDEX_KIND=ivf_pq: reindex, incremental add, find, delete."""
    shutil.copytree(collection.settings.data_dir, tmp_path / "data")
    storage = LocalStorage(tmp_path / "data")
    settings = make_settings(tmp_path / "data", index_refresh_seconds=0, index_kind="ivf_pq", index_pq_m=32)
    first = reindex(storage, settings, collection.encoder.version)
    assert first.mode == "full" and first.kind == "ivf_pq" and first.recall_at_10 >= 0.95  # type: ignore[operator]
    service = SearchService(settings, storage, encoder=collection.encoder)
    assert health(service.models, service.live)["index"]["kind"] == "ivf_pq"

    x, _ = fashion_test
    new_ids = [
        ingest_bytes(storage, settings, IngestItem(data=png_bytes(x[i]), source=f"new/{i}")).id for i in range(20)
    ]
    embed_pending(storage, settings, collection.encoder)
    grown = reindex(storage, settings, collection.encoder.version)
    assert grown.mode == "incremental" and grown.added == 20 and grown.kind == "ivf_pq"
    out = service.search_image(png_bytes(x[5]), 3)
    assert out["results"][0]["id"] == new_ids[5] and out["results"][0]["score"] > 0.999  # exact re-ranking

    service.live.delete(new_ids[5])
    assert new_ids[5] not in {r["id"] for r in service.search_image(png_bytes(x[5]), 10)["results"]}
    rebuilt = reindex(storage, settings, collection.encoder.version)
    assert rebuilt.mode == "full" and rebuilt.count == 1019
    assert load_current(storage, tmp_path / "cache").row_of(new_ids[5]) is None
