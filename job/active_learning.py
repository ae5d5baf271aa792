"""Active learning: which images to label next, and the simulation that shows it pays.

Strategies are small functions over ``predict_proba`` output (n, classes), so any classifier plugs in
(modAL's design): ``least_confidence`` (1 - max p), ``margin`` (1 - (p1 - p2)), ``entropy``; higher
means less sure. ``random`` is the baseline. Pure top-k uncertainty picks near-duplicates (a run of
look-alike shirts the model is equally unsure about), so :func:`select_batch` diversifies: it takes
the ``pool_factor`` x n most uncertain, clusters them with k-means on their features and picks
round-robin across the clusters, most uncertain first in each (Zhdanov 2019, "Diverse mini-batch
active learning"). An optional class-balance guard caps any one predicted class's share of a batch.

The classifiers the loop trains are the product's (:mod:`job.classifier`: LightGBM by default,
logistic regression, kNN, on :class:`job.classifier.FeatureSpace` features).

Imports numpy and faiss at the top; scikit-learn and LightGBM load inside the functions that use
them (job side only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from job.classifier import fit_classifier, full_proba
from shared.labels import STRATEGIES

log = logging.getLogger(__name__)

UNCERTAINTY_STRATEGIES = STRATEGIES[1:]
CLASSIFIERS = ("lightgbm", "logistic", "knn")


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probabilities must be (n, classes), got shape {probs.shape}")
    return probs


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """1 - max p per row: (n, classes) -> (n,)."""
    return 1.0 - _check_probs(probs).max(axis=1)


def margin(probs: np.ndarray) -> np.ndarray:
    """1 - (p1 - p2), the gap between the two most probable classes: (n, classes) -> (n,)."""
    probs = _check_probs(probs)
    if probs.shape[1] == 1:
        return np.zeros(len(probs))
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats, -sum p log p: (n, classes) -> (n,)."""
    probs = _check_probs(probs)
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return -(probs * logs).sum(axis=1)


_SCORERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "least_confidence": least_confidence,
    "margin": margin,
    "entropy": entropy,
}


def uncertainty(probs: np.ndarray, strategy: str) -> np.ndarray:
    """Uncertainty by a named strategy (higher: less sure).

    Raises:
        ValueError: for an unknown strategy (``random`` has no uncertainty).
    """
    if strategy not in _SCORERS:
        raise ValueError(f"strategy must be one of {', '.join(_SCORERS)}")
    return _SCORERS[strategy](probs)


