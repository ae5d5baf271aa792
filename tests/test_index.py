"""The cluster-routed index against brute force on real embeddings, and versioned publishing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from job.embeddings import EmbeddingStore
from job.index_build import IndexParams, build_index, extend_index, publish
from job.reindex import reindex
from shared.class_lists import SegmentLists
from shared.errors import VersionMismatch
from shared.features import power_normalize
from shared.filters import SearchFilters
from shared.index import ClusterIndex, current_version, list_versions, load_current, pretransform
from shared.search import SearchService
from shared.storage import INDEX, LocalStorage
from tests.conftest import Collection, make_settings
from tests.test_text_search import assert_same_top


@pytest.fixture(scope="module")
def real(collection: Collection) -> tuple[np.ndarray, list[str], list[str | None]]:
    emb = EmbeddingStore(collection.storage, collection.encoder.version).load()
    index = collection.service.index()
    labels = [index.label_of(int(index.row_of(i))) for i in emb.ids]  # type: ignore[arg-type]
    return emb.vectors, emb.ids, labels


def _build(real, **params) -> ClusterIndex:  # type: ignore[no-untyped-def]
    vectors, ids, labels = real
    return build_index(vectors, ids, labels, encoder_version="test", params=IndexParams(kind="ivf_flat", **params))


def test_probing_every_cluster_equals_brute_force(real) -> None:  # type: ignore[no-untyped-def]
    """Every cluster probed: the PCA space's exact top ``k * raw_rerank``, re-ranked by raw cosine from the
    8-bit raw codes, which finds (nearly) the raw embeddings' exact top 10, where PCA alone does not."""
    index = _build(real)
    assert index.raw is not None and index.raw_codec is not None and index.raw_rerank in (3, 4, 5, 10, 20)
    index.raw_rerank = 5  # the plan's factor (the gate may choose another: it has no say at every list)
    vectors = real[0]
    queries = vectors[::50]
    xr_db, xr_q = power_normalize(vectors, 0.5), power_normalize(queries, 0.5)
    xt_db, xt_q = pretransform(index.index, xr_db), pretransform(index.index, xr_q)
    shortlist = np.argsort(-(xt_q @ xt_db.T), axis=1)[:, : 10 * index.raw_rerank]
    decoded = index.raw_codec.decode(np.asarray(index.raw))
    decoded /= np.linalg.norm(decoded, axis=1, keepdims=True)
    raw_scores = np.take_along_axis(xr_q @ decoded.T, shortlist, 1)
    expected = np.take_along_axis(shortlist, np.argsort(-raw_scores, axis=1)[:, :10], 1)
    hits = index.search(queries, 10, nprobe=index.ivf.nlist)
    for got, want in zip(hits.rows, expected, strict=True):
        assert len(set(got) & set(want)) >= 9  # ties at the 10th place may swap
    assert np.allclose(
        np.sort(hits.scores, axis=1), np.sort(np.take_along_axis(xr_q @ decoded.T, expected, 1), axis=1), atol=1e-4
    )
    exact_raw = np.argsort(-(xr_q @ xr_db.T), axis=1)[:, :10]
    exact_pca = np.argsort(-(xt_q @ xt_db.T), axis=1)[:, :10]

    def recall(found: np.ndarray) -> float:
        return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact_raw, strict=True)]))

    print(f"recall vs raw: re-ranked {recall(hits.rows):.3f}, PCA alone {recall(exact_pca):.3f}")
    assert recall(hits.rows) >= 0.97
    assert recall(hits.rows) >= recall(exact_pca) + 0.05


def test_default_probe_recall_against_exact(real) -> None:  # type: ignore[no-untyped-def]
    index = _build(real)
    queries = real[0][::10]
    exact = index.search(queries, 10, nprobe=index.ivf.nlist).rows
    approx = index.search(queries, 10).rows
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9, recall
    # one query at a time (the serving path) finds what the batch found, with the same raw cosines
    batch = index.search(queries[:40], 10)
    for i in range(40):
        one = index.search(queries[i : i + 1], 10)
        np.testing.assert_array_equal(np.sort(one.rows[0]), np.sort(batch.rows[i]))
        np.testing.assert_allclose(one.scores[0], batch.scores[i], atol=1e-6)
    few = index.search(queries[:1], 10, filters=SearchFilters(cluster=int(index.clusters[0])))
    assert (few.rows[0] >= 0).sum() == min(10, int((np.asarray(index.clusters) == index.clusters[0]).sum()))


