"""The analysis job: every step of :mod:`job.analysis`, the figures and page of :mod:`job.report_render`,
published as the next report version (``clusterlens analyse``, job kind ``analyse``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from job.analysis import (
    AnalysisData,
    Progress,
    Report,
    anomaly_step,
    classifier_step,
    cluster_step,
    load_data,
    maps_step,
    mislabel_step,
    publish_classifier,
)
from job.report_render import render_figures, render_html
from shared.settings import Settings
from shared.storage import REPORTS, Storage
from shared.versions import claim_next, prune, swap_pointer

log = logging.getLogger(__name__)


def run_analysis(
    storage: Storage, settings: Settings, encoder_version: str, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every step, render the report and publish it as the next version.

    Returns:
        the report's metrics (``version`` included).

    Raises:
        NotReady: nothing embedded yet.
    """
    step_progress = progress or (lambda stage, done, total: None)
    report = Report()
    t_all = time.perf_counter()

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        step_progress(name, 0, 1)
        t0 = time.perf_counter()
        value = fn()
        if name not in report.steps:
            report.steps[name] = {"status": "done", "seconds": round(time.perf_counter() - t0, 3)}
        return value

    data: AnalysisData = timed("load", lambda: load_data(storage, settings, encoder_version))
    clusters = timed("clustering", lambda: cluster_step(data, settings, report))
    drawn = timed("maps", lambda: maps_step(data, clusters, settings, report, step_progress))
    fitted = timed("classifiers", lambda: classifier_step(data, settings, report, step_progress))
    if fitted is not None:
        timed("classify_model", lambda: publish_classifier(data, fitted, report))
    else:
        report.skip("classify_model", "no classifier was trained")
    anomalies = timed("anomalies", lambda: anomaly_step(data, clusters, settings, report))
    mislabels = timed("mislabels", lambda: mislabel_step(data, settings, report, step_progress))

    version = claim_next(storage, REPORTS)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    report.metrics.update(
        {
            "version": version,
            "created_at": created,
            "encoder_version": encoder_version,
            "head_version": data.head_version,
            "images": len(data.ids),
            "labelled": int(len(data.labelled)),
            "classes": data.classes,
            "feature_dim": data.feature_dim,
            "sample": int(len(data.sample)),
            "rows_held_max": data.passes.rows_held_max,
        }
    )
    timed("figures", lambda: render_figures(storage, data, clusters, drawn, fitted, anomalies, mislabels, report))
    report.steps["total"] = {"status": "done", "seconds": round(time.perf_counter() - t_all, 3)}
    report.metrics["steps"] = report.steps
    report.json("metrics.json", report.metrics)
    report.files["report.html"] = render_html(report, anomalies, mislabels)
    step_progress("publish", 0, 1)
    for name, blob in sorted(report.files.items()):
        storage.put(REPORTS, f"{version}/{name}", blob)
    storage.put_json(
        REPORTS,
        f"{version}/manifest.json",
        {"version": version, "created_at": created, "files": sorted(report.files), "steps": report.steps},
    )
    swap_pointer(storage, REPORTS, version)
    prune(storage, REPORTS, settings.analysis_keep_versions, version)
    log.info("analysis report %s: %d images, %d files", version, len(data.ids), len(report.files))
    return report.metrics


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a report (a job's result, the CLI's output)."""
    clustering = metrics.get("clustering", {})
    classifiers = metrics.get("classifiers")
    best = classifiers["best"] if classifiers else None
    return {
        "report_version": metrics["version"],
        "images": metrics["images"],
        "labelled": metrics["labelled"],
        "k": clustering.get("k"),
        "silhouette": clustering.get("silhouette"),
        "agreement": clustering.get("agreement"),
        "maps": {m: v.get("seconds") for m, v in metrics.get("maps", {}).items()},
        "accuracy": {m: v["accuracy"] for m, v in classifiers["models"].items()} if classifiers else None,
        "best_model": best,
        "anomalies": metrics.get("anomalies", {}).get("flagged"),
        "mislabels": metrics.get("mislabels", {}).get("flagged"),
        "skipped": {k: v["reason"] for k, v in metrics["steps"].items() if v["status"] == "skipped"},
        "seconds": {k: v["seconds"] for k, v in metrics["steps"].items()},
    }