def diverse_order(
    scores: np.ndarray,
    features: np.ndarray,
    n: int,
    *,
    pool_factor: float = 3.0,
    n_clusters: int | None = None,
    seed: int = 0,
    groups: np.ndarray | None = None,
    max_group_share: float | None = None,
) -> np.ndarray:
    """Pick ``n`` rows that are uncertain and unlike each other.

    The ``pool_factor * n`` highest-scoring rows are clustered (k-means on ``features``, ``n_clusters``
    clusters, default ``n``); rows are then taken round-robin over the clusters, each cluster's
    highest score first, clusters visited in order of their best score.

    Args:
        scores: (m,) uncertainty, higher first.
        features: (m, d) float32 features of the same rows.
        n: how many to pick.
        pool_factor: size of the uncertain pool relative to n (1 gives pure top-n).
        n_clusters: clusters in the pool (default n: at most one pick per cluster until all are used).
        seed: k-means seed.
        groups: (m,) optional group of each row (the predicted class) for the balance guard.
        max_group_share: with ``groups``, at most this share of the picks from one group while
            other groups have candidates left (looking past the pool if it must).

    Returns:
        int64 (min(n, m),) row indices in pick order.

    Raises:
        ValueError: on mismatched shapes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    features = np.asarray(features, dtype=np.float32)
    if scores.ndim != 1 or features.ndim != 2 or len(features) != len(scores):
        raise ValueError(f"scores (m,) and features (m, d) must agree, got {scores.shape} and {features.shape}")
    if groups is not None and len(groups) != len(scores):
        raise ValueError("groups must have one entry per row")
    n = min(int(n), len(scores))
    if n <= 0:
        return np.zeros(0, np.int64)
    pool_size = min(len(scores), max(n, int(round(pool_factor * n))))
    ranked = np.argsort(-scores, kind="stable")
    pool = ranked[:pool_size]
    c = min(n_clusters or n, pool_size)
    if c > 1 and pool_size > c:
        assign = _kmeans_assign(features[pool], c, seed)
    else:
        assign = np.arange(pool_size) % max(c, 1)
    # Each cluster's members best-first (pool is already in score order).
    members: dict[int, list[int]] = {}
    for pos, cluster in enumerate(assign):
        members.setdefault(int(cluster), []).append(int(pool[pos]))
    queues = sorted(members.values(), key=lambda rows: -scores[rows[0]])
    cap = None
    if groups is not None and max_group_share is not None:
        cap = max(1, int(np.ceil(max_group_share * n)))
    taken: list[int] = []
    held: list[int] = []  # over the group cap: used only if nothing else is left
    counts: dict[Any, int] = {}
    heads = [0] * len(queues)
    while len(taken) < n:
        progressed = False
        for qi, rows in enumerate(queues):
            if heads[qi] >= len(rows) or len(taken) >= n:
                continue
            row = rows[heads[qi]]
            heads[qi] += 1
            progressed = True
            if cap is not None and groups is not None:
                g = groups[row]
                if counts.get(g, 0) >= cap:
                    held.append(row)
                    continue
                counts[g] = counts.get(g, 0) + 1
            taken.append(row)
        if not progressed:
            break
    if cap is not None and groups is not None:  # capped out of the pool: look further down the ranking
        for row in ranked[pool_size:]:
            if len(taken) >= n:
                break
            g = groups[row]
            if counts.get(g, 0) < cap:
                counts[g] = counts.get(g, 0) + 1
                taken.append(int(row))
    taken.extend(held[: n - len(taken)])
    return np.array(taken, dtype=np.int64)


def _kmeans_assign(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster of each row after a short FAISS k-means."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=10, seed=seed, verbose=False, min_points_per_centroid=1)
    km.cp.max_points_per_centroid = 10_000
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0]


def select_batch(
    probs: np.ndarray,
    n: int,
    strategy: str,
    *,
    features: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    pool_factor: float = 3.0,
    class_balance: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The next ``n`` rows to label among the unlabelled ones.

    Args:
        probs: (m, classes) the classifier's probabilities for the unlabelled rows.
        n: batch size.
        strategy: one of :data:`STRATEGIES`.
        features: (m, d) features for batch diversity; None (or pool_factor 1) picks pure top-n.
        rng: for ``random``.
        pool_factor: diversity pool size relative to n.
        class_balance: optional cap on one predicted class's share of the batch (e.g. 0.3).
        seed: k-means seed.

    Returns:
        int64 row indices into ``probs``, in pick order.

    Raises:
        ValueError: unknown strategy, or mismatched shapes.
    """
    probs = _check_probs(probs)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    n = min(int(n), len(probs))
    if strategy == "random":
        rng = rng or np.random.default_rng(seed)
        return rng.choice(len(probs), size=n, replace=False).astype(np.int64)
    scores = uncertainty(probs, strategy)
    groups = probs.argmax(axis=1) if class_balance else None
    if features is None or pool_factor <= 1:
        features = np.zeros((len(probs), 1), np.float32)
        pool_factor = 1.0
    return diverse_order(
        scores, features, n, pool_factor=pool_factor, seed=seed, groups=groups, max_group_share=class_balance
    )


COLD_STARTS = ("random", "typical")


def typical_first(features: np.ndarray, n: int, *, neighbours: int = 20, seed: int = 0) -> np.ndarray:
    """A cold start of ``n`` rows to label first: the most typical row of each of ``n`` k-means clusters
    (TypiClust, Hacohen et al. 2022): typicality is the mean cosine similarity to a row's
    ``neighbours`` nearest, so each pick is the densest point of its cluster, not an outlier.

    Returns:
        int64 rows into ``features``, distinct, one per non-empty cluster (at most ``n``), the most
        typical first.

    Raises:
        ValueError: n outside 1..len(features).
    """
    if not 1 <= n <= len(features):
        raise ValueError("n must be from 1 to the number of rows")
    x = np.ascontiguousarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    search = faiss.IndexFlatIP(x.shape[1])
    search.add(x)
    k = min(neighbours + 1, len(x))
    typicality = np.zeros(len(x), np.float32)
    for start in range(0, len(x), 16_384):
        sims, _ = search.search(x[start : start + 16_384], k)
        typicality[start : start + 16_384] = sims[:, 1:].mean(axis=1) if k > 1 else 0.0
    cluster = _kmeans_assign(x, n, seed) if n < len(x) else np.arange(len(x))
    order = np.lexsort((-typicality, cluster))  # by cluster, most typical first
    first = np.r_[True, np.diff(cluster[order]) != 0]
    picked = order[first]
    return picked[np.argsort(-typicality[picked], kind="stable")].astype(np.int64)


