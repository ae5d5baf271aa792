"""Reading published analysis reports (the query side of :mod:`job.run_analysis`).

A report version is served only once its manifest exists, and only the files its manifest lists (a
client names a file, never a path); the classifier under ``classify/`` is not served as a file (see
:mod:`shared.classify`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from shared.errors import BadRequest, NotFound, NotReady
from shared.live_index import LiveIndex
from shared.manifests import ReportManifest
from shared.storage import REPORTS, Storage
from shared.versions import read_pointer

_VERSION_RE = re.compile(r"^v\d{6}$")
CONTENT_TYPES = {".json": "application/json", ".html": "text/html; charset=utf-8", ".png": "image/png"}
REVIEW_LISTS = ("anomalies", "mislabels")
CLASSIFY = "classify/"  # the report's best classifier, in its served form (not served as files)


class NoReport(NotFound):
    code = "no_report"


def latest_version(storage: Storage) -> str:
    """The published report version.

    Raises:
        NoReport: before the first analysis.
    """
    version = read_pointer(storage, REPORTS)
    if version is None:
        raise NoReport('no analysis report yet: run `clusterlens analyse` or POST /api/jobs {"kind": "analyse"}')
    return version


def resolve(storage: Storage, version: str) -> tuple[str, ReportManifest]:
    """``latest`` or ``vNNNNNN`` -> (version, manifest).

    Raises:
        NoReport: unknown or incomplete version. BadRequest: not a version name.
    """
    if version == "latest":
        version = latest_version(storage)
    if not _VERSION_RE.match(version):
        raise BadRequest("a report version is `latest` or like v000003", code="invalid_version")
    if not storage.exists(REPORTS, f"{version}/manifest.json"):
        raise NoReport(f"no report {version}")
    return version, ReportManifest.parse(storage.get_json(REPORTS, f"{version}/manifest.json"), f"report {version}")


def report_file(storage: Storage, version: str, name: str) -> tuple[bytes, str]:
    """A file of a report version, with its content type.

    Raises:
        NoReport: unknown version. NotFound: a name the report does not list.
    """
    version, manifest = resolve(storage, version)
    if name not in manifest.files or name.startswith(CLASSIFY):
        raise NotFound(f"report {version} has no file {name!r}", code="no_report_file")
    suffix = name[name.rfind(".") :]
    return storage.get(REPORTS, f"{version}/{name}"), CONTENT_TYPES.get(suffix, "application/octet-stream")


def report_summary(storage: Storage, version: str = "latest") -> dict[str, Any]:
    """A report's version, metrics and the names of the files it serves."""
    version, manifest = resolve(storage, version)
    metrics = report_metrics(storage, version)
    files = [n for n in manifest.files if not n.startswith(CLASSIFY)]
    return {"version": version, "metrics": metrics, "files": files}


def report_metrics(storage: Storage, version: str) -> dict[str, Any]:
    """A published version's ``metrics.json``."""
    return dict(json.loads(storage.get(REPORTS, f"{version}/metrics.json")))


def review_list(
    storage: Storage, kind: str, limit: int, offset: int, label_of: Callable[[str], str | None] | None = None
) -> dict[str, Any]:
    """The latest report's anomalies or likely mislabels, best first, a page at a time.

    ``label_of`` (image id -> its label now) adds ``current_label``, and marks mislabels relabelled
    since the report as ``resolved``.

    Raises:
        BadRequest: limit or offset out of range. NoReport: no report yet.
    """
    if kind not in REVIEW_LISTS:
        raise ValueError(kind)
    if not 1 <= limit <= 500 or not 0 <= offset <= 10_000_000:
        raise BadRequest("limit must be 1 to 500 and offset at least 0", code="invalid_limit")
    version, manifest = resolve(storage, "latest")
    name = f"{kind}.json"
    metrics = report_metrics(storage, version)
    if name not in manifest.files:
        reason = manifest.steps.get(kind, {}).get("reason", "the step did not run")
        return {"version": version, "total": 0, "items": [], "skipped": reason}
    items = json.loads(storage.get(REPORTS, f"{version}/{name}"))["items"]
    page = items[offset : offset + limit]
    for item in page:
        if label_of is not None:
            now = label_of(item["id"])
            item["current_label"] = now
            if kind == "mislabels":
                item["resolved"] = now != item["label"]
    return {"version": version, "total": len(items), "offset": offset, "items": page, "summary": metrics.get(kind)}


def current_report(storage: Storage) -> str | None:
    """The published report version, or None before the first analysis."""
    return read_pointer(storage, REPORTS)


def review(live: LiveIndex, kind: str, limit: int, offset: int) -> dict[str, Any]:
    """A page of the latest report's anomalies or mislabels with each image's label now (where an
    index is served; see :func:`review_list`)."""
    try:
        live.get()
        label_of: Callable[[str], str | None] | None = live.label_of
    except NotReady:
        label_of = None
    return review_list(live.storage, kind, limit, offset, label_of)
