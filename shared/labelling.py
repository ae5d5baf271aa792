"""The labelling endpoints' logic: the next images to label, and taking a batch of labels.

API side (numpy only). The queue comes from the published classifier (computed by the retrain job
for each strategy); before the first classifier, or once its queue is used up, the index's typical
images come first (the densest image of each of up to 500 clusters of a sample, TypiClust-style:
representative, not outliers), then images round-robin over the index's clusters, so the first labels
cover the collection. With
``CLUSTERLENS_AL_RELABEL_SHARE`` a share of each batch re-asks for the labels the latest analysis
report found most likely wrong (``picked_by: "relabel"``, with the label now and the suggestion).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np

from shared.catalog import Catalog, check_image_id
from shared.classifier import ClassifierView
from shared.errors import BadRequest, ClusterlensError, NotFound
from shared.index import ClusterIndex
from shared.jobs import JobMessage, enqueue
from shared.labels import STRATEGIES, LabelSet, check_class_name, check_user
from shared.live_index import LiveIndex
from shared.queues import JobQueues
from shared.reports import current_report, review_list

log = logging.getLogger(__name__)

MAX_QUEUE_N = 200


def _cold_order(index: ClusterIndex) -> np.ndarray:
    """Rows round-robin over clusters (first of each cluster, then second, ...); within a cluster,
    id order, which for content hashes is a fixed random order."""
    clusters = np.asarray(index.clusters)
    by_cluster = np.lexsort((index.ids.sort_key(), clusters))
    clusters = clusters[by_cluster]
    starts = np.searchsorted(clusters, clusters, side="left")
    rank = np.arange(len(by_cluster)) - starts
    return np.asarray(by_cluster[np.lexsort((clusters, rank))], dtype=np.int64)


def _cold_start(index: ClusterIndex) -> Iterator[tuple[int, str]]:
    """Rows to offer without a classifier, with why: the index's typical rows first (``typical``: the
    densest image of each cluster of a sample, most typical first; built with the index), then every
    row round-robin over the index's clusters (``cluster_round_robin``)."""
    for row in index.cold_start.tolist():
        yield int(row), "typical"
    for row in _cold_order(index).tolist():
        yield int(row), "cluster_round_robin"


