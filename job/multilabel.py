"""Multi-label classification: label sets where an image carries several labels at once.

- :func:`mosaics`: a multi-label image set made from real single-label images: 2 x 2 mosaics of
  Fashion-MNIST items, 1-4 distinct classes each, labelled with the classes present (train mosaics
  from the train split, test mosaics from the test split).
- :class:`OneVsRest`: one binary classifier per label (logistic regression or LightGBM) on the
  product's features, or one small network with a sigmoid output per label (``mlp``: a 512-unit
  hidden layer, the projection head's first width); per-label probabilities.
- :func:`uncertainty`: what active learning asks about next in a multi-label set: the mean per-label
  entropy, the smallest margin to a label's threshold, or a cardinality-aware score (entropy of how
  many labels the image has, beside the per-label entropy).
- :func:`tune_thresholds`: a threshold per label, the one that maximises F-beta (F1 or F2) on
  held-out labelled images.
- :func:`multilabel_metrics`: micro and macro F1, per-label precision and recall, mAP.

Job side (scikit-learn and LightGBM load inside the functions that use them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CELL = 28  # a Fashion-MNIST item's side; a mosaic is 2 x 2 of them
MLP_SCALE = 10.0  # unit-length features x this: the network's inputs near unit variance per sample
STRATEGIES = ("random", "mean_entropy", "min_margin", "cardinality")


def mosaics(
    images: np.ndarray, labels: np.ndarray, n: int, n_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 2 x 2 mosaics of single-label images and their label sets.

    Each mosaic draws how many distinct classes it shows (1-4, uniformly), which classes, then fills its
    four cells with items of those classes (each class at least once) in a random order.

    Args:
        images: uint8 (m, CELL, CELL) items; labels: (m,) their classes in 0..n_classes-1.

    Returns:
        uint8 (n, 2*CELL, 2*CELL) mosaics and bool (n, n_classes) their label sets.

    Raises:
        ValueError: a class without items, or mismatched shapes.
    """
    if images.ndim != 3 or images.shape[1:] != (CELL, CELL) or len(images) != len(labels):
        raise ValueError(f"images must be (m, {CELL}, {CELL}) with one label each")
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    if any(len(items) == 0 for items in by_class):
        raise ValueError("every class needs items")
    out = np.zeros((n, 2 * CELL, 2 * CELL), np.uint8)
    sets = np.zeros((n, n_classes), bool)
    for i in range(n):
        k = int(rng.integers(1, 5))
        classes = rng.choice(n_classes, k, replace=False)
        cells = np.concatenate([classes, rng.choice(classes, 4 - k)])
        rng.shuffle(cells)
        for pos, c in enumerate(cells):
            item = images[by_class[int(c)][int(rng.integers(len(by_class[int(c)])))]]
            r, col = divmod(pos, 2)
            out[i, r * CELL : (r + 1) * CELL, col * CELL : (col + 1) * CELL] = item
        sets[i, classes] = True
    return out, sets


@dataclass
class OneVsRest:
    """One binary classifier per label.

    Attributes:
        kind: ``logistic`` or ``lightgbm``.
        models: per label, a fitted model, or the label's constant probability where the training
            labels had only one value for it (a label never or always present).
    """

    kind: str = "logistic"
    seed: int = 0
    models: list[Any] = field(default_factory=list)
    joint: Any = None  # the mlp kind: one network for every label

    def fit(self, x: np.ndarray, y: np.ndarray) -> OneVsRest:
        """Fit on features (n, d) and bool label sets (n, L).

        Raises:
            ValueError: an unknown kind or mismatched shapes.
        """
        if y.ndim != 2 or len(x) != len(y):
            raise ValueError("y must be (n, labels), one row per feature row")
        self.models = []
        if self.kind == "mlp":
            from sklearn.neural_network import MLPClassifier

            present = np.asarray(y.any(axis=0) & ~y.all(axis=0), bool)
            self.models = [None if bool(present[j]) else float(y[0, j]) for j in range(y.shape[1])]
            self.joint = MLPClassifier(
                hidden_layer_sizes=(512,),
                alpha=1e-3,
                max_iter=200,
                early_stopping=len(y) >= 100,
                random_state=self.seed,
            ).fit(x * MLP_SCALE, y[:, present].astype(np.int64))
            return self
        for j in range(y.shape[1]):
            target = y[:, j].astype(np.int64)
            if target.min() == target.max():
                self.models.append(float(target[0]))
                continue
            model = _binary(self.kind, self.seed, len(target))
            model.fit(x, target)
            self.models.append(model)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """float32 (n, L) each label's probability."""
        out = np.empty((len(x), len(self.models)), np.float32)
        if self.joint is not None:
            learnt = [j for j, m in enumerate(self.models) if m is None]
            proba = self.joint.predict_proba(x * MLP_SCALE)
            out[:, learnt] = proba.reshape(len(x), -1)
        for j, model in enumerate(self.models):
            if isinstance(model, float):
                out[:, j] = model
            elif model is not None:
                out[:, j] = model.predict_proba(x)[:, 1]
        return out


