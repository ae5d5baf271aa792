"""`make bench-http`'s grown collection: what it stores is what the index sees, and grown rows keep their class."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from bench import http
from job.datasets import FASHION_MNIST_CLASSES
from job.embeddings import EmbeddingSet, EmbeddingStore
from shared.features import power_normalize
from tests.conftest import Collection, png

POWER = 0.5


def _held_out_set(held_out: tuple[np.ndarray, np.ndarray]) -> EmbeddingSet:
    vectors, labels = held_out
    n = len(labels)
    return EmbeddingSet(
        [f"test{i}" for i in range(n)],
        vectors,
        np.zeros((n, 0), np.int16),
        np.zeros((n, 0), np.float32),
        [],
        [FASHION_MNIST_CLASSES[int(y)] for y in labels],
    )


def test_grown_rows_are_unit_draws_that_keep_their_class(
    collection: Collection, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    train = EmbeddingStore(collection.storage, collection.encoder.version).load()  # 1,000 real, labelled
    parts, info = http.grow(train, 5000, POWER, components=4, rank=8)
    grown = list(parts)

    ids = [i for p in grown for i in p.ids]
    assert len(ids) == 5000 == len(set(ids)) and not set(ids) & set(train.ids)
    assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in ids)
    assert info["grown"] == 5000 and info["components"] <= 4 * len(grown)
    for part in grown:  # one class a part, in proportion to the class's real rows
        (label,) = set(part.labels)
        assert abs(len(part.ids) / 5000 - train.labels.count(label) / len(train.ids)) < 0.02
    stored = np.concatenate([p.vectors for p in grown])
    labels = [label or "" for p in grown for label in p.labels]
    # Stored as y ** (1 / power) of a non-negative unit draw y: its rows sum to 1 and the index's own
    # power normalisation gives back y.
    assert (stored >= 0).all() and np.allclose(stored.sum(1), 1, atol=1e-4)
    seen = power_normalize(stored, POWER)
    assert np.allclose(seen**2, stored, atol=1e-5)

    test = _held_out_set(held_out)
    rows = np.random.default_rng(0).choice(len(seen), 1000, replace=False)  # parts come class by class
    sample, sample_labels = seen[rows], [labels[r] for r in rows]
    check = http.growth_check(train, test, sample, sample_labels, POWER)
    real, fake = check[f"real_train_{len(train.ids)}"], check["grown_1000"]
    assert real["exact_precision_at_10"] > 0.6
    # Held-out queries find their class among grown rows about as often as among real ones ...
    assert fake["exact_precision_at_10"] > real["exact_precision_at_10"] - 0.1
    # ... which the check would not report for rows whose labels say nothing.
    shuffled = list(np.random.default_rng(1).permutation(sample_labels))
    assert http.growth_check(train, test, sample, shuffled, POWER)["grown_1000"]["exact_precision_at_10"] < 0.3


def test_a_grown_collection_is_served_and_measured_over_http(
    collection: Collection,
    held_out: tuple[np.ndarray, np.ndarray],
    fashion_test: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    """The benchmark's own path at a small size: shards written, the product's reindex, the real server,
    held-out PNG bodies; no errors, answers of the right class, and the real rows counted among them."""
    train = EmbeddingStore(collection.storage, collection.encoder.version).load()
    data_dir, info = tmp_path / "grown", tmp_path / "growth.json"
    parts = http.grown_collection(train, _held_out_set(held_out), 3000, POWER, info)
    built, manifest = http.served_collection(data_dir, collection.encoder.version, parts, rebuild=False)
    assert built.count == 3000 and manifest["count"] == 3000
    assert json.loads(info.read_text())["grown"] == 2000
    again, _ = http.served_collection(data_dir, collection.encoder.version, parts, rebuild=False)
    assert again.mode == "unchanged"  # the shards are written once, the index built once

    x, y = fashion_test
    bodies = [png(x[i]) for i in range(40)]
    labels = [FASHION_MNIST_CLASSES[int(c)] for c in y[:40]]
    runs, rss = http.serve_and_query(data_dir, bodies, labels, {1: 10, 4: 40}, set(train.ids))
    assert [(r["concurrency"], r["requests"], r["errors"]) for r in runs] == [(1, 10, 0), (4, 40, 0)]
    assert all(r["results_per_query"] == 10 for r in runs)
    assert runs[1]["precision_at_10"] > 0.6
    assert 0 < runs[1]["real_share_of_results"] < 1
    assert set(runs[1]["server_ms"]) == {"decode", "embed", "search", "total"}
    assert rss is not None and rss > 100
