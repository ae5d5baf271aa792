"""The query path: search by image bytes, by stored id, or by text.

Imports numpy, Pillow, onnxruntime and faiss only. One ``SearchService`` per worker: the encoders
come from :class:`shared.models.Models` (loaded on first use), the index from
:class:`shared.live_index.LiveIndex` (reloaded when the published pointer moves, label overlay
applied). Results are plain data; the HTTP layer adds links.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np

from shared.catalog import check_image_id
from shared.classifier import ClassifierView
from shared.encoder import ImageEncoder
from shared.errors import BadRequest, NotFound, NotReady
from shared.filters import SearchFilters
from shared.imaging import decode_image
from shared.index import ClusterIndex, SearchHits
from shared.labels import LabelLog
from shared.live_index import LiveIndex
from shared.models import Models
from shared.settings import Settings
from shared.storage import Storage, open_storage
from shared.text_encoder import TextEncoder
from shared.text_rank import rank_text
from shared.text_search import query_weights

log = logging.getLogger(__name__)


class SearchService:
    """Answers similarity and text queries. Thread-safe; encoders and the first index are injectable.

    Attributes:
        models: the lazily loaded encoders.
        live: the served index with its label overlay.
    """

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
        self.models = Models(settings, encoder, text_encoder)
        self.live = LiveIndex(settings, self.storage, index)
        self._label_vectors: tuple[str | None, np.ndarray] = (None, np.zeros((0, 0), np.float32))

    @property
    def labels(self) -> LabelLog:
        return self.live.overlay.labels

    def index(self) -> ClusterIndex:
        """The served index (see :meth:`LiveIndex.get`).

        Raises:
            NotReady: if no index has been published.
        """
        return self.live.get()

    def encoder(self) -> ImageEncoder:
        """The image encoder (see :meth:`Models.image`)."""
        return self.models.image()

    def classifier(self) -> ClassifierView | None:
        """The published label classifier, or None before the first retrain."""
        return self.live.overlay.classifier()

    def refresh_labels(self) -> None:
        """Apply labels written since the last look now."""
        self.live.refresh_labels()

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
        index = self.index()
        encoder = self.models.check_index(index.manifest)
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

        See :mod:`shared.text_search` for how images are scored and :mod:`shared.text_rank` for how
        the best are found without scoring every row.

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
        encoder = self.models.text()
        index = self.index()
        if index.class_top.shape[1] == 0:
            raise NotReady("this index has no class predictions: run `clusterlens reindex`", code="index_outdated")
        query = encoder.encode([text.strip()])[0]
        t1 = time.perf_counter()
        weights = query_weights(
            text,
            query,
            encoder.imagenet_classes(),
            index.label_names,
            self._label_vectors_for(index, encoder),
            self.settings.text_temperature,
        )
        caption_sims = index.caption_vectors @ query if len(index.captions.rows) else None
        ranked = rank_text(index, weights, k, caption_sims, index.select(filters))
        keep = ranked.scores >= self.settings.text_min_score  # no filler: fewer than k if few match
        rows, scores = ranked.rows[keep], ranked.scores[keep]
        t2 = time.perf_counter()
        out = self._response(
            index,
            SearchHits(
                scores=scores[None, :],
                rows=rows[None, :],
                probe=np.zeros((1, 0), np.int64),
                probe_scores=np.zeros((1, 0), np.float32),
            ),
            {"embed": t1 - t0, "search": t2 - t1, "total": t2 - t0},
            filters,
        )
        class_w = weights.classes
        top_classes = np.argsort(-class_w)[:5]
        out["query_classes"] = [{"class": int(c), "weight": round(float(class_w[c]), 4)} for c in top_classes]
        log.debug("text query scored %d of %d rows", ranked.scored, index.count)
        return out

    def _label_vectors_for(self, index: ClusterIndex, encoder: TextEncoder) -> np.ndarray:
        """The index's label names embedded, cached per index version."""
        version, vectors = self._label_vectors
        if version != index.manifest.version or len(vectors) != len(index.label_names):
            vectors = encoder.encode(index.label_names) if index.label_names else np.zeros((0, 384), np.float32)
            self._label_vectors = (index.manifest.version, vectors)
        return vectors

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
            "index_version": index.manifest.version,
            "timing_ms": {k: round(v * 1000, 2) for k, v in timing.items()},
        }
