"""The bounded-memory full build (job.stream_build) against the in-memory one, its requests, and compaction."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.scale import LatencyStorage
from job.embeddings import EmbeddingStore
from job.index_build import IndexParams, build_index, publish
from job.reindex import reindex
from job.stream_build import build_streaming, compaction_plan
from shared.catalog import Catalog
from shared.index import current_version, load_current, read_manifest
from shared.rows import FileRows
from shared.storage import EMBEDDINGS, INDEX, LocalStorage
from tests.conftest import Collection, make_settings


def _copy(collection: Collection, tmp_path: Path) -> LatencyStorage:
    shutil.copytree(collection.settings.data_dir, tmp_path / "data")
    return LatencyStorage(tmp_path / "data", latency=0.0)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_streamed_build_is_the_in_memory_build(
    collection: Collection, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path, kind: str
) -> None:
    """Up to the sample size the streamed build trains on every row, as build_index does: same lists,
    same gate, same answers (the IVF-PQ re-ranking file read back row by row)."""
    storage = collection.storage
    store = EmbeddingStore(storage, collection.encoder.version)
    params = replace(IndexParams(), kind=kind)
    emb = store.load()
    memory = build_index(
        emb.vectors,
        emb.ids,
        emb.labels,
        encoder_version=store.encoder_version,
        params=params,
        class_top=emb.top_class,
        class_prob=emb.top_prob,
        ingested=emb.ingested,
    )
    streamed = build_streaming(
        store, Catalog(storage), store.shards(), deleted=set(), params=params, workdir=tmp_path
    ).index
    assert streamed.manifest.factory == memory.manifest.factory
    assert streamed.count == memory.count == len(emb.ids)
    assert streamed.nprobe == memory.nprobe and streamed.rerank == memory.rerank
    assert streamed.manifest.recall is not None and memory.manifest.recall is not None
    assert abs(streamed.manifest.recall.at_10 - memory.manifest.recall.at_10) <= 0.002
    np.testing.assert_array_equal(streamed.clusters, memory.clusters)
    np.testing.assert_array_equal(streamed.labels, memory.labels)
    np.testing.assert_array_equal(streamed.ingested, memory.ingested)
    queries = held_out[0][:100]
    a, b = streamed.search(queries, 10), memory.search(queries, 10)
    assert (a.rows == b.rows).mean() >= 0.99
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    if kind == "ivf_pq":
        assert isinstance(streamed.vectors, FileRows)
        rows = np.array([0, 5, 999])
        diff = streamed.vectors[rows].astype(int) - np.asarray(memory.vectors)[rows]  # type: ignore[index]
        assert np.abs(diff).max() <= 1  # the same 8-bit codes (a rounding apart at most)
    # the raw codes (PCA is on): written to a file, the same codes, the gate judged in the raw space
    assert isinstance(streamed.raw, FileRows) and streamed.raw_rerank == memory.raw_rerank > 0
    assert streamed.manifest.recall.space == memory.manifest.recall.space == "raw"
    raw_diff = streamed.raw[np.array([0, 5, 999])].astype(int) - np.asarray(memory.raw)[[0, 5, 999]]
    assert np.abs(raw_diff).max() <= 1
    # published from its files as they are, loaded back like any version
    published = tmp_path / "published"
    publish(LocalStorage(published), streamed)
    loaded = load_current(LocalStorage(published), tmp_path / "cache")
    assert loaded.ids.tolist() == emb.ids and loaded.row_of(emb.ids[7]) == 7
    np.testing.assert_array_equal(loaded.search(queries, 10).rows, a.rows)


def test_full_reindex_reads_each_shard_twice_and_no_record(collection: Collection, tmp_path: Path) -> None:
    storage = _copy(collection, tmp_path)
    shards = EmbeddingStore(storage, collection.encoder.version).shards()
    storage.reset()
    result = reindex(storage, make_settings(storage.root), collection.encoder.version, force=True)
    assert result.mode == "full" and result.count == 1000
    assert storage.by_kind["get embeddings/vectors"] == 2 * len(shards)
    assert not [k for k in storage.by_kind if k.startswith("get embeddings/records")]
    assert storage.requests < 60  # listings, the index's files and pointer: none per image


def _split_into_small_shards(storage: LocalStorage, version: str, rows: int) -> tuple[list[str], list[str]]:
    """The collection's one shard as shards of ``rows`` rows, plus a retried shard repeating 50 of them
    (its index dropped: it was built on the shard that is gone)."""
    for name in list(storage.list(INDEX)):
        storage.delete(INDEX, name)
    store = EmbeddingStore(storage, version)
    emb = store.load()
    (old,) = store.shards()
    storage.delete(EMBEDDINGS, old)
    logits = np.zeros((len(emb.ids), 1000), np.float32)
    logits[np.arange(len(emb.ids)), emb.top_class[:, 0]] = 10  # keeps each row's top class
    catalog = Catalog(storage)
    records = [catalog.get(i) for i in emb.ids]
    for start in [*range(0, len(emb.ids), rows), 100]:
        end = start + (rows if start != 100 or start % rows == 0 else 50)
        store.write_shard(emb.ids[start:end], emb.vectors[start:end], logits[start:end], records[start:end])
    return emb.ids, store.shards()


def test_compaction_keeps_every_id_once_and_deletes_a_generation_later(
    collection: Collection, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    storage = _copy(collection, tmp_path)
    version = collection.encoder.version
    ids, small = _split_into_small_shards(storage, version, 100)  # 11 shards, 1,050 rows
    settings = make_settings(storage.root, embed_compact_rows=300)  # shards under 150 rows are small
    assert compaction_plan(small, 300) == small
    store = EmbeddingStore(storage, version)

    first = reindex(storage, settings, version)
    manifest = read_manifest(storage, first.version)
    compacted = sorted(manifest.shard_names)
    assert first.mode == "full" and first.count == 1000
    assert set(manifest.source["replaced"]) == set(small)
    assert not manifest.shard_names & set(small)
    stored = [i for name in compacted for i in store._read_table(name, ["id"]).column("id").to_pylist()]
    assert sorted(stored) == sorted(ids)  # every id exactly once
    assert set(small) <= set(store.shards())  # the replaced shards stay until the next full build
    assert reindex(storage, settings, version).mode == "unchanged"  # listed, but never read again

    # an incremental reindex still works on the compacted shards
    new_ids = [f"{i:064x}" for i in range(100)]
    store.write_shard(new_ids, held_out[0][:100], np.zeros((100, 1000), np.float32))
    grown = reindex(storage, settings, version)
    assert grown.mode == "incremental" and grown.count == 1100
    assert set(small) <= set(store.shards())
    index = load_current(storage, tmp_path / "cache")
    assert index.row_of(new_ids[3]) is not None and index.row_of(ids[3]) is not None

    # the next full build deletes what the first compaction replaced, and nothing else
    storage.reset()
    full = reindex(storage, settings, version, force=True)
    assert full.mode == "full" and full.count == 1100
    left = set(store.shards())
    assert not left & set(small)
    assert set(compacted) <= left | set(read_manifest(storage, full.version).source.get("replaced", []))
    assert storage.by_kind["delete embeddings/vectors"] == len(small)
    assert current_version(storage) == full.version


def test_no_compaction_below_its_threshold() -> None:
    names = [f"v/part-x-{i:08x}-{n:06d}.parquet" for i, n in enumerate([2000, 60000, 2000, 2000])]
    assert compaction_plan(names, 100_000) == []  # small ones hold fewer than 100,000 rows between them
    assert compaction_plan(names, 0) == []
    assert compaction_plan(names, 5000) == [names[0], *names[2:]]  # under 2,500 rows, 6,000 between them
    assert compaction_plan(names, 7000) == []
