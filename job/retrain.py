"""Retrain: the label classifier trained on every current label, evaluated, and published as a version.

Training imports scikit-learn and LightGBM (job side); the published version is read by
:class:`shared.classifier.ClassifierView` (see :mod:`shared.classifier` for its layout).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from job.active_learning import diverse_order, uncertainty
from job.classifier import FeatureSpace, evaluate, export, fit_classifier, full_proba, holdout_split
from shared.classifier import CLASSIFIERS, HISTORY
from shared.errors import NotReady
from shared.labels import STRATEGIES, LabelLog, ingest_labels
from shared.manifests import RetrainManifest
from shared.settings import Settings
from shared.storage import MODELS, Storage
from shared.versions import claim_next, prune, swap_pointer

log = logging.getLogger(__name__)


@dataclass
class RetrainResult:
    """What one retrain did. ``version`` is None when it was skipped (``reason`` says why)."""

    version: str | None
    reason: str | None = None
    labels_used: int = 0
    classes: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    predictions: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "classifier_version": self.version,
            "skipped": self.reason,
            "labels_used": self.labels_used,
            "classes": self.classes,
            "left_out": self.left_out,
            "metrics": self.metrics,
            "predictions": self.predictions,
            "seconds": self.seconds,
        }


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _evaluate(kind: str, x: np.ndarray, y: np.ndarray, classes: list[str], holdout: float, seed: int) -> dict[str, Any]:
    """The metrics block (:func:`job.classifier.evaluate`) on a stratified held-out share of the labels."""
    split = holdout_split(y, holdout, seed)
    if split is None:
        why = "too few labels to hold some out (two per class, one per class on each side)"
        return {"evaluated": False, "reason": why}
    tr, te = split
    model = fit_classifier(kind, x[tr], y[tr], seed)
    metrics = evaluate(full_proba(model, x[te], len(classes)), y[te], classes)
    return {"evaluated": True, "holdout": int(len(te)), "train": int(len(tr)), **metrics}


def train_and_publish(
    storage: Storage,
    settings: Settings,
    encoder_version: str,
    *,
    progress: Callable[[str], None] | None = None,
) -> RetrainResult:
    """Train the classifier on every current label, evaluate it, predict every image, publish.

    Skipped (``version`` None, with a reason) when there are not two classes with two labels each.

    Raises:
        NotReady: no embeddings for this encoder, or a head is asked for and none is trained.
    """
    from job.embeddings import EmbeddingStore
    from shared.catalog import Catalog

    step = progress or (lambda stage: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    step("read")
    labels = LabelLog(storage)
    labels.refresh()
    current = labels.current(ingest_labels(storage))
    label_set = labels.ensure_label_set(settings.label_classes, [e.label for e in current.values()], user="retrain")
    deleted = Catalog(storage).deleted_ids()
    emb = EmbeddingStore(storage, encoder_version).load(skip=deleted)
    if not emb.ids:
        raise NotReady(f"no embeddings for encoder {encoder_version}: embed first", code="no_embeddings")
    vectors, head_version = emb.vectors, None
    if settings.classifier_space == "head":
        from shared.head import load_head

        head = load_head(storage, settings)
        vectors, head_version = head.apply(vectors).embedding, head.version
    timings["read"] = time.perf_counter() - t0

    classes_all = label_set.classes
    code = {name: i for i, name in enumerate(classes_all)}
    row_of = {image_id: i for i, image_id in enumerate(emb.ids)}
    rows, ys = [], []
    for image_id, entry in current.items():
        if entry.label in code and image_id in row_of:
            rows.append(row_of[image_id])
            ys.append(code[entry.label])
    counts = np.bincount(np.array(ys, dtype=np.int64), minlength=len(classes_all))
    left_out = {classes_all[c]: int(counts[c]) for c in range(len(classes_all)) if 0 < counts[c] < 2}
    keep_class = counts >= 2
    result = RetrainResult(version=None, left_out=left_out)
    if keep_class.sum() < 2:
        result.reason = "need labels of at least two classes, two images each"
        return result
    # Classes are the label set's, in its order; a class with fewer than two labels is not trained.
    classes = [c for c, keep in zip(classes_all, keep_class, strict=True) if keep]
    remap = np.cumsum(keep_class) - 1
    pairs = [(r, int(remap[y])) for r, y in zip(rows, ys, strict=True) if keep_class[y]]
    lab_rows = np.array([p[0] for p in pairs], dtype=np.int64)
    y = np.array([p[1] for p in pairs], dtype=np.int64)

    step("features")
    t1 = time.perf_counter()
    feature_space = FeatureSpace(dim=settings.classifier_pca_dim if settings.classifier_space == "backbone" else 0)
    feats = feature_space.fit(vectors).transform(vectors)
    timings["features"] = time.perf_counter() - t1

    step("evaluate")
    t1 = time.perf_counter()
    metrics = _evaluate(settings.classifier_kind, feats[lab_rows], y, classes, settings.classifier_holdout, seed=0)
    timings["evaluate"] = time.perf_counter() - t1

    step("train")
    t1 = time.perf_counter()
    model = fit_classifier(settings.classifier_kind, feats[lab_rows], y, seed=0)
    timings["train"] = time.perf_counter() - t1

    step("predict")
    t1 = time.perf_counter()
    probs = (
        np.concatenate([full_proba(model, feats[i : i + 65536], len(classes)) for i in range(0, len(feats), 65536)])
        if len(feats)
        else np.zeros((0, len(classes)))
    )
    order = np.argsort(-probs, axis=1)[:, :2] if len(classes) > 1 else np.zeros((len(probs), 2), np.int64)
    top = np.take_along_axis(probs, order, axis=1)
    labelled = np.zeros(len(emb.ids), dtype=bool)
    labelled[[row_of[i] for i in current if i in row_of]] = True
    queue = _queues(probs, feats, labelled, emb.ids, settings)
    timings["predict"] = time.perf_counter() - t1

    step("publish")
    t1 = time.perf_counter()
    version = claim_next(storage, MODELS, CLASSIFIERS)
    prefix = f"{CLASSIFIERS}{version}/"
    storage.put(
        MODELS,
        prefix + "predictions.npz",
        _npz(
            ids=np.array(emb.ids, dtype="S64"),
            pred=order[:, 0].astype(np.int16),
            prob=top[:, 0].astype(np.float32),
            second=order[:, 1].astype(np.int16),
            second_prob=top[:, 1].astype(np.float32),
        ),
    )
    storage.put(MODELS, prefix + "queue.json", json.dumps(queue).encode())
    trained_at = datetime.now(UTC).isoformat(timespec="seconds")
    exported = export(
        settings.classifier_kind,
        model,
        feature_space,
        classes,
        encoder_version=encoder_version,
        head_version=head_version,
        labelled=len(y),
        metrics=metrics,
        manifest_type=RetrainManifest,
        version=version,
        space=settings.classifier_space,
        label_set=label_set.version,
        labels_used=len(y),
        label_counts={classes[c]: int(n) for c, n in enumerate(np.bincount(y, minlength=len(classes)))},
        log_entries=len(labels.entries()),
        left_out=left_out,
        images=len(emb.ids),
        trained_at=trained_at,
        default_strategy=settings.al_strategy,
    )
    for name, data in exported.files.items():
        storage.put(MODELS, prefix + name, data)
    storage.put_json(MODELS, prefix + "manifest.json", exported.manifest.to_json())  # marks it complete
    swap_pointer(storage, MODELS, version, CLASSIFIERS)
    prune(storage, MODELS, settings.classifier_keep_versions, version, CLASSIFIERS)
    history = {
        "version": version,
        "trained_at": trained_at,
        "labels_used": len(y),
        "images": len(emb.ids),
        "kind": settings.classifier_kind,
        **{k: metrics.get(k) for k in ("accuracy", "macro_f1", "holdout")},
        "per_class": {k: v["f1"] for k, v in metrics.get("per_class", {}).items()},
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    storage.put_json(MODELS, f"{HISTORY}{stamp}-{version}.json", history, overwrite=False)
    timings["publish"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    log.info("classifier %s: %d labels, accuracy %s", version, len(y), metrics.get("accuracy"))
    result.version = version
    result.labels_used = len(y)
    result.classes = classes
    result.metrics = metrics
    result.predictions = len(emb.ids)
    result.seconds = {k: round(v, 3) for k, v in timings.items()}
    return result


def _queues(
    probs: np.ndarray, feats: np.ndarray, labelled: np.ndarray, ids: list[str], settings: Settings
) -> dict[str, list[dict[str, Any]]]:
    """For each strategy, the unlabelled images to ask about, best first.

    Uncertainty strategies order the ``label_queue_size`` picks so that every run of consecutive
    picks is spread over the uncertain pool's clusters (one pick per cluster, most uncertain first).
    """
    rest = np.flatnonzero(~labelled)
    size = min(settings.label_queue_size, len(rest))
    out: dict[str, list[dict[str, Any]]] = {}
    rng = np.random.default_rng(0)
    for strategy in STRATEGIES:
        if size == 0:
            out[strategy] = []
            continue
        if strategy == "random":
            pick = rng.choice(len(rest), size=size, replace=False)
            scores = np.full(len(rest), np.nan)
        else:
            scores = uncertainty(probs[rest], strategy)
            balance = settings.al_class_balance or None
            pick = diverse_order(
                scores,
                feats[rest],
                size,
                pool_factor=settings.al_pool_factor,
                groups=probs[rest].argmax(axis=1) if balance else None,
                max_group_share=balance,
            )
        out[strategy] = [
            {"id": ids[int(rest[p])], "uncertainty": None if np.isnan(scores[p]) else round(float(scores[p]), 5)}
            for p in pick
        ]
    return out
