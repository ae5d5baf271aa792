"""Whole-collection passes in bounded memory: 300 real Fashion-MNIST images in shards of about 64 rows.

The passes (retrain, analysis, head training) read the shards chunk by chunk and hold only a chunk, the
labelled rows and a seeded sample: checked through the peak they report (``rows_held_max``) against a
sample smaller than the collection, and through the requests they make on a counting storage (each shard
read, no catalogue record).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bench.scale import LatencyStorage
from job.datasets import fashion_mnist_items
from job.embeddings import EmbeddingStore, embed_pending
from job.passes import collect
from shared.encoder import ImageEncoder
from shared.ingest import ingest_bytes
from shared.labels import LabelLog
from shared.settings import Settings
from shared.storage import EMBEDDINGS, REPORTS, LocalStorage
from tests.conftest import make_settings

SIZE = 300
INGEST_LABELLED = 100  # the first images carry their class from ingest
SAMPLE = 100  # smaller than the collection: the sample is a real sample


@dataclass
class Small:
    root: Path
    settings: Settings
    version: str
    relabelled: dict[str, str]  # labels given later in the log

    def storage(self) -> LatencyStorage:
        """The collection on a storage that counts requests by kind and records each one."""
        storage = LatencyStorage(self.settings.data_dir, latency=0.0)
        storage.trace = []
        return storage


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Small:
    root = tmp_path_factory.mktemp("passes")
    settings = make_settings(root, image_size=64, embed_shard_size=64, pass_sample=SAMPLE, label_queue_size=20)
    storage = LocalStorage(settings.data_dir)
    ids: list[tuple[str, str]] = []
    for i, item in enumerate(fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=SIZE, offset=9000)):
        labelled = item if i < INGEST_LABELLED else dataclasses.replace(item, label=None)
        ids.append((ingest_bytes(storage, settings, labelled).id, str(item.label)))
    encoder = ImageEncoder(settings.encoder_dir, size=64)
    assert embed_pending(storage, settings, encoder).embedded == SIZE
    later = dict(ids[200:240]) | {i: "Bag" for i, _ in ids[:5]}  # new labels, and five changed ones
    LabelLog(storage).append(sorted(later.items()), user="test", label_set=0)
    return Small(root, settings, encoder.version, later)


def _largest_chunk(store: EmbeddingStore) -> int:
    return max(len(chunk.ids) for chunk in store.iter_chunks())


def test_collect_keeps_the_labelled_rows_and_a_seeded_sample(small: Small) -> None:
    store = EmbeddingStore(LocalStorage(small.settings.data_dir), small.version)
    everything = store.load()
    seen = collect(store, log_labels=small.relabelled, sample_size=SAMPLE)
    assert seen.ids == everything.ids and len(seen.shards) > 3
    current = {i: small.relabelled.get(i) or lab for i, lab in zip(everything.ids, everything.labels, strict=True)}
    assert [everything.ids[r] for r in seen.labelled] == [i for i in everything.ids if current[i]]
    assert seen.labels == [current[everything.ids[r]] for r in seen.labelled]
    assert np.array_equal(seen.labelled_vectors, everything.vectors[seen.labelled])
    # A seeded sample of SAMPLE rows, in row order, the same on every read.
    assert len(seen.sample) == SAMPLE and np.all(np.diff(seen.sample) > 0)
    assert np.array_equal(seen.sample_vectors, everything.vectors[seen.sample])
    assert np.array_equal(collect(store, sample_size=SAMPLE).sample, seen.sample)
    assert not np.array_equal(collect(store, sample_size=SAMPLE, seed=1).sample, seen.sample)
    # Never every row at once: a chunk, the labelled rows and the sample.
    bound = _largest_chunk(store) + len(seen.labelled) + SAMPLE
    assert seen.rows_held_max <= bound < SIZE + len(seen.labelled)
    # The second read gives the same rows, chunk by chunk, and keeps to the same bound.
    starts, parts = zip(*seen.chunks(), strict=True)
    assert np.array_equal(np.concatenate(parts), everything.vectors)
    assert list(starts) == list(np.cumsum([0] + [len(p) for p in parts[:-1]]))
    assert seen.rows_held_max <= bound
    # With room for every row, the sample is the collection.
    assert np.array_equal(collect(store, sample_size=SIZE).sample, np.arange(SIZE))


def test_retrain_streams_the_shards_and_reads_no_record(small: Small) -> None:
    from job.retrain import train_and_publish

    storage = small.storage()
    result = train_and_publish(storage, small.settings, small.version)
    assert result.version is not None and result.predictions == SIZE
    assert result.labels_used == INGEST_LABELLED + 40  # the changed five count once
    assert storage.by_kind["get embeddings/records"] == 0  # ingest labels come from the shards
    shards = EmbeddingStore(storage, small.version).shards()
    reads = Counter(t.split(" ", 1)[1] for t in storage.trace or [] if t.startswith(f"get {EMBEDDINGS}/vectors/"))
    assert reads == {f"{EMBEDDINGS}/{s}": 2 for s in shards}  # labelled rows and sample, then predictions
    bound = _largest_chunk(EmbeddingStore(storage, small.version)) + result.labels_used + SAMPLE
    assert result.rows_held_max <= bound < SIZE + result.labels_used


def test_head_training_keeps_only_the_labelled_rows(small: Small) -> None:
    from job.train_head import train_on_collection

    storage = small.storage()
    trained, version = train_on_collection(
        storage, small.settings, small.version, epochs=2, device="cpu", progress=False
    )
    assert trained.manifest.version == version and trained.manifest.train["labelled"] == INGEST_LABELLED
    assert storage.by_kind["get embeddings/records"] == 0
    shards = EmbeddingStore(storage, small.version).shards()
    reads = Counter(t.split(" ", 1)[1] for t in storage.trace or [] if t.startswith(f"get {EMBEDDINGS}/vectors/"))
    assert reads == {f"{EMBEDDINGS}/{s}": 1 for s in shards}
    assert trained.rows_held_max <= _largest_chunk(EmbeddingStore(storage, small.version)) + INGEST_LABELLED


def test_analysis_holds_a_sample_and_streams_every_image(small: Small) -> None:
    from job.run_analysis import run_analysis

    settings = make_settings(
        small.settings.data_dir,
        image_size=64,
        pass_sample=SAMPLE,
        analysis_maps=["pca"],
        analysis_pca_points=SAMPLE,
        analysis_map_sample=SAMPLE,
        analysis_silhouette_sample=SAMPLE,
        analysis_k_max=8,
    )
    storage = small.storage()
    metrics = run_analysis(storage, settings, small.version)
    assert metrics["images"] == SIZE and metrics["sample"] == SAMPLE
    assert sum(metrics["clustering"]["sizes"]) == SIZE  # every image assigned, not only the sample
    assert metrics["anomalies"]["flagged"] == round(0.05 * SIZE) and metrics["anomalies"]["fitted_on"] == SAMPLE
    assert metrics["maps"]["pca"] == {"points": SAMPLE, "of": SIZE, "seconds": metrics["maps"]["pca"]["seconds"]}
    # Records are read only for the thumbnails the figures show, never one per image.
    version = metrics["version"]
    shown = {i for ids in storage.get_json(REPORTS, f"{version}/clusters.json")["nearest"].values() for i in ids}
    shown |= {item["id"] for item in storage.get_json(REPORTS, f"{version}/anomalies.json")["items"]}
    for item in storage.get_json(REPORTS, f"{version}/mislabels.json")["items"]:
        shown |= {item["id"], *item["neighbours"]}
    records = [t for t in storage.trace or [] if t.startswith(f"get {EMBEDDINGS}/records/")]
    assert len(records) == len(set(records)) and {t.split("/")[-1].removesuffix(".json") for t in records} <= shown
    assert len(records) < SIZE / 2
    shards = EmbeddingStore(storage, small.version).shards()
    reads = Counter(t.split(" ", 1)[1] for t in storage.trace or [] if t.startswith(f"get {EMBEDDINGS}/vectors/"))
    assert reads == {f"{EMBEDDINGS}/{s}": 3 for s in shards}  # labelled rows and sample, clusters, anomalies
    labelled = metrics["labelled"]
    assert metrics["rows_held_max"] <= _largest_chunk(EmbeddingStore(storage, small.version)) + labelled + SAMPLE
    assert metrics["rows_held_max"] < SIZE + labelled