def label_queue(live: LiveIndex, n: int = 20, strategy: str | None = None) -> dict[str, Any]:
    """The next ``n`` unlabelled images to label, with the current prediction and uncertainty.

    Raises:
        BadRequest: n outside 1..200 or an unknown strategy. NotReady: no index yet.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_QUEUE_N:
        raise BadRequest(f"n must be an integer from 1 to {MAX_QUEUE_N}", code="invalid_n")
    strategy = strategy or live.settings.al_strategy
    if strategy not in STRATEGIES:
        raise BadRequest(f"strategy must be one of {', '.join(STRATEGIES)}", code="invalid_strategy")
    index = live.get()
    live.refresh_labels()
    view = live.overlay.classifier()
    labelled = index.labelled()[0]
    skip = np.zeros(index.count, dtype=bool)
    skip[labelled] = True
    skip[index.hidden] = True
    picked: list[tuple[int, float | None, str]] = []
    relabel = _relabel_requests(live, index, int(round(live.settings.al_relabel_share * n)))
    picked += [(row, None, "relabel") for row, _ in relabel]
    if view is not None:
        queued = view.queue.get(strategy, [])
        rows = index.rows_of([q["id"] for q in queued])
        for row, item in zip(rows, queued, strict=True):
            if row >= 0 and not skip[row]:
                picked.append((int(row), item["uncertainty"], strategy))
                skip[row] = True
                if len(picked) == n:
                    break
    if len(picked) < n:  # no classifier yet, or its queue used up: typical images first, then round-robin
        for row, source in _cold_start(index):
            if not skip[row]:
                skip[row] = True
                picked.append((int(row), None, source))
                if len(picked) == n:
                    break
    why = {row: item for row, item in relabel}
    items = []
    for row, score, source in picked:
        image_id = str(index.ids[row])
        item = {
            "id": image_id,
            "cluster": int(index.clusters[row]),
            "prediction": view.prediction(image_id) if view else None,
            "uncertainty": score,
            "picked_by": source,
        }
        if row in why:  # a re-label request: the label now and what the report suggests
            item["label"] = why[row]["label"]
            item["suggested"] = why[row]["suggested"]
            item["given_probability"] = why[row].get("given_probability")
        items.append(item)
    label_set = live.overlay.labels.label_set()
    entries = len(live.overlay.labels.entries())
    return {
        "items": items,
        "strategy": strategy,
        "classifier": _classifier_summary(view, entries),
        "label_set": label_set.to_json() if label_set else None,
        "labelled": len(labelled),
        "unlabelled": int(index.count - len(labelled) - len(index.hidden)),
    }


def _relabel_requests(live: LiveIndex, index: ClusterIndex, n: int) -> list[tuple[int, dict[str, Any]]]:
    """Up to ``n`` of the latest report's likely mislabels (most suspect first) still labelled as the
    report found them: (row, report item). None without a report or with ``n`` = 0."""
    if n <= 0 or current_report(live.storage) is None:
        return []
    try:
        listed = review_list(live.storage, "mislabels", 500, 0)
    except (NotFound, BadRequest):
        return []
    out: list[tuple[int, dict[str, Any]]] = []
    hidden = set(index.hidden.tolist())
    for item in listed["items"]:
        row = index.row_of(item["id"])
        if row is None or row in hidden or index.label_of(row) != item["label"]:
            continue  # not indexed, hidden, or relabelled since
        out.append((row, item))
        if len(out) == n:
            break
    return out


def _classifier_summary(view: ClassifierView | None, entries: int) -> dict[str, Any] | None:
    if view is None:
        return None
    m = view.manifest
    return {
        "version": m.version,
        "kind": m.kind,
        "trained_at": m.trained_at,
        "labels_used": m.labels_used,
        "accuracy": m.metrics.get("accuracy"),
        "macro_f1": m.metrics.get("macro_f1"),
        "labels_since": max(0, entries - m.log_entries),
    }


def submit_labels(live: LiveIndex, queues: JobQueues | None, body: Any) -> tuple[int, dict[str, Any]]:
    """Take a batch ``{"labels": [{"id", "label"}, ...], "user": optional}``.

    Valid entries are stored even when others in the batch are not; each bad one is reported with
    its position. Queues a retrain once ``retrain_after_labels`` labels have arrived since the last.

    Returns:
        (HTTP status, response body): 200 when any label was stored, 400 when none was.

    Raises:
        BadRequest: the body is not such an object, or holds too many labels.
    """
    settings = live.settings
    if not isinstance(body, dict) or not isinstance(body.get("labels"), list):
        raise BadRequest('send {"labels": [{"id": ..., "label": ...}, ...]}', code="invalid_body")
    items = body["labels"]
    if not 1 <= len(items) <= settings.max_label_batch:
        raise BadRequest(f"send 1 to {settings.max_label_batch} labels at a time", code="invalid_body")
    user = check_user(body.get("user"))
    label_set = _label_set_for(live, items, user)
    allowed = set(label_set.classes)
    catalog = Catalog(live.storage)
    try:
        index: ClusterIndex | None = live.get()
    except ClusterlensError:
        index = None
    accepted: list[tuple[str, str]] = []
    errors: list[dict[str, Any]] = []
    for position, item in enumerate(items):
        raw_id = item.get("id") if isinstance(item, dict) else None
        try:
            if not isinstance(item, dict):
                raise BadRequest('each label is an object {"id": ..., "label": ...}', code="invalid_item")
            image_id = check_image_id(raw_id)  # type: ignore[arg-type]
            label = check_class_name(item.get("label"))
            if label not in allowed:
                shown = ", ".join(label_set.classes[:30])
                raise BadRequest(f"unknown label {label!r}; the label set has: {shown}", code="unknown_label")
            indexed = index is not None and (row := index.rows_of([image_id])[0]) >= 0 and row not in index.hidden
            if not indexed and not catalog.exists(image_id):
                raise BadRequest(f"no image with id {image_id}", code="image_not_found")
            accepted.append((image_id, label))
        except ClusterlensError as exc:
            errors.append(
                {
                    "index": position,
                    "id": raw_id if isinstance(raw_id, str) else None,
                    "error": {"code": exc.code, "message": exc.message},
                }
            )
    out: dict[str, Any] = {
        "accepted": len(accepted),
        "rejected": len(errors),
        "errors": errors,
        "label_set": label_set.to_json(),
    }
    if not accepted:
        out["error"] = {"code": "invalid_labels", "message": f"none of the {len(items)} labels could be taken"}
        return 400, out
    out["batch"] = live.overlay.labels.append(accepted, user=user, label_set=label_set.version)
    live.refresh_labels()
    out["retrain_job"] = _maybe_retrain(live, queues)
    return 200, out


def _label_set_for(live: LiveIndex, items: list[Any], user: str) -> LabelSet:
    """The current label set. When none is defined or configured, the labels given at ingest create
    it; with none of those, the first submitted batch does."""
    current = live.overlay.labels.label_set()
    if current is not None:
        return current
    first: list[str] = []
    try:
        first += live.get().built_label_names  # the labels given at ingest
    except ClusterlensError:
        pass
    if not first:
        for item in items:
            if isinstance(item, dict):
                try:
                    first.append(check_class_name(item.get("label")))
                except ClusterlensError:
                    continue
    return live.overlay.labels.ensure_label_set(live.settings.label_classes, first, user=user)


def _maybe_retrain(live: LiveIndex, queues: JobQueues | None) -> str | None:
    """Queue one retrain per classifier version once enough new labels have come in."""
    threshold = live.settings.retrain_after_labels
    if not threshold or queues is None:
        return None
    view = live.overlay.classifier()
    since = len(live.overlay.labels.entries()) - (view.manifest.log_entries if view else 0)
    if since < threshold:
        return None
    basis = view.version if view else "v000000"
    message = JobMessage(  # one per `threshold` new labels per classifier version
        job_id=f"retrain-labels-{basis}-{since // threshold}",
        kind="retrain",
        origin=f"labels:{since} since {basis}",
        created_at=datetime.now(UTC),
    )
    try:
        record, _ = enqueue(live.storage, queues, message)
    except Exception:  # noqa: BLE001 - the labels are stored; a retrain can be started later
        log.exception("could not queue a retrain after labels")
        return None
    return record.job_id


def label_summary(live: LiveIndex, limit: int = 20) -> dict[str, Any]:
    """Current label counts per class (ingest labels included) and the latest ``limit`` entries."""
    counts: dict[str, int] = {}
    try:
        index = live.get()
        live.refresh_labels()  # reads the log's new batches and lays them over the index
        codes, n = np.unique(index.labelled()[1], return_counts=True)
        counts = {index.label_names[int(c)]: int(k) for c, k in zip(codes, n, strict=True)}
        labelled = int(n.sum())
    except ClusterlensError:  # no index yet: the log alone
        live.overlay.labels.refresh()
        current = live.overlay.labels.current()
        for entry in current.values():
            counts[entry.label] = counts.get(entry.label, 0) + 1
        labelled = len(current)
    entries = live.overlay.labels.entries()
    label_set = live.overlay.labels.label_set()
    return {
        "labelled": labelled,
        "counts": counts,
        "log_entries": len(entries),
        "label_set": label_set.to_json() if label_set else None,
        "recent": [
            {"id": e.id, "label": e.label, "user": e.user, "at": e.at, "label_set": e.label_set}
            for e in reversed(entries[-limit:] if limit else [])
        ],
    }


def classifier_summary(live: LiveIndex) -> dict[str, Any]:
    """The current classifier (metrics per class) and the metrics of every retrain, oldest first."""
    from shared.classifier import history

    view = live.overlay.classifier()
    live.overlay.labels.refresh()
    current = None
    if view is not None:
        current = {
            **(_classifier_summary(view, len(live.overlay.labels.entries())) or {}),
            "classes": view.classes,
            "label_counts": view.manifest.label_counts,
            "metrics": view.manifest.metrics,
            "left_out": view.manifest.left_out,
            "images": view.manifest.images,
        }
    return {"current": current, "history": history(live.storage)}