# -- simulation -----------------------------------------------------------------------------------


@dataclass
class Curve:
    """One strategy's learning curve over seeds: rows are seeds, columns rounds."""

    labeled_frac: list[float]
    accuracy: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        acc = np.array(self.accuracy)
        return {
            "labeled_frac": [round(f, 4) for f in self.labeled_frac],
            "accuracy_mean": [round(float(v), 4) for v in acc.mean(axis=0)],
            "accuracy_std": [round(float(v), 4) for v in acc.std(axis=0)],
            "seeds": len(self.accuracy),
            "seconds": round(self.seconds, 1),
        }


def _loop_sizes(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    seed_frac: float,
    batch_frac: float,
    max_frac: float,
) -> tuple[int, int, int, int, int]:
    """A simulated labelling loop's sizes: pool, classes, seed set, batch, most labels.

    Raises:
        ValueError: on bad fractions or shapes.
    """
    if not 0 < seed_frac <= max_frac <= 1 or not 0 < batch_frac <= 1:
        raise ValueError("need 0 < seed_frac <= max_frac <= 1 and 0 < batch_frac <= 1")
    if len(x_pool) != len(y_pool) or len(x_test) != len(y_test) or x_pool.shape[1] != x_test.shape[1]:
        raise ValueError("pool and test features and labels must agree")
    n = len(y_pool)
    n_classes = int(max(y_pool.max(), y_test.max())) + 1
    return n, n_classes, max(2, int(round(seed_frac * n))), max(1, int(round(batch_frac * n))), int(round(max_frac * n))


def simulate(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    strategies: Sequence[str] = STRATEGIES,
    seeds: Sequence[int] = (0, 1, 2),
    seed_frac: float = 0.05,
    batch_frac: float = 0.05,
    max_frac: float = 0.3,
    classifier: str = "lightgbm",
    pool_factor: float = 3.0,
    class_balance: float | None = None,
    cold_start: str = "random",
    on_round: Callable[[str, int, float, float], None] | None = None,
) -> dict[str, Curve]:
    """Replay the labelling loop with the true labels as the oracle.

    Each seed draws one seed set (``seed_frac`` of the pool: at random, not stratified, as a real start
    is; or with ``cold_start="typical"`` the most typical row of as many clusters, :func:`typical_first`)
    shared by all strategies; each round trains on the labelled rows, measures accuracy on the
    test set, and asks the strategy for ``batch_frac`` of the pool more, until ``max_frac``.

    Args:
        x_pool, y_pool: (n, d) features and (n,) int classes of the unlabelled pool.
        x_test, y_test: the held-out test set.
        on_round: called with (strategy, seed, labeled fraction, accuracy) after each round.

    Returns:
        strategy -> its curve.

    Raises:
        ValueError: on bad fractions or shapes.
    """
    n, n_classes, seed_n, batch_n, max_n = _loop_sizes(x_pool, y_pool, x_test, y_test, seed_frac, batch_frac, max_frac)
    if cold_start not in COLD_STARTS:
        raise ValueError(f"cold_start must be one of {', '.join(COLD_STARTS)}")
    curves: dict[str, Curve] = {}
    for seed in seeds:
        if cold_start == "typical":
            start = typical_first(x_pool, seed_n, seed=seed)
        else:
            start = np.random.default_rng(seed).choice(n, size=seed_n, replace=False)
        for strategy in strategies:
            t0 = time.perf_counter()
            rng = np.random.default_rng(seed + 1000)
            labelled = np.zeros(n, dtype=bool)
            labelled[start] = True
            fracs, accs = [], []
            while True:
                model = fit_classifier(classifier, x_pool[labelled], y_pool[labelled], seed)
                acc = float((full_proba(model, x_test, n_classes).argmax(axis=1) == y_test).mean())
                frac = labelled.sum() / n
                fracs.append(float(frac))
                accs.append(acc)
                if on_round:
                    on_round(strategy, seed, float(frac), acc)
                room = max_n - int(labelled.sum())
                if room <= 0 or labelled.all():
                    break
                rest = np.flatnonzero(~labelled)
                probs = full_proba(model, x_pool[rest], n_classes) if strategy != "random" else np.ones((len(rest), 1))
                pick = select_batch(
                    probs,
                    min(batch_n, room),
                    strategy,
                    features=x_pool[rest],
                    rng=rng,
                    pool_factor=pool_factor,
                    class_balance=class_balance,
                    seed=seed,
                )
                labelled[rest[pick]] = True
            curve = curves.setdefault(strategy, Curve(labeled_frac=fracs))
            curve.accuracy.append(accs)
            curve.seconds += time.perf_counter() - t0
    return curves