def test_results_come_only_from_probed_clusters(real) -> None:  # type: ignore[no-untyped-def]
    index = _build(real, nprobe=2)
    hits = index.search(real[0][:20], 10)
    assert hits.probe.shape == (20, 2)
    for rows, probe in zip(hits.rows, hits.probe, strict=True):
        assert set(index.clusters[rows[rows >= 0]]) <= set(probe)
    wider = index.search(real[0][:20], 10, nprobe=6)  # per-query override, index unchanged
    assert wider.probe.shape == (20, 6) and index.nprobe == 2


def test_without_pca_and_tiny_collections(real) -> None:  # type: ignore[no-untyped-def]
    vectors, ids, labels = real
    flat = build_index(vectors, ids, labels, encoder_version="t", params=IndexParams(kind="ivf_flat", pca_dim=0))
    assert flat.manifest.factory.startswith("IVF") and flat.manifest.dim == 1280
    tiny = build_index(vectors[:3], ids[:3], labels[:3], encoder_version="t", params=IndexParams(kind="ivf_flat"))
    assert tiny.manifest.nlist == 1 and tiny.manifest.pca_dim == 0
    rows = tiny.search(vectors[:1], 3).rows[0]
    assert rows[0] == 0 and set(rows) == {0, 1, 2}
    with pytest.raises(ValueError):
        build_index(vectors[:0], [], [], encoder_version="t", params=IndexParams(kind="ivf_flat"))
    with pytest.raises(ValueError):
        build_index(vectors[:3], ids[:2], labels[:3], encoder_version="t", params=IndexParams(kind="ivf_flat"))


def test_publish_swaps_pointer_and_readers_follow(tmp_path: Path, real, collection: Collection) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    settings = make_settings(tmp_path, index_refresh_seconds=0)
    v1 = publish(storage, _build(real))
    service = SearchService(settings, storage, encoder=collection.encoder)
    assert service.index().manifest.version == v1 == "v000001"
    vectors, ids, labels = real
    v2 = publish(
        storage,
        build_index(
            vectors[:500], ids[:500], labels[:500], encoder_version="test", params=IndexParams(kind="ivf_flat")
        ),
    )
    assert current_version(storage) == v2 == "v000002"
    assert service.index().count == 500  # the reader noticed without a restart
    for _ in range(3):
        publish(
            storage,
            build_index(
                vectors[:100], ids[:100], labels[:100], encoder_version="test", params=IndexParams(kind="ivf_flat")
            ),
            keep=3,
        )
    assert list_versions(storage) == ["v000003", "v000004", "v000005"]
    loaded = load_current(storage, tmp_path / "cache")
    assert loaded.manifest.version == "v000005" and loaded.mapped is not None  # lists memory-mapped from the file
    small = build_index(
        vectors[:100], ids[:100], labels[:100], encoder_version="test", params=IndexParams(kind="ivf_flat")
    )
    np.testing.assert_array_equal(loaded.search(vectors[:20], 5).rows, small.search(vectors[:20], 5).rows)
    np.testing.assert_allclose(loaded.ivf.reconstruct(7), small.ivf.reconstruct(7), atol=1e-6)


def test_reindex_skips_when_nothing_changed(collection: Collection) -> None:
    before = current_version(collection.storage)
    result = reindex(collection.storage, collection.settings, collection.encoder.version)
    assert not result.built and result.version == before
    assert current_version(collection.storage) == before


def test_index_from_another_encoder_is_refused(tmp_path: Path, real, collection: Collection) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    publish(storage, _build(real))  # encoder_version="test"
    service = SearchService(make_settings(tmp_path), storage, encoder=collection.encoder)
    from tests.conftest import png

    with pytest.raises(VersionMismatch):
        service.search_image(png(np.zeros((28, 28), np.uint8)))


