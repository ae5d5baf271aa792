"""Reading published analysis reports, and classifying an uploaded image with the report's best model.

The API side of :mod:`job.analysis`: numpy, onnxruntime and FAISS only. A report version is
served only once its manifest exists, and only the files its manifest lists (a client names a
file, never a path).
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import BadRequest, NotFound, NotReady, VersionMismatch
from shared.filters import SearchFilters
from shared.storage import REPORTS, Storage
from shared.versions import read_pointer

if TYPE_CHECKING:
    from shared.head import ProjectionHead
    from shared.search import SearchService
    from shared.settings import Settings

_VERSION_RE = re.compile(r"^v\d{6}$")
CONTENT_TYPES = {".json": "application/json", ".html": "text/html; charset=utf-8", ".png": "image/png"}
REVIEW_LISTS = ("anomalies", "mislabels")


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


def resolve(storage: Storage, version: str) -> tuple[str, dict[str, Any]]:
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
    return version, storage.get_json(REPORTS, f"{version}/manifest.json")


def report_file(storage: Storage, version: str, name: str) -> tuple[bytes, str]:
    """A file of a report version, with its content type.

    Raises:
        NoReport: unknown version. NotFound: a name the report does not list.
    """
    version, manifest = resolve(storage, version)
    if name not in manifest["files"] or name.startswith("classify/"):
        raise NotFound(f"report {version} has no file {name!r}", code="no_report_file")
    suffix = name[name.rfind(".") :]
    return storage.get(REPORTS, f"{version}/{name}"), CONTENT_TYPES.get(suffix, "application/octet-stream")


def report_summary(storage: Storage, version: str = "latest") -> dict[str, Any]:
    """A report's metrics with links to its files."""
    version, manifest = resolve(storage, version)
    metrics = json.loads(storage.get(REPORTS, f"{version}/metrics.json"))
    files = {n: f"/api/reports/{version}/{n}" for n in manifest["files"] if not n.startswith("classify/")}
    return {"version": version, "metrics": metrics, "files": files, "html": f"/api/reports/{version}/report.html"}


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
    metrics = json.loads(storage.get(REPORTS, f"{version}/metrics.json"))
    if name not in manifest["files"]:
        reason = manifest["steps"].get(kind, {}).get("reason", "the step did not run")
        return {"version": version, "total": 0, "items": [], "skipped": reason}
    items = json.loads(storage.get(REPORTS, f"{version}/{name}"))["items"]
    page = items[offset : offset + limit]
    for item in page:
        item["url"] = f"/api/images/{item['id']}"
        if label_of is not None:
            now = label_of(item["id"])
            item["current_label"] = now
            if kind == "mislabels":
                item["resolved"] = now != item["label"]
    return {"version": version, "total": len(items), "offset": offset, "items": page, "summary": metrics.get(kind)}