def noisy_answers(y: np.ndarray, n_classes: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """What an oracle that is wrong ``noise`` of the time answers for true classes ``y``: each wrong
    answer a uniformly random other class."""
    wrong = rng.random(len(y)) < noise
    return np.where(wrong, (y + rng.integers(1, n_classes, len(y))) % n_classes, y)


def simulate_relabel(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    shares: Sequence[float] = (0.0, 0.2),
    noise: float = 0.1,
    strategy: str = "margin",
    seeds: Sequence[int] = (0, 1, 2),
    seed_frac: float = 0.05,
    batch_frac: float = 0.05,
    max_frac: float = 0.2,
    classifier: str = "lightgbm",
    pool_factor: float = 3.0,
    on_round: Callable[[str, int, float, float], None] | None = None,
) -> dict[str, Curve]:
    """The labelling loop with a noisy oracle, with and without re-label requests.

    The oracle answers wrong ``noise`` of the time (:func:`noisy_answers`), asked again it answers
    afresh, and the latest answer is the label (as the label log keeps it). Every round spends one
    batch of answers (``batch_frac`` of the pool): ``share`` of it re-asks the labels that confident
    learning (:func:`job.label_issues.find_issues`, the analysis job's default) finds most likely
    wrong among those not re-asked yet, the rest labels new images picked by ``strategy``. The x
    axis counts answers, re-asks included, so each share spends the same labelling effort.

    Returns:
        ``"share 0.2"`` (and so on) -> its curve (accuracy on the test set, trained on the labels as
        answered).

    Raises:
        ValueError: on bad fractions or shapes.
    """
    from job.label_issues import find_issues
    from shared.features import normalize

    if not 0 <= noise < 1:
        raise ValueError("need 0 <= noise < 1")
    n, n_classes, seed_n, batch_n, max_n = _loop_sizes(x_pool, y_pool, x_test, y_test, seed_frac, batch_frac, max_frac)
    unit = normalize(x_pool)
    curves: dict[str, Curve] = {}
    for seed in seeds:
        start = np.random.default_rng(seed).choice(n, size=seed_n, replace=False)
        for share in shares:
            name = f"share {share:g}"
            t0 = time.perf_counter()
            rng = np.random.default_rng(seed + 1000)
            oracle = np.random.default_rng(seed + 2000)
            given = np.full(n, -1, np.int64)
            given[start] = noisy_answers(y_pool[start], n_classes, noise, oracle)
            asked_again = np.zeros(n, bool)
            spent = seed_n
            fracs, accs = [], []
            while True:
                rows = np.flatnonzero(given >= 0)
                model = fit_classifier(classifier, x_pool[rows], given[rows], seed)
                acc = float((full_proba(model, x_test, n_classes).argmax(axis=1) == y_test).mean())
                fracs.append(spent / n)
                accs.append(acc)
                if on_round:
                    on_round(name, seed, spent / n, acc)
                if spent >= max_n or len(rows) == n:
                    break
                batch = min(batch_n, max_n - spent)
                again = int(round(share * batch))
                if again:
                    issues = find_issues(x_pool[rows], unit[rows], given[rows], n_classes, seed=seed)
                    suspects = rows[issues.order]
                    suspects = suspects[~asked_again[suspects]][:again]
                    given[suspects] = noisy_answers(y_pool[suspects], n_classes, noise, oracle)
                    asked_again[suspects] = True
                    again = len(suspects)
                rest = np.flatnonzero(given < 0)
                new = min(batch - again, len(rest))
                probs = full_proba(model, x_pool[rest], n_classes)
                pick = rest[
                    select_batch(
                        probs, new, strategy, features=x_pool[rest], rng=rng, pool_factor=pool_factor, seed=seed
                    )
                ]
                given[pick] = noisy_answers(y_pool[pick], n_classes, noise, oracle)
                spent += again + new
            curve = curves.setdefault(name, Curve(labeled_frac=fracs))
            curve.accuracy.append(accs)
            curve.seconds += time.perf_counter() - t0
    return curves


def labels_to_reach(curve: dict[str, Any], target: float) -> float | None:
    """The first labelled fraction whose mean accuracy reaches ``target``, or None."""
    for frac, acc in zip(curve["labeled_frac"], curve["accuracy_mean"], strict=True):
        if acc >= target:
            return float(frac)
    return None
