"""Trained label classifiers, read with numpy and onnxruntime only (the query side).

A classifier is published in one served form (:func:`job.classifier.export`) wherever it lives:
``features.npz`` (the feature transform), ``model.onnx`` (logistic regression or LightGBM; none for
kNN, which votes over the live index's labelled images) and a :class:`ClassifierManifest`.
:class:`ClassifierModel` reads that form, for the analysis report's best model (``POST
/api/classify``) and for the retrain job's versions.

The retrain job (:mod:`job.retrain`) trains on every current label and publishes a version with
the model, its metrics on a held-out labelled split, a prediction for every image and the labelling
queue for each strategy, so the API only reads::

    models/classifiers/v000004/manifest.json     kind, classes, metrics, label and encoder versions
    models/classifiers/v000004/features.npz      the feature transform (mean, PCA components, power)
    models/classifiers/v000004/model.onnx        the model (absent for kNN)
    models/classifiers/v000004/predictions.npz   ids, predicted class, its probability, runner-up
    models/classifiers/v000004/queue.json        strategy -> unlabelled ids to ask about, in order
    models/classifiers/CURRENT.json              the pointer, swapped last
    models/classifiers/history/<time>-v000004.json   one metrics entry per retrain, never rewritten

Nothing here unpickles: arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import NotReady
from shared.features import FeatureTransform
from shared.manifests import ClassifierManifest, RetrainManifest
from shared.sessions import open_session
from shared.storage import MODELS, Storage
from shared.versions import read_pointer

if TYPE_CHECKING:
    from shared.head import ProjectionHead

CLASSIFIERS = "classifiers/"
HISTORY = CLASSIFIERS + "history/"


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


class ClassifierModel:
    """A published classifier: its feature transform (after the projection head, if it was trained in
    the head's space) and its ONNX model (None for kNN kinds).

    Args:
        manifest: what it is (kind, classes, spaces, dims, metrics).
        transform: embeddings -> the features the model was trained on.
        model: the ONNX model's bytes, or None.
        head: the projection head the features were made in, if any.
    """

    def __init__(
        self,
        manifest: ClassifierManifest,
        transform: FeatureTransform,
        model: bytes | None = None,
        head: ProjectionHead | None = None,
    ):
        self.manifest = manifest
        self.transform = transform
        self.head = head
        self.session = open_session(model) if model is not None else None

    @classmethod
    def load(
        cls,
        storage: Storage,
        container: str,
        prefix: str,
        manifest: ClassifierManifest,
        head: ProjectionHead | None = None,
    ) -> ClassifierModel:
        """Read the served form stored under ``prefix`` (``<prefix>features.npz``, ``<prefix>model.onnx``)."""
        transform = FeatureTransform.from_bytes(storage.get(container, prefix + manifest.features_file), manifest.power)
        model = storage.get(container, prefix + manifest.model_file) if manifest.model_file else None
        return cls(manifest, transform, model, head)

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def features(self, vectors: np.ndarray) -> np.ndarray:
        """Raw embeddings (n, d) -> the model's input features, float32 (n, feature_dim)."""
        x = self.head.apply(vectors).embedding if self.head is not None else np.asarray(vectors, np.float32)
        return self.transform.apply(x)

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes) of raw embeddings.

        Raises:
            RuntimeError: for a kNN model (it votes over the index; it has no ONNX model).
        """
        if self.session is None:
            raise RuntimeError(f"a {self.kind} model votes over the index; it has no ONNX model")
        out = self.session.run(["probabilities"], {"x": self.features(vectors)})[0]
        return np.asarray(out, dtype=np.float64)


def current_classifier_version(storage: Storage) -> str | None:
    """The published classifier version, or None before the first retrain."""
    return read_pointer(storage, MODELS, CLASSIFIERS)


def history(storage: Storage) -> list[dict[str, Any]]:
    """Every retrain's metrics, oldest first."""
    return [storage.get_json(MODELS, n) for n in sorted(storage.list(MODELS, HISTORY)) if n.endswith(".json")]


class ClassifierView:
    """A published retrain version's manifest, predictions and queues.

    Attributes:
        manifest: the version's manifest.
        ids: (n,) image ids (bytes, S64), sorted; pred/prob/second/second_prob aligned with them.
        queue: strategy -> list of {id, uncertainty}.
    """

    def __init__(self, storage: Storage, version: str):
        self.storage = storage
        self.prefix = f"{CLASSIFIERS}{version}/"
        if not storage.exists(MODELS, self.prefix + "manifest.json"):
            raise NotReady(f"classifier {version} is incomplete", code="classifier_missing")
        self.manifest = RetrainManifest.parse(storage.get_json(MODELS, self.prefix + "manifest.json"), version)
        arrays = _load_npz(storage.get(MODELS, self.prefix + "predictions.npz"))
        order = np.argsort(arrays["ids"])
        self.ids = arrays["ids"][order]
        self.pred = arrays["pred"][order]
        self.prob = arrays["prob"][order]
        self.second = arrays["second"][order]
        self.second_prob = arrays["second_prob"][order]
        self.queue: dict[str, list[dict[str, Any]]] = json.loads(storage.get(MODELS, self.prefix + "queue.json"))

    @property
    def version(self) -> str:
        return str(self.manifest.version)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def model(self, head: ProjectionHead | None = None) -> ClassifierModel:
        """The version's model in its served form (``head``: the one it was trained in, if any)."""
        return ClassifierModel.load(self.storage, MODELS, self.prefix, self.manifest, head)

    def lookup(self, image_ids: np.ndarray) -> np.ndarray:
        """Position of each id (bytes S64 or str) in this view, -1 if it has no prediction."""
        keys = np.asarray(image_ids).astype("S64")
        pos = np.searchsorted(self.ids, keys)
        pos = np.minimum(pos, max(len(self.ids) - 1, 0))
        found = (self.ids[pos] == keys) if len(self.ids) else np.zeros(len(keys), bool)
        return np.where(found, pos, -1)

    def prediction(self, image_id: str) -> dict[str, Any] | None:
        """{label, prob, second, second_prob} for one image, or None."""
        pos = int(self.lookup(np.array([image_id]))[0])
        if pos < 0:
            return None
        classes = self.classes
        return {
            "label": classes[int(self.pred[pos])],
            "prob": round(float(self.prob[pos]), 4),
            "second": classes[int(self.second[pos])] if len(classes) > 1 else None,
            "second_prob": round(float(self.second_prob[pos]), 4),
        }