def _binary(kind: str, seed: int, n: int) -> Any:
    """One label's classifier: the single-label loop's own logistic regression or LightGBM settings."""
    from job.classifier import make_classifier

    if kind not in ("logistic", "lightgbm"):
        raise ValueError(f"unknown multi-label classifier {kind!r}: logistic, lightgbm or mlp")
    return make_classifier(kind, seed, n_labels=n)


def tune_thresholds(proba: np.ndarray, y: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """float32 (L,) per label, the probability threshold that maximises F-beta on held-out rows (0.5 for a
    label absent from them: nothing to tune on).

    Args:
        proba: (n, L) predicted probabilities of held-out rows; y: bool (n, L) their label sets.
        beta: 1 for F1, 2 for F2 (recall weighs more).
    """
    thresholds = np.full(proba.shape[1], 0.5, np.float32)
    b2 = beta * beta
    for j in range(proba.shape[1]):
        truth = y[:, j]
        if not truth.any():
            continue
        order = np.argsort(-proba[:, j], kind="stable")
        hits = np.cumsum(truth[order])
        flagged = np.arange(1, len(order) + 1)
        precision, recall = hits / flagged, hits / truth.sum()
        score = (1 + b2) * precision * recall / np.maximum(b2 * precision + recall, 1e-12)
        best = int(np.argmax(score))
        # halfway to the next row's probability, so that row stays out
        below = proba[order[best + 1], j] if best + 1 < len(order) else 0.0
        thresholds[j] = (proba[order[best], j] + below) / 2
    return thresholds


def multilabel_metrics(proba: np.ndarray, y: np.ndarray, thresholds: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Micro and macro F1 of the thresholded sets, per-label precision and recall, and mAP (mean over labels
    of average precision, from the probabilities: no threshold).

    Args:
        proba: (n, L) probabilities; y: bool (n, L) true sets; thresholds: (L,); names: the L labels.
    """
    from sklearn.metrics import average_precision_score

    pred = proba >= thresholds[None, :]
    tp = (pred & y).sum(axis=0).astype(np.float64)
    fp = (pred & ~y).sum(axis=0).astype(np.float64)
    fn = (~pred & y).sum(axis=0).astype(np.float64)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    micro_p = tp.sum() / max(tp.sum() + fp.sum(), 1)
    micro_r = tp.sum() / max(tp.sum() + fn.sum(), 1)
    present = y.any(axis=0)
    ap = [float(average_precision_score(y[:, j], proba[:, j])) for j in np.flatnonzero(present)]
    return {
        "micro_f1": round(float(2 * micro_p * micro_r / max(micro_p + micro_r, 1e-12)), 4),
        "macro_f1": round(float(f1[present].mean()) if present.any() else 0.0, 4),
        "mAP": round(float(np.mean(ap)) if ap else 0.0, 4),
        "exact_set": round(float((pred == y).all(axis=1).mean()), 4),
        "per_label": {
            name: {"precision": round(float(p), 4), "recall": round(float(r), 4), "threshold": round(float(t), 4)}
            for name, p, r, t in zip(names, precision, recall, thresholds, strict=True)
        },
    }


def uncertainty(proba: np.ndarray, strategy: str, thresholds: np.ndarray | None = None) -> np.ndarray:
    """float64 (n,) how unsure the model is of each image's label set (higher: ask first).

    - ``mean_entropy``: the mean over labels of the binary entropy of p;
    - ``min_margin``: 1 - the smallest distance of a label's p to its threshold (0.5 without thresholds),
      scaled by how far that threshold lets it go: the label closest to flipping decides;
    - ``cardinality``: the mean per-label entropy plus the entropy of the predicted number of labels
      (a Poisson-binomial over the labels' p, its variance as a cheap stand-in), so images whose label
      count is in doubt come first among equally unsure ones.

    Raises:
        ValueError: an unknown strategy (``random`` has no score).
    """
    p = np.clip(proba.astype(np.float64), 1e-6, 1 - 1e-6)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    if strategy == "mean_entropy":
        return entropy.mean(axis=1)
    if strategy == "min_margin":
        t = np.full(p.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, np.float64)
        room = np.where(p >= t, 1 - t, t)  # how far p can be from t on its side
        return 1 - (np.abs(p - t) / np.maximum(room, 1e-6)).min(axis=1)
    if strategy == "cardinality":
        return entropy.mean(axis=1) + (p * (1 - p)).sum(axis=1) / p.shape[1]
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES[1:])}")
