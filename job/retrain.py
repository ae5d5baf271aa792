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
from typing import TYPE_CHECKING, Any

import numpy as np

from job.active_learning import diverse_order, uncertainty
from job.classifier import FeatureSpace, evaluate, export, fit_classifier, full_proba, holdout_split
from shared.classifier import CLASSIFIERS, HISTORY
from shared.errors import NotReady
from shared.labels import STRATEGIES, LabelLog
from shared.manifests import RetrainManifest
from shared.settings import Settings
from shared.storage import MODELS, Storage
from shared.versions import claim_next, prune, swap_pointer

if TYPE_CHECKING:
    from job.passes import Collected

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
    rows_held_max: int = 0
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
            "rows_held_max": self.rows_held_max,
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

    Reads the shards twice in bounded memory (:mod:`job.passes`): once for the labelled rows and a
    seeded sample of ``pass_sample`` rows (the feature space is fitted on it), once to predict every row
    chunk by chunk. Labels given at ingest come from the shards, so no catalogue record is read.

    Skipped (``version`` None, with a reason) when there are not two classes with two labels each.

    Raises:
        NotReady: no embeddings for this encoder, or a head is asked for and none is trained.
    """
    from job.embeddings import EmbeddingStore
    from job.passes import collect
    from shared.catalog import Catalog

    step = progress or (lambda stage: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    step("read")
    labels = LabelLog(storage)
    labels.refresh()
    from_log = {i: e.label for i, e in labels.current().items()}
    catalog = Catalog(storage)
    transform, head_version = None, None
    if settings.classifier_space == "head":
        from shared.head import load_head

        head = load_head(storage, settings)
        transform, head_version = (lambda x: head.apply(x).embedding), head.version
    # One read of every shard: the labelled rows, and a seeded sample to fit the feature space on.
    seen = collect(
        EmbeddingStore(storage, encoder_version),
        skip=catalog.deleted_ids(),
        log_labels=from_log,
        vectors=transform,
        sample_size=settings.pass_sample,
        catalog=catalog,
    )
    if not seen.ids:
        raise NotReady(f"no embeddings for encoder {encoder_version}: embed first", code="no_embeddings")
    label_set = labels.ensure_label_set(settings.label_classes, [*seen.labels, *from_log.values()], user="retrain")
    timings["read"] = time.perf_counter() - t0

    classes_all = label_set.classes
    code = {name: i for i, name in enumerate(classes_all)}
    known = [j for j, lab in enumerate(seen.labels) if lab in code]
    ys = [code[seen.labels[j]] for j in known]
    counts = np.bincount(np.array(ys, dtype=np.int64), minlength=len(classes_all))
    left_out = {classes_all[c]: int(counts[c]) for c in range(len(classes_all)) if 0 < counts[c] < 2}
    keep_class = counts >= 2
    result = RetrainResult(version=None, left_out=left_out, rows_held_max=seen.rows_held_max)
    if keep_class.sum() < 2:
        result.reason = "need labels of at least two classes, two images each"
        return result
    # Classes are the label set's, in its order; a class with fewer than two labels is not trained.
    # Training rows in label-log order (ingest labels first, then the log's), as the label log gives them.
    classes = [c for c, keep in zip(classes_all, keep_class, strict=True) if keep]
    remap = np.cumsum(keep_class) - 1
    pairs = [(j, int(remap[y])) for j, y in zip(known, ys, strict=True) if keep_class[y]]
    pairs = sorted(pairs, key=_label_order(seen, from_log))
    lab_rows = np.array([p[0] for p in pairs], dtype=np.int64)
    y = np.array([p[1] for p in pairs], dtype=np.int64)

    step("features")
    t1 = time.perf_counter()
    feature_space = FeatureSpace(
        dim=settings.classifier_pca_dim if settings.classifier_space == "backbone" else 0, sample=settings.pass_sample
    )
    feature_space.fit(seen.sample_vectors)
    lab_feats = feature_space.transform(seen.labelled_vectors[lab_rows])
    timings["features"] = time.perf_counter() - t1

    step("evaluate")
    t1 = time.perf_counter()
    metrics = _evaluate(settings.classifier_kind, lab_feats, y, classes, settings.classifier_holdout, seed=0)
    timings["evaluate"] = time.perf_counter() - t1

    step("train")
    t1 = time.perf_counter()
    model = fit_classifier(settings.classifier_kind, lab_feats, y, seed=0)
    timings["train"] = time.perf_counter() - t1

    step("predict")
    t1 = time.perf_counter()
    # The second read: every row through the fitted model, keeping two classes and probabilities a row
    # and, for the labelling queues, the most uncertain unlabelled rows.
    n = len(seen.ids)
    pred, second = np.zeros(n, np.int16), np.zeros(n, np.int16)
    prob, second_prob = np.zeros(n, np.float32), np.zeros(n, np.float32)
    labelled = np.zeros(n, dtype=bool)
    labelled[seen.labelled] = True
    pools = {s: _Pool(_pool_keep(settings)) for s in STRATEGIES if s != "random"}
    for start, x in seen.chunks():
        feats = feature_space.transform(x)
        probs = full_proba(model, feats, len(classes))
        order = np.argsort(-probs, axis=1)[:, :2] if len(classes) > 1 else np.zeros((len(probs), 2), np.int64)
        top = np.take_along_axis(probs, order, axis=1)
        end = start + len(x)
        pred[start:end], second[start:end] = order[:, 0], order[:, 1]
        prob[start:end], second_prob[start:end] = top[:, 0], top[:, 1]
        rest = np.flatnonzero(~labelled[start:end])
        for strategy, pool in pools.items():
            pool.add(start + rest, uncertainty(probs[rest], strategy), feats[rest], probs[rest].argmax(axis=1))
    queue = _queues(pools, labelled, seen.ids, settings)
    result.rows_held_max = seen.rows_held_max
    timings["predict"] = time.perf_counter() - t1

    step("publish")
    t1 = time.perf_counter()
    version = claim_next(storage, MODELS, CLASSIFIERS)
    prefix = f"{CLASSIFIERS}{version}/"
    storage.put(
        MODELS,
        prefix + "predictions.npz",
        _npz(ids=np.array(seen.ids, dtype="S64"), pred=pred, prob=prob, second=second, second_prob=second_prob),
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
        images=n,
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
        "images": n,
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
    result.predictions = n
    result.seconds = {k: round(v, 3) for k, v in timings.items()}
    return result


def _label_order(seen: Collected, from_log: dict[str, str]) -> Callable[[tuple[int, int]], tuple[int, str, int]]:
    """Sort key of (labelled row, class) pairs: the order the labels come in, ingest labels first by id,
    then images labelled only in the log in the order they were first labelled (the classifier and its
    held-out split depend on the order of their rows)."""
    first = {image_id: k for k, image_id in enumerate(from_log)}

    def key(pair: tuple[int, int]) -> tuple[int, str, int]:
        image_id = seen.ids[int(seen.labelled[pair[0]])]
        return (0, image_id, 0) if seen.from_ingest[pair[0]] else (1, "", first[image_id])

    return key


def _pool_keep(settings: Settings) -> int:
    """Unlabelled candidates kept per uncertainty strategy: ten times the pool the queue is picked from,
    so the class-balance guard can look past the pool (:func:`job.active_learning.diverse_order`)."""
    return 10 * max(settings.label_queue_size, int(round(settings.al_pool_factor * settings.label_queue_size)))


class _Pool:
    """The ``keep`` highest-scoring rows offered so far (ties: the earlier row), with their features and
    groups: what a labelling queue is picked from, held while every row streams past."""

    def __init__(self, keep: int):
        self.keep = keep
        self.rows = np.zeros(0, np.int64)
        self.scores = np.zeros(0, np.float64)
        self.feats: np.ndarray | None = None
        self.groups = np.zeros(0, np.int64)

    def add(self, rows: np.ndarray, scores: np.ndarray, feats: np.ndarray, groups: np.ndarray) -> None:
        """Offer rows (int64 (c,), ascending, after every row offered before) with their scores, features
        (c, p) and groups."""
        all_rows = np.concatenate([self.rows, rows])
        all_scores = np.concatenate([self.scores, scores])
        all_feats = feats if self.feats is None else np.concatenate([self.feats, feats])
        all_groups = np.concatenate([self.groups, groups])
        if len(all_rows) > self.keep:
            best = np.sort(np.lexsort((all_rows, -all_scores))[: self.keep])  # kept in row order
            all_rows, all_scores, all_feats, all_groups = (
                all_rows[best],
                all_scores[best],
                all_feats[best],
                all_groups[best],
            )
        self.rows, self.scores, self.feats, self.groups = all_rows, all_scores, all_feats, all_groups


def _queues(
    pools: dict[str, _Pool], labelled: np.ndarray, ids: list[str], settings: Settings
) -> dict[str, list[dict[str, Any]]]:
    """For each strategy, the unlabelled images to ask about, best first.

    Uncertainty strategies order the ``label_queue_size`` picks so that every run of consecutive
    picks is spread over the uncertain pool's clusters (one pick per cluster, most uncertain first),
    picked among the most uncertain rows each strategy's pool kept.
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
            out[strategy] = [{"id": ids[int(rest[p])], "uncertainty": None} for p in pick]
            continue
        pool = pools[strategy]
        assert pool.feats is not None
        balance = settings.al_class_balance or None
        pick = diverse_order(
            pool.scores,
            pool.feats,
            size,
            pool_factor=settings.al_pool_factor,
            groups=pool.groups if balance else None,
            max_group_share=balance,
        )
        out[strategy] = [{"id": ids[int(pool.rows[p])], "uncertainty": round(float(pool.scores[p]), 5)} for p in pick]
    return out
