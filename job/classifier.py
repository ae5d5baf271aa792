"""The label classifier, one pipeline for the retrain job and the analysis report: features, split,
fit, evaluate, export.

- :class:`FeatureSpace` fits the one feature transform (:class:`shared.features.FeatureTransform`:
  power + L2 + PCA fitted on every image, labelled or not) on embeddings.
- :func:`make_classifier` / :func:`fit_classifier`: LightGBM (default), logistic regression or kNN,
  all with the scikit-learn API (modAL's design: the active-learning strategies need only
  ``predict_proba``).
- :func:`holdout_split` and :func:`evaluate`: one stratified held-out split and one metrics block
  (accuracy, macro-F1, log loss, per class).
- :func:`export`: the served form, the transform and an ONNX model (logistic regression and LightGBM;
  kNN has none: it votes over the live index's labelled images), with a typed
  :class:`shared.manifests.ClassifierManifest`, read back by :class:`shared.classifier.ClassifierModel`.

scikit-learn, LightGBM and the ONNX converters load inside the functions that use them (job side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.features import FeatureTransform, power_normalize
from shared.manifests import ClassifierManifest

CLASSIFIERS = ("lightgbm", "logistic", "knn")
ONNX_KINDS = ("lightgbm", "logistic")  # what :func:`to_onnx` converts; kNN votes over the index instead
FEATURES_FILE = "features.npz"
MODEL_FILE = "model.onnx"


class FeatureSpace:
    """Embeddings -> classifier features: power normalisation, L2, PCA fitted on all images.

    Args:
        dim: PCA output dimension (0: no PCA).
        power: power normalisation exponent (0.5, as the index uses; 1: none).
        sample: at most this many rows to fit the PCA on.
    """

    def __init__(self, dim: int = 128, power: float = 0.5, sample: int = 50_000, seed: int = 0):
        self.dim = dim
        self.power = power
        self.sample = sample
        self.seed = seed

    def fit(self, x: np.ndarray) -> FeatureSpace:
        """Fit on (n, d) embeddings; sets ``transform_`` (and ``mean_`` (d,), ``components_`` (d, dim)).

        Raises:
            ValueError: fewer than two rows, or not a 2-D array.
        """
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need (n >= 2, d) embeddings, got {x.shape}")
        xn = power_normalize(x, self.power)
        if len(xn) > self.sample:
            xn = xn[np.random.default_rng(self.seed).choice(len(xn), self.sample, replace=False)]
        mean = xn.mean(axis=0).astype(np.float32)
        if self.dim and self.dim < x.shape[1]:
            centred = (xn - mean).astype(np.float64)
            cov = centred.T @ centred / max(len(centred) - 1, 1)
            vals, vecs = np.linalg.eigh(cov)
            components = vecs[:, np.argsort(-vals)[: min(self.dim, len(xn))]].astype(np.float32)
        else:
            components = np.eye(x.shape[1], dtype=np.float32)
        self.transform_ = FeatureTransform(mean, components, self.power)
        self.mean_, self.components_ = mean, components
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, d) embeddings -> (n, dim) float32 features.

        Raises:
            RuntimeError: if not fitted. ValueError: on a wrong dimension.
        """
        if not hasattr(self, "transform_"):
            raise RuntimeError("FeatureSpace is not fitted")
        return self.transform_.apply(x)


def make_classifier(kind: str = "lightgbm", seed: int = 0, n_labels: int | None = None) -> Any:
    """A scikit-learn style classifier for the labelling loop.

    LightGBM is set for small label sets: shallow trees (15 leaves), at least 5 images per leaf (2
    below 200 labels), column and row subsampling, 300 rounds at learning rate 0.08 (150 below 1,000
    labels). kNN is
    10 neighbours weighted by distance on the L2-normalised features (cosine order).

    Raises:
        ValueError: for an unknown kind.
    """
    if kind == "lightgbm":
        import lightgbm as lgb

        small = n_labels is not None and n_labels < 1000
        tiny = n_labels is not None and n_labels < 200  # a few per class: let leaves be small
        return lgb.LGBMClassifier(
            n_estimators=150 if small else 300,
            learning_rate=0.08,
            num_leaves=15,
            min_child_samples=2 if tiny else 5,
            min_data_in_bin=1 if tiny else 3,
            colsample_bytree=0.5,
            subsample=0.8,
            subsample_freq=1,
            reg_lambda=1.0,
            random_state=seed,
            verbose=-1,
        )
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=1.0, max_iter=1000)
    if kind == "knn":
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import Normalizer

        k = 10 if n_labels is None else max(1, min(10, n_labels))
        return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k, weights="distance"))
    raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}")


