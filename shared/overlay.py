"""The label overlay: the label log's current labels and the classifier's predictions laid over a
loaded index, so new labels and a retrain show in filters, text search and the labelling queue
without a reindex."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.classifier import ClassifierView, current_classifier_version
from shared.index import ClusterIndex
from shared.labels import LabelLog
from shared.storage import Storage


class LabelOverlay:
    """Reads the label log and the published classifier; applies both to an index when either changed.

    Attributes:
        labels: the label log (refreshed on every :meth:`apply`).
    """

    def __init__(self, storage: Storage):
        self.storage = storage
        self.labels = LabelLog(storage)
        self._classifier: ClassifierView | None = None
        self._state: tuple[Any, ...] = ()

    def classifier(self) -> ClassifierView | None:
        """The published label classifier (predictions and labelling queues), or None before one."""
        version = current_classifier_version(self.storage)
        current = self._classifier
        if version is None:
            self._classifier = None
        elif current is None or current.version != version:
            self._classifier = ClassifierView(self.storage, version)
        return self._classifier

    def apply(self, index: ClusterIndex) -> None:
        """Lay the current labels and predictions over ``index`` (nothing to do when none changed).

        New labels cost O(labelled) (see :meth:`ClusterIndex.overlay_labels`); the predictions, one per
        row, are looked up again only when the classifier or the index changed.
        """
        self.labels.refresh()
        view = self.classifier()
        label_set = self.labels.label_set()
        predictions = (id(index), index.manifest.version, view.version if view else None)
        state = (*predictions, self.labels.batches(), label_set.version if label_set else None)
        if state == self._state:
            return
        current = {image_id: e.label for image_id, e in self.labels.current().items()}
        classes = view.classes if view else []
        index.overlay_labels(current, [*(label_set.classes if label_set else []), *classes])
        if predictions != self._state[:3]:
            if view is not None:
                # one lookup per prediction (binary ids, vectorised), no string per indexed row
                rows = index.ids.rows_of_hex(view.ids)
                found = rows >= 0
                codes = np.full(index.count, -1, np.int32)
                probs = np.zeros(index.count, np.float32)
                codes[rows[found]] = view.pred[found]
                probs[rows[found]] = view.prob[found]
                index.set_predictions(classes, codes, probs)
            else:
                index.set_predictions([], np.full(index.count, -1), np.zeros(index.count))
        self._state = state