def test_a_broken_pointer_does_not_break_live_queries(tmp_path: Path, real, collection: Collection) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path)
    publish(storage, _build(real))
    service = SearchService(make_settings(tmp_path, index_refresh_seconds=0), storage, encoder=collection.encoder)
    assert service.index().manifest.version == "v000001"
    storage.put_json("index", "CURRENT.json", {"version": "v000042"})  # points at nothing
    assert service.index().manifest.version == "v000001"  # still serving
    storage.put(INDEX, "CURRENT.json", b"{not json")
    assert service.index().count == len(real[1])
    fresh = SearchService(make_settings(tmp_path), storage, encoder=collection.encoder)
    with pytest.raises(Exception):  # noqa: B017 - a worker with nothing loaded must fail loudly
        fresh.index()


def test_nprobe_is_tuned_to_the_recall_target(real, collection: Collection, fashion_test) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    index = _build(real)
    recall = index.manifest.recall
    assert recall is not None and recall.meets_target and recall.at_10 >= 0.95 and recall.sample == 1000
    curve = recall.curve
    assert recall.nprobe == index.nprobe == index.manifest.nprobe
    # a setting reaches the target when its mean less one standard error does (so it holds off the sample)
    at: dict[int, float] = {}
    for c in curve:
        at[c["nprobe"]] = max(at.get(c["nprobe"], 0.0), c["recall_at_10"] - c["stderr"])
    assert all(0 < c["stderr"] < 0.01 for c in curve)
    smallest = min(p for p, r in at.items() if r >= 0.95)
    # bisected, not doubled: the nprobe just below the smallest that reaches was measured and fell short
    assert smallest == 1 or at[smallest - 1] < 0.95
    assert [c["nprobe"] for c in curve] == sorted(c["nprobe"] for c in curve)
    # of the settings that reach the target (up to half as many lists again), the cheapest by the cost model
    reaching = [c for c in curve if c["recall_at_10"] - c["stderr"] >= 0.95]
    chosen = min(reaching, key=lambda c: c["cost_us"])
    assert (chosen["nprobe"], chosen["raw_rerank"]) == (index.nprobe, index.raw_rerank)
    # every setting measured only there and up to half as many lists again (the search measured the widest alone)
    full = {c["nprobe"] for c in curve if sum(d["nprobe"] == c["nprobe"] for d in curve) > 1}
    assert min(full) == smallest and max(full) <= smallest + smallest // 2
    assert smallest <= index.nprobe <= smallest + smallest // 2

    # The estimate holds for queries the index has never seen: 300 held-out test images.
    x, _ = fashion_test
    queries = collection.encoder.encode([Image.fromarray(p).convert("RGB") for p in x[:300]]).vectors
    exact = index.search(queries, 10, nprobe=index.ivf.nlist).rows
    approx = index.search(queries, 10).rows
    held_out = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert held_out >= 0.93, held_out

    fixed = _build(real, nprobe=1, recall_target=0.99)
    assert fixed.nprobe == 1 and fixed.manifest.recall is not None and not fixed.manifest.recall.meets_target
    assert {c["nprobe"] for c in fixed.manifest.recall.curve} == {1}
    # measured against the raw embeddings' exact neighbours, the raw shortlist tuned with nprobe
    assert recall.space == "raw" and recall.raw_rerank == index.raw_rerank == index.manifest.raw_rerank
    assert {c["raw_rerank"] for c in curve} == {3, 4, 5, 10, 20}


def test_an_index_below_its_recall_target_is_not_published(tmp_path: Path, collection: Collection) -> None:
    import shutil

    from shared.errors import QualityGate

    shutil.copytree(collection.settings.data_dir, tmp_path / "data")
    storage = LocalStorage(tmp_path / "data")
    before = current_version(storage)
    strict = make_settings(tmp_path / "data", index_kind="ivf_flat", index_nprobe=1, index_recall_target=0.99)
    with pytest.raises(QualityGate, match="below the target"):
        reindex(storage, strict, collection.encoder.version)
    assert current_version(storage) == before and list_versions(storage) == [before]
    forced = reindex(storage, strict, collection.encoder.version, force=True)
    assert forced.built and forced.nprobe == 1 and current_version(storage) == forced.version != before


