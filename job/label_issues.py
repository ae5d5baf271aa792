"""Label issues: labelled images whose given label the rest of the labelled data disagrees with.

Two methods, one output (positions into the labelled rows, most suspect first):

- ``confident_learning`` (the default): every labelled image gets a class-probability vector from
  models that never saw its label: by default the mean of a logistic regression's K-fold
  cross-validated probabilities (each fold predicted by the model fitted on the other folds) and
  its 20 nearest labelled neighbours' similarity-weighted vote (itself left out); then cleanlab's
  :func:`cleanlab.filter.find_label_issues` (confident learning: per-class thresholds from the
  average self-confidence, the confident joint of given and likely-true labels, pruned both by noise
  rate and by class, ``filter_by="both"``) picks the issues, ranked by self-confidence (the
  probability of the given label, lowest first), and the list is cut at cleanlab's own estimate of
  how many issues there are (:func:`cleanlab.count.num_label_issues`, the confident joint's
  off-diagonal count). The library does the work; this module feeds it. Measured on 10,000
  Fashion-MNIST labels with 10% flipped (``make bench-quality``): the two models' mean and ``both``
  were each worth ~2 points of F1 over logistic alone and the default filter, and the cut ~5 more on
  random flips (the filter alone flags ~30% more images than were flipped: Fashion-MNIST's shirts,
  T-shirts, pullovers and coats are confused by nature) at ~1 point lost on confusable flips.
- ``knn_vote``: the image's 10 nearest labelled neighbours vote, and a label is flagged when at
  least ``min_share`` of them say one other class.

Measured against flipped labels by ``make bench-quality`` (``bench/quality.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from job.classifier import fit_classifier, full_proba

log = logging.getLogger(__name__)

METHODS = ("confident_learning", "knn_vote")
MODELS = ("logistic+knn", "logistic", "lightgbm")
FOLDS = 5
KNN_K = 10
PROBA_K = 20  # neighbours whose weighted vote is the kNN half of the default probabilities
FILTER_BY = "both"
COUNT_ESTIMATE = "off_diagonal"  # cleanlab.count.num_label_issues: how many of the filter's issues to keep
Progress = Callable[[str, int, int], None]


@dataclass
class Issues:
    """What a method found, over m labelled images.

    Attributes:
        order: int64 (f,) positions of the flagged images, most suspect first.
        suggested: int64 (m,) the class each image most likely is (the classifier's or the vote's).
        given_probability: float64 (m,) the probability of the given label (self-confidence;
            the vote's smoothed share for ``knn_vote``).
        suggested_probability: float64 (m,) the probability of ``suggested``.
        method: the method's name.
        model: the cross-validated classifier (``confident_learning``), else None.
    """

    order: np.ndarray
    suggested: np.ndarray
    given_probability: np.ndarray
    suggested_probability: np.ndarray
    method: str
    model: str | None = None


def out_of_sample_proba(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    kind: str = "logistic",
    folds: int = FOLDS,
    seed: int = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """Class probabilities of every row from a classifier fitted without it (stratified K-fold).

    Args:
        x: float32 (m, d) features.
        y: int (m,) classes in ``[0, n_classes)``; every class present has at least 2 rows.
        n_classes: the width of the output.
        kind: the classifier (:func:`job.classifier.make_classifier`).
        folds: K, lowered to the smallest class's count (at least 2).

    Returns:
        float64 (m, n_classes), each row summing to 1.

    Raises:
        ValueError: mismatched shapes, or a class with fewer than 2 rows.
    """
    from sklearn.model_selection import StratifiedKFold

    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"need features (m, d) and classes (m,), got {x.shape} and {y.shape}")
    counts = np.bincount(y, minlength=n_classes)
    if counts[counts > 0].min(initial=2) < 2:
        raise ValueError("every class needs at least 2 labelled images for cross-validation")
    k = int(max(2, min(folds, counts[counts > 0].min())))
    out = np.zeros((len(y), n_classes))
    splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y)
    for i, (tr, te) in enumerate(splits):
        if progress is not None:
            progress(f"label issues: fold {i + 1}", i, k)
        model = fit_classifier(kind, x[tr], y[tr], seed=seed)
        out[te] = full_proba(model, x[te], n_classes)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)


def confident_learning(y: np.ndarray, proba: np.ndarray, model: str | None = None, cut: bool = True) -> Issues:
    """cleanlab's confident learning over out-of-sample probabilities.

    Args:
        y: int (m,) given classes, each of the ``proba`` columns' classes present.
        proba: (m, c) out-of-sample probabilities (:func:`out_of_sample_proba`).
        cut: keep only as many of the issues, most suspect first, as cleanlab estimates there are.

    Raises:
        ValueError: mismatched shapes.
    """
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues

    if proba.ndim != 2 or len(proba) != len(y):
        raise ValueError(f"need ({len(y)}, c) probabilities, got {proba.shape}")
    order = find_label_issues(
        labels=y, pred_probs=proba, filter_by=FILTER_BY, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    if cut:
        order = order[: num_label_issues(labels=y, pred_probs=proba, estimation_method=COUNT_ESTIMATE)]
    rows = np.arange(len(y))
    suggested = proba.argmax(axis=1)
    return Issues(
        order=np.asarray(order, np.int64),
        suggested=suggested,
        given_probability=proba[rows, y],
        suggested_probability=proba[rows, suggested],
        method="confident_learning",
        model=model,
    )


def knn_proba(space: np.ndarray, y: np.ndarray, n_classes: int, k: int = PROBA_K) -> np.ndarray:
    """Class probabilities from each row's k nearest other rows (itself left out, so out of sample):
    votes weighted by similarity to the 4th power (the nearest count most), lightly smoothed.

    Returns:
        float64 (m, n_classes), rows summing to 1.
    """
    scores, rows = neighbours(space, k)
    weight = np.maximum(scores, 0.0).astype(np.float64) ** 4
    out = np.zeros((len(y), n_classes))
    for c in range(n_classes):
        out[:, c] = ((y[rows] == c) * weight).sum(axis=1)
    out += 0.01 * weight.sum(axis=1, keepdims=True) / n_classes + 1e-12
    return out / out.sum(axis=1, keepdims=True)


def knn_vote(
    neighbour_rows: np.ndarray, neighbour_scores: np.ndarray, y: np.ndarray, n_classes: int, min_share: float
) -> Issues:
    """Labels at least ``min_share`` of the image's nearest labelled neighbours vote against.

    Args:
        neighbour_rows: int (m, k) positions of each image's nearest labelled neighbours (itself excluded).
        neighbour_scores: (m, k) their cosine similarities (ties in the vote broken by the closer).
        y: int (m,) given classes.
        min_share: the share of the k votes the winning other class needs.
    """
    votes = np.zeros((len(y), n_classes), np.int64)
    for c in range(n_classes):
        votes[:, c] = (y[neighbour_rows] == c).sum(axis=1)
    k = neighbour_rows.shape[1]
    top = votes.argmax(axis=1)
    share = votes.max(axis=1) / k
    flag = np.flatnonzero((top != y) & (share >= min_share))
    order = flag[np.lexsort((-neighbour_scores[flag].mean(axis=1), -share[flag]))]
    rows = np.arange(len(y))
    return Issues(
        order=order.astype(np.int64),
        suggested=top,
        given_probability=votes[rows, y] / k,
        suggested_probability=share,
        method="knn_vote",
    )


def find_issues(
    features: np.ndarray,
    space: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    method: str = "confident_learning",
    *,
    model: str = "logistic+knn",
    min_share: float = 0.7,
    cut: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> Issues:
    """The label issues among m labelled images by ``method``.

    Args:
        features: float32 (m, d) the classifiers' input (``confident_learning``).
        space: float32 (m, q) unit vectors the neighbours are found in (``knn_vote``, and the
            neighbours shown beside every issue).
        y: int (m,) given classes in ``[0, n_classes)``.
        method: one of :data:`METHODS`.
        model: where ``confident_learning``'s probabilities come from (:data:`MODELS`): a cross-validated
            classifier, or (``logistic+knn``) the mean of logistic regression's and the neighbours' vote.
        min_share: the vote ``knn_vote`` needs.
        cut: ``confident_learning`` keeps as many issues as cleanlab estimates there are (see
            :func:`confident_learning`).

    Returns:
        the issues; positions and classes are the input's. Confident learning judges only classes
        with at least 2 labelled images (a class with one cannot be cross-validated); with fewer
        than two such classes, or with no more than :data:`KNN_K` labels, nothing is flagged.

    Raises:
        ValueError: an unknown method or mismatched shapes.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}")
    m = len(y)
    if features.shape[0] != m or space.shape[0] != m:
        raise ValueError(f"need {m} rows of features and space, got {features.shape} and {space.shape}")
    none = Issues(np.zeros(0, np.int64), y.copy(), np.ones(m), np.ones(m), method)
    if method == "knn_vote":
        if m <= KNN_K:
            return none
        scores, rows = neighbours(space, KNN_K)
        return knn_vote(rows, scores, y, n_classes, min_share)
    counts = np.bincount(y, minlength=n_classes)
    keep = np.flatnonzero(counts >= 2)
    if len(keep) < 2 or m <= KNN_K:
        return none
    remap = np.full(n_classes, -1)
    remap[keep] = np.arange(len(keep))
    at = np.flatnonzero(remap[y] >= 0)
    yk = remap[y[at]]
    proba = out_of_sample_proba(features[at], yk, len(keep), model.split("+")[0], seed=seed, progress=progress)
    if model == "logistic+knn":
        proba = (proba + knn_proba(space[at], yk, len(keep))) / 2
    found = confident_learning(yk, proba, model, cut=cut)
    suggested = y.copy()
    suggested[at] = keep[found.suggested]
    given, best = np.ones(m), np.ones(m)
    given[at], best[at] = found.given_probability, found.suggested_probability
    return Issues(at[found.order], suggested, given, best, method, model)


def knn_neighbours(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine neighbours (unit vectors) with FAISS: scores and rows (m, k); rows -1 where fewer exist.
    (A set's neighbours among itself, each row left out: :func:`neighbours`.)"""
    import faiss

    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(np.ascontiguousarray(base, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(base)))


def neighbours(space: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by cosine (unit vectors, exact, FAISS): scores and rows (m, k)."""
    x = np.ascontiguousarray(space, dtype=np.float32)
    scores, rows = knn_neighbours(x, x, k + 1)
    own = rows == np.arange(len(x))[:, None]
    # drop each row's own entry (first, unless an exact duplicate took its place), keep k others
    keep = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(rows.shape[1]) < rows.shape[1] - 1)
    return scores[keep].reshape(len(x), -1)[:, :k], rows[keep].reshape(len(x), -1)[:, :k]


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """Precision, recall and F1 of ``flagged`` positions against the boolean (m,) ``truth``."""
    hit = int(truth[flagged].sum()) if len(flagged) else 0
    p = hit / len(flagged) if len(flagged) else 0.0
    r = hit / int(truth.sum()) if truth.any() else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {
        "flagged": int(len(flagged)),
        "found": hit,
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(f1, 4),
    }
