"""Label issues on real embeddings: flipped labels of held-out Fashion-MNIST test images are found by
confident learning (cleanlab over cross-validated probabilities) and by the neighbours' vote."""

from __future__ import annotations

import numpy as np
import pytest

from job.active_learning import noisy_answers, simulate_relabel
from job.classifier import FeatureSpace
from job.label_issues import METHODS, find_issues, neighbours, out_of_sample_proba, precision_recall
from shared.features import normalize

N_CLASSES = 10


@pytest.fixture(scope="module")
def noisy(held_out: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """500 held-out images' features and unit vectors, their labels with 10% flipped at random, and
    which were flipped."""
    vectors, labels = held_out
    features = FeatureSpace(dim=64).fit(vectors).transform(vectors)
    rng = np.random.default_rng(0)
    noisy = labels.copy()
    at = rng.choice(len(labels), len(labels) // 10, replace=False)
    noisy[at] = (labels[at] + rng.integers(1, N_CLASSES, len(at))) % N_CLASSES
    return features, normalize(features), noisy, noisy != labels


def test_confident_learning_finds_random_flips(noisy: tuple[np.ndarray, ...]) -> None:
    features, unit, y, flipped = noisy
    found = find_issues(features, unit, y, N_CLASSES, "confident_learning", model="logistic")
    score = precision_recall(found.order, flipped)
    # 50 flips among 500 images, ~80% 10-NN accuracy on these features: most flips found, few false alarms
    assert score["recall"] >= 0.7 and score["precision"] >= 0.5, score
    # most suspect first: the given label's out-of-sample probability rises down the list
    given = found.given_probability[found.order]
    assert np.all(np.diff(given) >= -1e-12)
    assert found.method == "confident_learning" and found.model == "logistic"
    # the first issues are flips, and the class suggested for a flip is mostly its true one
    assert flipped[found.order[:20]].mean() >= 0.8


def test_both_methods_are_scored_on_the_same_flips(noisy: tuple[np.ndarray, ...]) -> None:
    features, unit, y, flipped = noisy
    scores = {m: precision_recall(find_issues(features, unit, y, N_CLASSES, m).order, flipped) for m in METHODS}
    assert all(s["found"] > 0 for s in scores.values()), scores
    vote = find_issues(features, unit, y, N_CLASSES, "knn_vote", min_share=0.7)
    assert np.all(vote.suggested_probability[vote.order] >= 0.7) and np.all(vote.suggested[vote.order] != y[vote.order])


def test_out_of_sample_probabilities_never_see_their_own_label(noisy: tuple[np.ndarray, ...]) -> None:
    features, _, y, flipped = noisy
    proba = out_of_sample_proba(features, y, N_CLASSES, "logistic")
    assert proba.shape == (len(y), N_CLASSES) and np.allclose(proba.sum(axis=1), 1)
    # a model that had seen a flipped label would give it weight; out of sample it rarely does
    assert proba[flipped, y[flipped]].mean() < 0.2 < proba[~flipped, y[~flipped]].mean()


def test_small_or_single_class_label_sets_flag_nothing(noisy: tuple[np.ndarray, ...]) -> None:
    features, unit, y, _ = noisy
    one_class = np.zeros(50, np.int64)
    for method in METHODS:
        assert len(find_issues(features[:50], unit[:50], one_class, N_CLASSES, method).order) == 0
        assert len(find_issues(features[:10], unit[:10], y[:10], N_CLASSES, method).order) == 0
    with pytest.raises(ValueError, match="method"):
        find_issues(features, unit, y, N_CLASSES, "vibes")
    with pytest.raises(ValueError, match="rows"):
        find_issues(features[:5], unit, y, N_CLASSES)


def test_neighbours_leave_each_row_out_even_among_exact_copies(noisy: tuple[np.ndarray, ...]) -> None:
    _, unit, _, _ = noisy
    x = np.concatenate([unit[:20], unit[:5]])  # rows 20-24 repeat rows 0-4 exactly
    scores, rows = neighbours(x, 3)
    assert rows.shape == (25, 3) and not (rows == np.arange(25)[:, None]).any()
    assert all(rows[i, 0] == i + 20 or scores[i, 0] >= 0.9999 for i in range(5))


def test_noisy_oracle_is_wrong_as_often_as_asked() -> None:
    y = np.arange(20_000) % N_CLASSES
    answers = noisy_answers(y, N_CLASSES, 0.1, np.random.default_rng(0))
    assert 0.09 < (answers != y).mean() < 0.11 and answers.min() >= 0 and answers.max() < N_CLASSES


def test_relabel_simulation_spends_the_same_answers_either_way(held_out: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, labels = held_out
    x = FeatureSpace(dim=32).fit(vectors).transform(vectors)
    run = dict(shares=(0.0, 0.5), noise=0.3, seeds=(0,), seed_frac=0.2, batch_frac=0.1, max_frac=0.4)
    curves = simulate_relabel(x[:400], labels[:400], x[400:], labels[400:], classifier="logistic", **run)
    again = simulate_relabel(x[:400], labels[:400], x[400:], labels[400:], classifier="logistic", **run)
    assert set(curves) == {"share 0", "share 0.5"}
    assert curves["share 0"].labeled_frac == curves["share 0.5"].labeled_frac == [0.2, 0.3, 0.4]
    for name, curve in curves.items():
        assert curve.accuracy == again[name].accuracy  # seeded: the same answers and picks
        assert all(0.3 < a <= 1 for a in curve.accuracy[0])