def test_rollback_moves_the_pointer_and_readers_follow(tmp_path: Path, real, collection: Collection) -> None:  # type: ignore[no-untyped-def]
    from shared.errors import NotFound, NotReady
    from shared.index import rollback

    storage = LocalStorage(tmp_path)
    with pytest.raises(NotReady):
        rollback(storage)
    vectors, ids, labels = real
    v1 = publish(storage, _build(real))
    with pytest.raises(NotReady, match="nothing to roll back to"):
        rollback(storage)
    v2 = publish(
        storage,
        build_index(
            vectors[:300], ids[:300], labels[:300], encoder_version="test", params=IndexParams(kind="ivf_flat")
        ),
    )
    service = SearchService(make_settings(tmp_path, index_refresh_seconds=0), storage, encoder=collection.encoder)
    assert service.index().count == 300
    assert rollback(storage) == (v2, v1)
    assert current_version(storage) == v1 and service.index().count == len(ids)  # no restart needed
    assert rollback(storage, to=v2) == (v1, v2) and service.index().count == 300
    with pytest.raises(NotFound, match="v000042"):
        rollback(storage, to="v000042")


def test_new_images_are_added_without_retraining(tmp_path: Path, collection: Collection, fashion_test) -> None:  # type: ignore[no-untyped-def]
    """Incremental reindex: new images join the existing clusters, are found at once, and a big growth retrains."""
    import shutil

    from job.datasets import png_bytes
    from job.embeddings import embed_pending
    from shared.ingest import IngestItem, ingest_bytes

    shutil.copytree(collection.settings.data_dir, tmp_path / "data")
    storage = LocalStorage(tmp_path / "data")
    settings = make_settings(tmp_path / "data", index_refresh_seconds=0)
    before = load_current(storage, tmp_path / "cache")
    service = SearchService(settings, storage, encoder=collection.encoder)
    assert service.index().count == 1000

    x, _ = fashion_test
    new_ids = []
    for i in range(30):
        item = IngestItem(data=png_bytes(x[i]), source=f"new/{i}", label="New" if i < 3 else None)
        new_ids.append(ingest_bytes(storage, settings, item).id)
    embed_pending(storage, settings, collection.encoder)
    result = reindex(storage, settings, collection.encoder.version)
    assert result.mode == "incremental" and result.added == 30 and result.count == 1030
    grown = load_current(storage, tmp_path / "cache")
    assert {k: grown.manifest.incremental[k] for k in ("from", "added")} == {  # type: ignore[index]
        "from": before.manifest.version,
        "added": 30,
    }
    # a delta segment: the new version's folder holds the 30 new rows only, the base stays where it was
    base = before.manifest.version
    assert [(s["version"], s["rows"]) for s in grown.manifest.segments] == [(base, 1000), (grown.manifest.version, 30)]
    assert len(np.load(storage.local_path(INDEX, f"{grown.manifest.version}/ids.npy"))) == 30  # type: ignore[arg-type]
    assert grown.manifest.trained_count == 1000 and grown.manifest.nlist == before.manifest.nlist
    assert grown.manifest.recall is not None and grown.manifest.recall.meets_target
    centroids = before.ivf.quantizer.reconstruct_n(0, before.ivf.nlist)
    np.testing.assert_array_equal(grown.ivf.quantizer.reconstruct_n(0, grown.ivf.nlist), centroids)
    assert grown.label_of(int(grown.row_of(new_ids[0]))) == "New"  # type: ignore[arg-type]
    assert grown.label_of(int(grown.row_of(str(before.ids[0])))) == before.label_of(0)  # type: ignore[arg-type]
    # text search reads each segment's own class lists (nothing rebuilt at load) and still ranks like a full scan
    assert isinstance(grown.class_lists, SegmentLists) and len(grown.class_lists.parts) == 2
    assert_same_top(grown, service.models.text(), ("a bag", "a cat", "a cup of coffee", "fire engine"), (1, 10, 100))

    # The live service picks it up and finds a new image by its own bytes, first.
    out = service.search_image(png_bytes(x[7]), 3)
    assert out["results"][0]["id"] == new_ids[7] and out["results"][0]["score"] > 0.999
    assert service.search_id(new_ids[0], 1, None)["results"][0]["label"] == "New"
    assert reindex(storage, settings, collection.encoder.version).mode == "unchanged"
    assert extend_index(grown, np.zeros((0, 1280), np.float32), [], []).count == 1030  # a retried shard: nothing new
    with pytest.raises(ValueError, match="already"):
        extend_index(grown, np.zeros((1, 1280), np.float32), [new_ids[0]], [None])

    # Growth past the retrain share (here 1%) trains the clusters again.
    for i in range(30, 50):
        ingest_bytes(storage, settings, IngestItem(data=png_bytes(x[i]), source=f"new/{i}"))
    embed_pending(storage, settings, collection.encoder)
    strict = make_settings(tmp_path / "data", index_retrain_fraction=0.01)
    full = reindex(storage, strict, collection.encoder.version)
    assert full.mode == "full" and full.count == 1050
    assert "incremental" not in load_current(storage, tmp_path / "cache").manifest


