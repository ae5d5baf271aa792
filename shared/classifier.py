"""The label classifier's published versions, read with numpy only (the query side).

The retrain job (:mod:`job.retrain`) trains on every current label and publishes a version with the
model, its metrics on a held-out labelled split, a prediction for every image, and the labelling
queue for each strategy, so the API only reads::

    models/classifiers/v000004/manifest.json     kind, classes, metrics, label and encoder versions
    models/classifiers/v000004/features.npz      the feature space (mean, PCA components)
    models/classifiers/v000004/model.txt|.npz    LightGBM text model, or logistic / kNN arrays
    models/classifiers/v000004/predictions.npz   ids, predicted class, its probability, runner-up
    models/classifiers/v000004/queue.json        strategy -> unlabelled ids to ask about, in order
    models/classifiers/CURRENT.json              the pointer, swapped last
    models/classifiers/history/<time>-v000004.json   one metrics entry per retrain, never rewritten

Nothing here unpickles: arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from shared.errors import NotReady
from shared.storage import MODELS, Storage
from shared.versions import read_pointer

CLASSIFIERS = "classifiers/"
HISTORY = CLASSIFIERS + "history/"


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def current_classifier_version(storage: Storage) -> str | None:
    """The published classifier version, or None before the first retrain."""
    return read_pointer(storage, MODELS, CLASSIFIERS)


def history(storage: Storage) -> list[dict[str, Any]]:
    """Every retrain's metrics, oldest first."""
    return [storage.get_json(MODELS, n) for n in sorted(storage.list(MODELS, HISTORY)) if n.endswith(".json")]


class ClassifierView:
    """A published classifier's manifest, predictions and queues, read with numpy only.

    Attributes:
        manifest: the version's manifest.
        ids: (n,) image ids (bytes, S64), sorted; pred/prob/second/second_prob aligned with them.
        queue: strategy -> list of {id, uncertainty}.
    """

    def __init__(self, storage: Storage, version: str):
        prefix = f"{CLASSIFIERS}{version}/"
        if not storage.exists(MODELS, prefix + "manifest.json"):
            raise NotReady(f"classifier {version} is incomplete", code="classifier_missing")
        self.manifest: dict[str, Any] = storage.get_json(MODELS, prefix + "manifest.json")
        arrays = _load_npz(storage.get(MODELS, prefix + "predictions.npz"))
        order = np.argsort(arrays["ids"])
        self.ids = arrays["ids"][order]
        self.pred = arrays["pred"][order]
        self.prob = arrays["prob"][order]
        self.second = arrays["second"][order]
        self.second_prob = arrays["second_prob"][order]
        self.queue: dict[str, list[dict[str, Any]]] = json.loads(storage.get(MODELS, prefix + "queue.json"))

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

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
