"""``POST /api/classify``: an uploaded image's top classes from the latest analysis report's best
model, and its nearest labelled neighbours in the live index.

The model is read once per report version (:class:`shared.classifier.ClassifierModel`); a 10-NN
best model votes over the neighbours instead. numpy, onnxruntime and FAISS only.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from shared.classifier import ClassifierModel
from shared.errors import BadRequest, NotReady, VersionMismatch
from shared.filters import SearchFilters
from shared.head import ProjectionHead, load_head
from shared.imaging import decode_image
from shared.live_index import LiveIndex
from shared.manifests import ClassifierManifest
from shared.models import Models
from shared.reports import CLASSIFY, latest_version, report_metrics, resolve
from shared.settings import Settings
from shared.storage import REPORTS, Storage


class Classifier:
    """The latest report's best model, loaded once per report version. Thread-safe."""

    def __init__(self, storage: Storage, settings: Settings):
        self.storage = storage
        self.settings = settings
        self._model: ClassifierModel | None = None
        self._lock = threading.Lock()

    def model(self) -> ClassifierModel:
        """The model of the latest report (its manifest's ``version`` is the report's).

        Raises:
            NoReport: no report yet. NotReady: the report has no classifier (no labels then).
            VersionMismatch: the report was made in another projection head's space.
        """
        version = latest_version(self.storage)  # one small read per call; the rest once per version
        with self._lock:
            if self._model is None or self._model.manifest.version != version:
                version, manifest = resolve(self.storage, version)
                entry = report_metrics(self.storage, version).get("classify")
                if entry is None:
                    reason = manifest.steps.get("classifiers", {}).get("reason", "")
                    raise NotReady(
                        f"report {version} has no classifier ({reason}): label images, then analyse",
                        code="no_classifier",
                    )
                parsed = ClassifierManifest.parse(entry, f"report {version} classifier")
                parsed = parsed.model_copy(update={"version": version})
                self._model = ClassifierModel.load(
                    self.storage, REPORTS, f"{version}/{CLASSIFY}", parsed, self._head(parsed)
                )
            return self._model

    def _head(self, manifest: ClassifierManifest) -> ProjectionHead | None:
        """The projection head the report's features were made in, if any.

        Raises:
            VersionMismatch: the current head is another one than the report's.
        """
        if not manifest.head_version:
            return None
        head = load_head(self.storage, self.settings)
        if head.version != manifest.head_version:
            raise VersionMismatch(
                f"report {manifest.version} was made in head space {manifest.head_version}: run the analysis again"
            )
        return head

    def classify(self, models: Models, live: LiveIndex, data: bytes, top: int = 5) -> dict[str, Any]:
        """Top classes with probabilities for an image, and its nearest labelled neighbours.

        Raises:
            InvalidImage and friends: a bad upload. NoReport, NotReady: nothing to classify with.
            VersionMismatch: the report was made with another encoder or head than the one serving.
        """
        if not 1 <= top <= 100:
            raise BadRequest("top must be 1 to 100", code="invalid_top")
        t0 = time.perf_counter()
        decoded = decode_image(
            data, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_image_pixels
        )
        model = self.model()
        encoder = models.image()
        if model.manifest.encoder_version != encoder.version:
            raise VersionMismatch(
                f"report {model.manifest.version} was made with encoder {model.manifest.encoder_version} but "
                f"images are embedded with {encoder.version}: run the analysis again"
            )
        raw = encoder.encode([decoded.rgb]).vectors
        t1 = time.perf_counter()
        index = live.get()
        neighbours = index.search(raw, model.manifest.knn_k, filters=SearchFilters(labelled=True))
        near = [
            {"id": str(index.ids[r]), "label": index.label_of(r), "score": round(float(s), 6)}
            for s, r in zip(neighbours.scores[0], neighbours.rows[0], strict=True)
            if r >= 0
        ]
        classes = model.classes
        if model.session is None:
            alpha = model.manifest.knn_alpha
            counts = np.array([sum(n["label"] == c for n in near) for c in classes], dtype=np.float64)
            probs = (counts + alpha) / (counts.sum() + alpha * len(classes))
        else:
            probs = model.predict_proba(raw)[0]
        order = np.argsort(-probs)[:top]
        t2 = time.perf_counter()
        return {
            "classes": [{"label": classes[int(c)], "prob": round(float(probs[c]), 4)} for c in order],
            "model": {
                "kind": model.kind,
                "report": model.manifest.version,
                "held_out_accuracy": model.manifest.accuracy,
                "labelled": model.manifest.labelled,
            },
            "neighbours": near,
            "index_version": index.manifest.version,
            "timing_ms": {"embed_and_model": round((t1 - t0) * 1000, 2), "neighbours": round((t2 - t1) * 1000, 2)},
        }