def test_small_additions_become_delta_segments_merged_like_a_binary_counter(  # type: ignore[no-untyped-def]
    collection: Collection, fashion_test, tmp_path: Path
) -> None:
    """Each incremental reindex writes its new rows only, reads the base's trained index (not its lists),
    merges older deltas no bigger than the new one, and the base survives pruning while referenced."""
    import shutil

    from bench.scale import LatencyStorage
    from job.datasets import png_bytes
    from job.embeddings import embed_pending
    from shared.ingest import IngestItem, ingest_bytes

    shutil.copytree(collection.settings.data_dir, tmp_path / "data")
    storage = LatencyStorage(tmp_path / "data", latency=0.0)
    settings = make_settings(tmp_path / "data", index_keep_versions=2)
    base = load_current(storage, tmp_path / "cache").manifest.version
    x, _ = fashion_test
    shapes, added = [], []
    for step in range(4):
        for i in range(100 + 10 * step, 110 + 10 * step):
            added.append(ingest_bytes(storage, settings, IngestItem(data=png_bytes(x[i]), source=f"d/{i}")).id)
        embed_pending(storage, settings, collection.encoder)
        storage.trace = []
        result = reindex(storage, settings, collection.encoder.version)
        assert result.mode == "incremental" and result.added == 10
        # of the base, only its trained index (and manifest) is read: none of its lists or row files
        touched = {t.split(" ")[1] for t in storage.trace if f"index/{base}/" in t}
        assert f"index/{base}/trained.faiss" in touched, touched
        small = {f"index/{base}/{name}" for name in ("trained.faiss", "manifest.json", "raw_codec.npy")}
        assert touched <= small, touched  # the base's trained index and codecs, never its rows
        grown = load_current(storage, tmp_path / "cache")
        shapes.append([s["rows"] for s in grown.manifest.segments])
        assert grown.count == grown.manifest.count == 1000 + 10 * (step + 1)
        for image_id in added:  # every added image is found, by its own vector, first
            row = grown.row_of(image_id)
            assert row is not None and int(grown.search_row(row, 1).rows[0, 0]) == row
    assert shapes == [[1000, 10], [1000, 20], [1000, 20, 10], [1000, 40]]
    assert storage.exists(INDEX, f"{base}/manifest.json")  # pruned past keep=2, but still referenced
    # an image embedded twice (a retried shard) answers once: its later row is hidden
    again = EmbeddingStore(storage, collection.encoder.version).load()
    row = again.ids.index(added[0])
    EmbeddingStore(storage, collection.encoder.version).write_shard(
        [added[0]], again.vectors[row : row + 1], np.zeros((1, 1000), np.float32)
    )
    reindex(storage, settings, collection.encoder.version)
    grown = load_current(storage, tmp_path / "cache")
    assert grown.count == 1041 and len(grown.duplicates) == 1
    hits = grown.search_row(int(grown.row_of(added[0])), 5)  # type: ignore[arg-type]
    assert [str(grown.ids[r]) for r in hits.rows[0]].count(added[0]) <= 1
