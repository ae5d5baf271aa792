"""Multi-label classification on real images: 2 x 2 mosaics of Fashion-MNIST items labelled with the
classes they show, one-vs-rest and joint (sigmoid) models, per-label thresholds, metrics, uncertainty."""

from __future__ import annotations

import numpy as np
import pytest

from job.multilabel import CELL, OneVsRest, mosaics, multilabel_metrics, tune_thresholds, uncertainty


@pytest.fixture(scope="module")
def made(fashion_test: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = fashion_test
    pixels, sets = mosaics(x[:5000], y[:5000], 1000, 10, np.random.default_rng(0))
    return x[:5000], y[:5000], pixels, sets


def test_mosaics_show_exactly_their_labels(made: tuple[np.ndarray, ...]) -> None:
    items, classes, pixels, sets = made
    assert pixels.shape == (1000, 2 * CELL, 2 * CELL) and sets.shape == (1000, 10)
    assert sorted(np.unique(sets.sum(axis=1)).tolist()) == [1, 2, 3, 4]  # 1-4 distinct classes
    lookup = {items[i].tobytes(): int(classes[i]) for i in range(len(items))}
    for m in range(50):  # every cell is an item of the mosaic's classes, and every class is shown
        shown = set()
        for r in range(2):
            for c in range(2):
                cell = pixels[m, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
                shown.add(lookup[np.ascontiguousarray(cell).tobytes()])
        assert shown == set(np.flatnonzero(sets[m]).tolist())
    with pytest.raises(ValueError, match="every class needs items"):
        mosaics(items, np.zeros(len(items), np.int64), 2, 10, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_models_learn_the_label_sets_from_pixels(made: tuple[np.ndarray, ...], kind: str) -> None:
    _, _, pixels, sets = made
    # 14 x 14 per quadrant (every other pixel): enough for a linear model to see which items are where
    x = pixels[:, ::2, ::2].reshape(len(pixels), -1).astype(np.float32) / 255.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train, held, test = slice(0, 600), slice(600, 800), slice(800, 1000)
    model = OneVsRest(kind, seed=0).fit(x[train], sets[train])
    thresholds = tune_thresholds(model.predict_proba(x[held]), sets[held])
    m = multilabel_metrics(model.predict_proba(x[test]), sets[test], thresholds, [str(c) for c in range(10)])
    assert m["micro_f1"] > 0.6 and m["mAP"] > 0.6 and set(m["per_label"]) == {str(c) for c in range(10)}
    always = sets[train].copy()
    always[:, 3] = False  # a label no labelled image has: a constant, not an error
    proba = OneVsRest(kind, seed=0).fit(x[train], always).predict_proba(x[test])
    assert proba.shape == (200, 10) and (proba[:, 3] == 0).all()


def test_thresholds_metrics_and_uncertainty_by_hand() -> None:
    proba = np.array([[0.9, 0.2], [0.6, 0.4], [0.3, 0.8], [0.1, 0.45]])
    truth = np.array([[True, False], [True, True], [False, True], [False, False]])
    t = tune_thresholds(proba, truth)
    # halfway below the last one kept: a keeps 0.9, 0.6 (F1 1); b keeps 0.8, 0.45, 0.4 (F1 0.8, its best)
    assert t[0] == pytest.approx(0.45, abs=1e-6) and t[1] == pytest.approx(0.3, abs=1e-6)
    m = multilabel_metrics(proba, truth, t, ["a", "b"])
    # tp 4, fp 1 (b at 0.45), fn 0; b's average precision (1 + 2/3) / 2
    assert m["micro_f1"] == pytest.approx(8 / 9, abs=1e-4) and m["exact_set"] == 0.75
    assert m["mAP"] == pytest.approx((1 + 5 / 6) / 2, abs=1e-4)
    m = multilabel_metrics(proba, truth, np.array([0.5, 0.5]), ["a", "b"])
    # label a: 2 of 2; label b: 0.8 only (0.4 missed): tp 3, fp 0, fn 1 -> micro-F1 6/7
    assert m["micro_f1"] == pytest.approx(6 / 7, abs=1e-4) and m["per_label"]["b"]["recall"] == 0.5
    sure = np.array([[0.99, 0.01], [0.5, 0.5], [0.9, 0.55]])
    assert np.argmax(uncertainty(sure, "mean_entropy")) == 1
    assert uncertainty(sure, "min_margin").tolist()[0] < uncertainty(sure, "min_margin")[2] < 1.0
    assert np.argmax(uncertainty(sure, "cardinality")) == 1
    with pytest.raises(ValueError, match="strategy"):
        uncertainty(sure, "random")
