"""The query path: lazily loaded encoder and index, search by image bytes or by stored id.

Imports numpy, Pillow, onnxruntime and faiss only. One ``SearchService`` per worker; the encoder
loads on first use and the index reloads when the published pointer moves.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import faiss
import numpy as np

from shared.catalog import Catalog, ImageRecord, check_image_id
from shared.classifier import ClassifierView, current_classifier_version
from shared.encoder import ImageEncoder
from shared.errors import BadRequest, NotFound, NotReady, VersionMismatch
from shared.filters import SearchFilters
from shared.imaging import decode_image
from shared.index import ClusterIndex, SearchHits, current_version, load_version
from shared.labels import LabelLog
from shared.settings import Settings
from shared.storage import Storage, open_storage
from shared.text_encoder import TextEncoder
from shared.text_search import text_scores

log = logging.getLogger(__name__)


class SearchService:
    """Answers similarity queries. Thread-safe; the encoder and index are injectable for tests."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage | None = None,
        encoder: ImageEncoder | None = None,
        index: ClusterIndex | None = None,
        text_encoder: TextEncoder | None = None,
    ):
        self.settings = settings
        self.storage = storage or open_storage(settings)
        self._encoder = encoder
        self._index = index
        self._index_version: str | None = index.manifest.get("version") if index else None
        self._checked_at = time.monotonic() if index else 0.0
        self._text_encoder = text_encoder
        self._label_vectors: tuple[str | None, np.ndarray] = (None, np.zeros((0, 0), np.float32))
        self._encoder_lock = threading.Lock()
        self.labels = LabelLog(self.storage)
        self._classifier: ClassifierView | None = None
        self._overlay_state: tuple[Any, ...] = ()
        self._index_lock = threading.Lock()

    # -- lazy resources -----------------------------------------------------------------------

    def encoder(self) -> ImageEncoder:
        """The image encoder, loaded on first use.

        Raises:
            NotReady: if the model has not been built.
        """
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    s = self.settings
                    self._encoder = ImageEncoder(
                        s.encoder_dir,
                        size=s.image_size,
                        providers=s.ort_providers,
                        intra_op_threads=s.ort_intra_op_threads,
                    )
        return self._encoder

    def text_encoder(self) -> TextEncoder:
        """The text encoder, loaded on first use.

        Raises:
            NotReady: if the model has not been built.
        """
        if self._text_encoder is None:
            with self._encoder_lock:
                if self._text_encoder is None:
                    s = self.settings
                    self._text_encoder = TextEncoder(
                        s.text_encoder_dir, providers=s.ort_providers, intra_op_threads=s.ort_intra_op_threads
                    )
        return self._text_encoder

    def index(self) -> ClusterIndex:
        """The published index, reloaded when the pointer has moved (checked every few seconds).

        One thread checks and loads; the others keep answering from the index already in memory,
        and a failed refresh is logged while the current index goes on serving.

        Raises:
            NotReady: if no index has been published.
        """
        current = self._index
        if current is not None and time.monotonic() - self._checked_at < self.settings.index_refresh_seconds:
            return current
        if current is None:
            self._index_lock.acquire()
        elif not self._index_lock.acquire(blocking=False):
            return current  # another thread is refreshing: serve what we have
        try:
            if self._index is not None and time.monotonic() - self._checked_at < self.settings.index_refresh_seconds:
                return self._index
            try:
                version = current_version(self.storage)
                if version is None:
                    raise NotReady(
                        "no index has been built yet: run `clusterlens embed` then `clusterlens reindex`",
                        code="index_missing",
                    )
                if version != self._index_version:
                    self._index = load_version(
                        self.storage,
                        version,
                        self.settings.data_dir / "cache" / "index",
                        providers=self.settings.ort_providers,
                    )
                    self._index_version = version
                    log.info("serving index %s", version)
            except Exception:
                if self._index is None:
                    raise
                log.exception("index refresh failed; still serving %s", self._index_version)
            for apply, what in ((self._hide_deleted, "deletions"), (self._overlay, "labels or predictions")):
                try:
                    apply(self._index)
                except Exception:
                    if self._index is None:
                        raise
                    log.exception("reading %s failed; still serving %s", what, self._index_version)
            self._checked_at = time.monotonic()
            assert self._index is not None  # a first load that failed has raised above
            return self._index
        finally:
            self._index_lock.release()

    def _hide_deleted(self, index: ClusterIndex | None) -> None:
        """Leave deleted images (tombstones in storage) out of this index's answers."""
        if index is None:
            return
        rows = [index.row_of(i) for i in Catalog(self.storage).deleted_ids()]
        index.hidden = np.array(sorted(r for r in rows if r is not None), dtype=np.int64)

    def classifier(self) -> ClassifierView | None:
        """The published label classifier (predictions and labelling queues), or None before one."""
        version = current_classifier_version(self.storage)
        current = self._classifier
        if version is None:
            self._classifier = None
        elif current is None or current.version != version:
            self._classifier = ClassifierView(self.storage, version)
        return self._classifier

    def _overlay(self, index: ClusterIndex | None) -> None:
        """Lay the label log's current labels and the classifier's predictions over the index, so
        new labels and a retrain show in filters and text search without a reindex."""
        if index is None:
            return
        self.labels.refresh()
        view = self.classifier()
        label_set = self.labels.label_set()
        state = (
            id(index),
            index.manifest.get("version"),
            self.labels.batches(),
            view.version if view else None,
            label_set.version if label_set else None,
        )
        if state == self._overlay_state:
            return
        current = {image_id: e.label for image_id, e in self.labels.current().items()}
        classes = view.classes if view else []
        index.overlay_labels(current, [*(label_set.classes if label_set else []), *classes])
        if view is not None:
            pos = view.lookup(index.ids)
            codes = np.where(pos >= 0, view.pred[pos].astype(np.int32), -1)
            probs = np.where(pos >= 0, view.prob[pos], 0.0)
            index.set_predictions(classes, codes, probs)
        else:
            index.set_predictions([], np.full(index.count, -1), np.zeros(index.count))
        self._overlay_state = state

    def current_label(self, image_id: str) -> str | None:
        """An indexed image's label now (the label log over the index), None if unlabelled or not indexed."""
        index = self.index()
        row = index.row_of(image_id)
        return index.label_of(row) if row is not None else None

    def refresh_labels(self) -> None:
        """Apply labels written since the last look now (the API calls this after taking labels)."""
        index = self._index
        if index is not None:
            self._overlay(index)

    def delete(self, image_id: str) -> ImageRecord:
        """Delete an image from storage; this worker stops returning it at once, others within
        ``index_refresh_seconds``, and the next reindex leaves it out for good.

        Raises:
            BadRequest: malformed id. NotFound: no such image.
        """
        record = Catalog(self.storage).delete(image_id)
        index = self._index
        if index is not None:
            row = index.row_of(image_id)
            if row is not None:
                index.hidden = np.union1d(index.hidden, np.array([row], np.int64))
        return record

    # -- queries ------------------------------------------------------------------------------

    def _pin_threads(self) -> None:
        """Run this thread's FAISS calls on ``settings.search_threads`` threads.

        A query is one vector, and FAISS parallelises over queries, so extra OpenMP threads only spin,
        taking cores from ONNX Runtime: on 2 cores against the 70k index, search 2.2 -> 0.7 ms and
        embed 15.7 -> 10.9 ms per query. OpenMP keeps the count per thread, and servers answer from
        pools of threads, so it is set on every query (a thread-local store).
        """
        if self.settings.search_threads:
            faiss.omp_set_num_threads(self.settings.search_threads)

    def check_k(self, k: int | None) -> int:
        """Validate the number of results.

        Raises:
            BadRequest: if ``k`` is outside 1..max_k.
        """
        if k is None:
            return self.settings.default_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.settings.max_k:
            raise BadRequest(f"k must be an integer from 1 to {self.settings.max_k}", code="invalid_k")
        return k

    def search_image(self, data: bytes, k: int | None = None, filters: SearchFilters | None = None) -> dict[str, Any]:
        """Images most similar to uploaded image bytes.

        Raises:
            InvalidImage, UnsupportedMediaType, PayloadTooLarge: bad upload.
            BadRequest: bad ``k``. NotReady: no model or index. VersionMismatch: encoder changed.
        """
        k = self.check_k(k)
        t0 = time.perf_counter()
        decoded = decode_image(
            data, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_image_pixels
        )
        t1 = time.perf_counter()
        encoder = self.encoder()
        index = self.index()
        self._check_versions(encoder, index)
        vector = encoder.encode([decoded.rgb]).vectors
        t2 = time.perf_counter()
        self._pin_threads()
        hits = index.search(vector, k, filters=filters)
        t3 = time.perf_counter()
        timing = {"decode": t1 - t0, "embed": t2 - t1, "search": t3 - t2, "total": t3 - t0}
        return self._response(index, hits, timing, filters)

    def search_id(self, image_id: str, k: int | None = None, filters: SearchFilters | None = None) -> dict[str, Any]:
        """Images most similar to an indexed image.

        Raises:
            BadRequest: malformed id or bad ``k``. NotFound: the id is not in the index.
        """
        k = self.check_k(k)
        check_image_id(image_id)
        t0 = time.perf_counter()
        index = self.index()
        row = index.row_of(image_id)
        if row is None or row in index.hidden:
            raise NotFound(
                f"image {image_id} is not in the index (unknown, or not embedded and indexed yet)",
                code="image_not_found",
            )
        self._pin_threads()
        hits = index.search_row(row, k, filters=filters)
        t1 = time.perf_counter()
        return self._response(index, hits, {"search": t1 - t0, "total": t1 - t0}, filters)

    def search_text(self, text: str, k: int | None = None, filters: SearchFilters | None = None) -> dict[str, Any]:
        """Images matching a text query, without a joint image-text model (an approximation of CLIP).

        See :mod:`shared.text_search` for how images are scored.

        Raises:
            BadRequest: empty or over-long text, bad ``k``. NotReady: no model, or an index without
            class predictions.
        """
        k = self.check_k(k)
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("text must be a non-empty string", code="invalid_text")
        if len(text) > self.settings.max_text_chars:
            raise BadRequest(f"text is limited to {self.settings.max_text_chars} characters", code="invalid_text")
        t0 = time.perf_counter()
        encoder = self.text_encoder()
        index = self.index()
        if index.class_top.shape[1] == 0:
            raise NotReady("this index has no class predictions: run `clusterlens reindex`", code="index_outdated")
        query = encoder.encode([text.strip()])[0]
        t1 = time.perf_counter()
        scores, class_w = text_scores(
            text,
            query,
            encoder.imagenet_classes(),
            index.label_names,
            self._label_vectors_for(index, encoder),
            index.class_top,
            index.class_prob,
            index.labels,
            self.settings.text_temperature,
            index.captions.rows,
            index.caption_vectors @ query if len(index.captions.rows) else None,
            *self._predicted_labels(index),
        )
        allowed = index.select(filters)
        if allowed is not None:
            keep = np.zeros(len(scores), dtype=bool)
            keep[allowed] = True
            scores = np.where(keep, scores, 0.0).astype(np.float32)
        elif len(index.hidden):
            scores = scores.copy()
            scores[index.hidden] = 0.0
        k_eff = min(k, len(scores))
        rows = np.argpartition(-scores, k_eff - 1)[:k_eff]
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        rows = rows[scores[rows] >= self.settings.text_min_score]  # no filler: fewer than k if few match
        t2 = time.perf_counter()
        out = self._response(
            index,
            SearchHits(
                scores=scores[rows][None, :],
                rows=rows[None, :],
                probe=np.zeros((1, 0), np.int64),
                probe_scores=np.zeros((1, 0), np.float32),
            ),
            {"embed": t1 - t0, "search": t2 - t1, "total": t2 - t0},
            filters,
        )
        top_classes = np.argsort(-class_w)[:5]
        out["query_classes"] = [{"class": int(c), "weight": round(float(class_w[c]), 4)} for c in top_classes]
        return out

    @staticmethod
    def _predicted_labels(index: ClusterIndex) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Predicted classes as codes into the index's label names (-1: none), and their probabilities."""
        if not index.predicted_names:
            return None, None
        to_label = np.array([index.label_names.index(n) for n in index.predicted_names] + [-1], np.int32)
        return to_label[index.predicted], index.predicted_prob

    def _label_vectors_for(self, index: ClusterIndex, encoder: TextEncoder) -> np.ndarray:
        """The index's label names embedded, cached per index version."""
        version, vectors = self._label_vectors
        if version != index.manifest.get("version") or len(vectors) != len(index.label_names):
            vectors = encoder.encode(index.label_names) if index.label_names else np.zeros((0, 384), np.float32)
            self._label_vectors = (index.manifest.get("version"), vectors)
        return vectors

    def health(self) -> dict[str, Any]:
        """Model and index versions and counts; never raises for a missing model or index."""
        out: dict[str, Any] = {"status": "ok", "encoder": None, "index": None}
        try:
            enc = self.encoder()
            out["encoder"] = {"version": enc.version, "providers": enc.providers, "dim": enc.dim}
        except Exception as exc:  # noqa: BLE001 - health reports, it does not fail
            out["status"] = "degraded"
            out["encoder_error"] = getattr(exc, "message", type(exc).__name__)
        try:
            idx = self.index()
            m = idx.manifest
            out["index"] = {
                "version": m.get("version"),
                "encoder_version": m["encoder_version"],
                "count": idx.count,
                "clusters": m["nlist"],
                "nprobe": idx.nprobe,
                "factory": m["factory"],
                "kind": m.get("kind", "ivf_flat"),
                "bytes_per_vector": m.get("bytes_per_vector"),
                "space": m.get("space", "backbone"),
                "memory_mapped": idx.mapped is not None,
                "recall_at_10": m.get("recall", {}).get("at_10"),
                "dim": m["dim"],
                "built_at": m["built_at"],
                "labels": len(idx.label_names),
            }
        except Exception as exc:  # noqa: BLE001
            out["status"] = "degraded"
            out["index_error"] = getattr(exc, "message", type(exc).__name__)
        return out

    @staticmethod
    def _check_versions(encoder: ImageEncoder, index: ClusterIndex) -> None:
        if index.manifest["encoder_version"] != encoder.version:
            raise VersionMismatch(
                f"the index was built with encoder {index.manifest['encoder_version']} but queries are "
                f"embedded with {encoder.version}; run `clusterlens embed` and `clusterlens reindex`"
            )

    @staticmethod
    def _response(
        index: ClusterIndex, hits: SearchHits, timing: dict[str, float], filters: SearchFilters | None = None
    ) -> dict[str, Any]:
        results = []
        for score, row in zip(hits.scores[0], hits.rows[0], strict=True):
            if row < 0:
                continue
            image_id = str(index.ids[row])
            results.append(
                {
                    "id": image_id,
                    "score": round(float(score), 6),
                    "cluster": int(index.clusters[row]),
                    "label": index.label_of(int(row)),
                    "predicted": index.prediction_of(int(row)),
                    "caption": index.caption_of(int(row)),
                    "url": f"/api/images/{image_id}",
                }
            )
        probe = [
            {"cluster": int(c), "score": round(float(s), 6)}
            for c, s in zip(hits.probe[0], hits.probe_scores[0], strict=True)
            if c >= 0
        ]
        return {
            "results": results,
            "cluster_probe": probe,
            "filters": filters.to_json() if filters else {},
            "index_version": index.manifest.get("version"),
            "timing_ms": {k: round(v * 1000, 2) for k, v in timing.items()},
        }