class ClassifyModel:
    """The best classifier of one report: its feature space and, unless it is the 10-NN vote, an ONNX model."""

    def __init__(self, storage: Storage, version: str, manifest: dict[str, Any], head: ProjectionHead | None = None):
        import onnxruntime as ort

        self.version = version
        self.entry: dict[str, Any] = manifest
        self.head = head  # the projection head the features were made in, if any
        with np.load(io.BytesIO(storage.get(REPORTS, f"{version}/classify/features.npz")), allow_pickle=False) as f:
            self.mean = f["mean"].astype(np.float32)
            self.components = f["components"].astype(np.float32)
        self.session = None
        if manifest.get("model_file"):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(
                storage.get(REPORTS, f"{version}/{manifest['model_file']}"), options, providers=["CPUExecutionProvider"]
            )

    @property
    def kind(self) -> str:
        return str(self.entry["kind"])

    @property
    def classes(self) -> list[str]:
        return list(self.entry["classes"])

    def features(self, vectors: np.ndarray) -> np.ndarray:
        """Embeddings (n, d) -> the features the model was trained on (power, L2, PCA), float32 (n, p)."""
        x: np.ndarray = np.asarray(vectors, dtype=np.float32)
        power = float(self.entry.get("power", 1.0))
        if power != 1:
            x = np.sign(x) * np.abs(x) ** power
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray((x - self.mean) @ self.components, dtype=np.float32)

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes) from the ONNX model."""
        if self.session is None:
            raise RuntimeError("the 10-NN model votes over the index; it has no ONNX model")
        out = self.session.run(["probabilities"], {"x": self.features(vectors)})[0]
        return np.asarray(out, dtype=np.float64)


class Classifier:
    """``POST /api/classify``: the latest report's best model, loaded once per report version."""

    def __init__(self, storage: Storage, settings: Settings):
        self.storage = storage
        self.settings = settings
        self._model: ClassifyModel | None = None
        self._lock = threading.Lock()

    def model(self) -> ClassifyModel:
        """The model of the latest report.

        Raises:
            NoReport: no report yet. NotReady: the report has no classifier (no labels then).
        """
        version = latest_version(self.storage)  # one small read per call; the rest once per version
        with self._lock:
            if self._model is None or self._model.version != version:
                version, manifest = resolve(self.storage, version)
                entry = json.loads(self.storage.get(REPORTS, f"{version}/metrics.json")).get("classify")
                if entry is None:
                    reason = manifest["steps"].get("classifiers", {}).get("reason", "")
                    raise NotReady(
                        f"report {version} has no classifier ({reason}): label images, then analyse",
                        code="no_classifier",
                    )
                self._model = ClassifyModel(self.storage, version, entry, self._head(version, entry))
            return self._model

    def _head(self, version: str, entry: dict[str, Any]) -> ProjectionHead | None:
        """The projection head a report's features were made in (loaded once per report version).

        Raises:
            VersionMismatch: the current head is another one than the report's.
        """
        if not entry.get("head_version"):
            return None
        from shared.head import load_head

        s = self.settings
        head = load_head(self.storage, s.data_dir / "cache", providers=s.ort_providers)
        if head.version != entry["head_version"]:
            raise VersionMismatch(
                f"report {version} was made in head space {entry['head_version']}: run the analysis again"
            )
        return head

    def classify(self, service: SearchService, data: bytes, top: int = 5) -> dict[str, Any]:
        """Top classes with probabilities for an image, and its 10 nearest labelled neighbours.

        Raises:
            InvalidImage and friends: a bad upload. NoReport, NotReady: nothing to classify with.
            VersionMismatch: the report was made with another encoder or head than the one serving.
        """
        from shared.imaging import decode_image

        if not 1 <= top <= 100:
            raise BadRequest("top must be 1 to 100", code="invalid_top")
        t0 = time.perf_counter()
        decoded = decode_image(
            data, max_bytes=service.settings.max_upload_bytes, max_pixels=service.settings.max_image_pixels
        )
        model = self.model()
        encoder = service.encoder()
        if model.entry["encoder_version"] != encoder.version:
            raise VersionMismatch(
                f"report {model.version} was made with encoder {model.entry['encoder_version']} but images are "
                f"embedded with {encoder.version}: run the analysis again"
            )
        raw = encoder.encode([decoded.rgb]).vectors
        vector = model.head.apply(raw).embedding if model.head is not None else raw
        t1 = time.perf_counter()
        index = service.index()
        neighbours = index.search(raw, int(model.entry.get("knn_k", 10)), filters=SearchFilters(labelled=True))
        near = [
            {
                "id": str(index.ids[r]),
                "label": index.label_of(r),
                "score": round(float(s), 6),
                "url": f"/api/images/{index.ids[r]}",
            }
            for s, r in zip(neighbours.scores[0], neighbours.rows[0], strict=True)
            if r >= 0
        ]
        classes = model.classes
        if model.session is None:
            alpha = float(model.entry.get("knn_alpha", 0.5))
            counts = np.array([sum(n["label"] == c for n in near) for c in classes], dtype=np.float64)
            probs = (counts + alpha) / (counts.sum() + alpha * len(classes))
        else:
            probs = model.predict_proba(vector)[0]
        order = np.argsort(-probs)[:top]
        t2 = time.perf_counter()
        return {
            "classes": [{"label": classes[int(c)], "prob": round(float(probs[c]), 4)} for c in order],
            "model": {
                "kind": model.kind,
                "report": model.version,
                "held_out_accuracy": model.entry.get("accuracy"),
                "labelled": model.entry.get("labelled"),
            },
            "neighbours": near,
            "index_version": index.manifest.get("version"),
            "timing_ms": {"embed_and_model": round((t1 - t0) * 1000, 2), "neighbours": round((t2 - t1) * 1000, 2)},
        }


def current_report(storage: Storage) -> str | None:
    """The published report version, or None before the first analysis."""
    return read_pointer(storage, REPORTS)