def full_proba(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` widened to all ``n_classes`` (a class absent from training gets 0).

    Returns:
        float64 (n, n_classes).
    """
    out = np.zeros((len(x), n_classes))
    if len(x) == 0:
        return out
    out[:, np.asarray(model.classes_, dtype=np.int64)] = model.predict_proba(x)
    return out


def fit_classifier(kind: str, x: np.ndarray, y: np.ndarray, seed: int = 0) -> Any:
    """Fit a classifier on features ``x`` (n, d) and integer classes ``y`` (n,).

    Raises:
        ValueError: fewer than two classes among the labels.
    """
    if len(np.unique(y)) < 2:
        raise ValueError("need labels of at least two classes to train a classifier")
    model = make_classifier(kind, seed, n_labels=len(y))
    model.fit(x, y)
    return model


def holdout_split(y: np.ndarray, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Stratified train / test positions into ``y`` (int classes), ``holdout`` of them held out.

    Returns:
        sorted (train, test) positions, or None when the labels cannot be split that way: no share
        to hold out, a class with fewer than two labels, or too few labels for one of each class
        on each side.
    """
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y) if len(y) else np.zeros(0, np.int64)
    used = int((counts > 0).sum())
    n_test = max(int(round(holdout * len(y))), used)
    if holdout <= 0 or used == 0 or counts[counts > 0].min() < 2 or len(y) - n_test < used:
        return None
    tr, te = train_test_split(np.arange(len(y)), test_size=n_test, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


def evaluate(proba: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The metrics block: accuracy, macro-F1, log loss and per-class scores of held-out predictions.

    Args:
        proba: (m, len(classes)) predicted probabilities of the held-out rows.
        y: (m,) their true classes.

    Raises:
        ValueError: on mismatched shapes.
    """
    from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_fscore_support

    if proba.ndim != 2 or proba.shape != (len(y), len(classes)):
        raise ValueError(f"need ({len(y)}, {len(classes)}) probabilities, got {proba.shape}")
    c = len(classes)
    pred = proba.argmax(axis=1)
    p, r, f1, support = precision_recall_fscore_support(y, pred, labels=range(c), zero_division=0)
    clipped = np.clip(proba, 1e-7, 1)
    return {
        "accuracy": round(float(accuracy_score(y, pred)), 4),
        "macro_f1": round(float(f1_score(y, pred, labels=range(c), average="macro", zero_division=0)), 4),
        "log_loss": round(float(log_loss(y, clipped / clipped.sum(axis=1, keepdims=True), labels=range(c))), 4),
        "per_class": {
            classes[j]: {
                "precision": round(float(p[j]), 4),
                "recall": round(float(r[j]), 4),
                "f1": round(float(f1[j]), 4),
                "support": int(support[j]),
            }
            for j in range(c)
        },
    }


def to_onnx(kind: str, model: Any, dim: int) -> bytes:
    """A fitted logistic regression or LightGBM classifier as ONNX: input ``x`` float (n, dim),
    outputs ``label`` (n,) and ``probabilities`` (n, classes).

    Raises:
        ValueError: for a kind that has no ONNX form here (kNN).
    """
    if kind == "lightgbm":
        from onnxmltools import convert_lightgbm
        from onnxmltools.convert.common.data_types import FloatTensorType

        onx = convert_lightgbm(
            model, initial_types=[("x", FloatTensorType([None, dim]))], zipmap=False, target_opset=15
        )
    elif kind == "logistic":
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType as SklFloat

        onx = convert_sklearn(
            model, initial_types=[("x", SklFloat([None, dim]))], options={id(model): {"zipmap": False}}, target_opset=15
        )
    else:
        raise ValueError(f"no ONNX export for {kind!r} classifiers (only {', '.join(ONNX_KINDS)})")
    return bytes(onx.SerializeToString())


@dataclass
class Exported:
    """A classifier in its served form: the files to store beside each other, and their manifest.

    Attributes:
        files: file name -> bytes (the feature transform, and the ONNX model unless kNN).
        manifest: what the reader needs (kind, classes, spaces, dims, metrics).
    """

    files: dict[str, bytes]
    manifest: ClassifierManifest


def export(
    kind: str,
    model: Any,
    feature_space: FeatureSpace,
    classes: list[str],
    *,
    encoder_version: str,
    head_version: str | None,
    labelled: int,
    metrics: dict[str, Any],
    manifest_type: type[ClassifierManifest] = ClassifierManifest,
    **extra: Any,
) -> Exported:
    """The served form of a fitted classifier (see :class:`shared.classifier.ClassifierModel`).

    Args:
        kind: the model's kind; only :data:`ONNX_KINDS` get a model file.
        model: the fitted model (ignored for kNN kinds).
        feature_space: the fitted feature space its input comes from.
        metrics: the held-out evaluation (``accuracy`` is lifted into the manifest).
        manifest_type, extra: a richer manifest (the retrain's) and its further fields.
    """
    transform = feature_space.transform_
    files = {FEATURES_FILE: transform.to_bytes()}
    model_file = None
    if kind in ONNX_KINDS:
        files[MODEL_FILE] = to_onnx(kind, model, transform.dim)
        model_file = MODEL_FILE
    manifest = manifest_type(
        kind=kind,
        classes=classes,
        encoder_version=encoder_version,
        head_version=head_version,
        feature_dim=transform.dim,
        power=transform.power,
        model_file=model_file,
        features_file=FEATURES_FILE,
        accuracy=metrics.get("accuracy"),
        labelled=labelled,
        metrics=metrics,
        **extra,
    )
    return Exported(files, manifest)
