"""The published index as one worker serves it: loaded on first use, reloaded when the pointer moves,
deleted images hidden, the label overlay kept current.

One thread checks and loads; the others keep answering from the index already in memory, and a
failed refresh is logged while the current index goes on serving.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from shared.catalog import Catalog, ImageRecord
from shared.errors import NotReady
from shared.hidden import hidden_ids
from shared.index import ClusterIndex, current_version, load_version
from shared.index_files import prune_cache, served_folders
from shared.overlay import LabelOverlay
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)


class LiveIndex:
    """The current index of this worker. Thread-safe; the first index is injectable for tests.

    Attributes:
        overlay: the labels and predictions laid over the index.
    """

    def __init__(self, settings: Settings, storage: Storage, index: ClusterIndex | None = None):
        self.settings = settings
        self.storage = storage
        self.overlay = LabelOverlay(storage)
        self._index = index
        self._version: str | None = index.manifest.version if index else None
        self._checked_at = time.monotonic() if index else 0.0
        self._lock = threading.Lock()

    def get(self) -> ClusterIndex:
        """The published index, reloaded when the pointer has moved (checked every few seconds).

        Raises:
            NotReady: if no index has been published.
        """
        current = self._index
        fresh = time.monotonic() - self._checked_at < self.settings.index_refresh_seconds
        if current is not None and fresh:
            return current
        if current is None:
            self._lock.acquire()
        elif not self._lock.acquire(blocking=False):
            return current  # another thread is refreshing: serve what we have
        try:
            if self._index is not None and time.monotonic() - self._checked_at < self.settings.index_refresh_seconds:
                return self._index
            try:
                self._reload()
            except Exception:
                if self._index is None:
                    raise
                log.exception("index refresh failed; still serving %s", self._version)
            index = self._index
            assert index is not None  # a first load that failed has raised above
            for apply, what in ((self._hide_deleted, "deletions"), (self.overlay.apply, "labels or predictions")):
                try:
                    apply(index)
                except Exception:
                    log.exception("reading %s failed; still serving %s", what, self._version)
            self._checked_at = time.monotonic()
            return index
        finally:
            self._lock.release()

    def _reload(self) -> None:
        version = current_version(self.storage)
        if version is None:
            raise NotReady(
                "no index has been built yet: run `clusterlens embed` then `clusterlens reindex`", code="index_missing"
            )
        if version != self._version:
            cache_dir = self.settings.data_dir / "cache" / "index"
            self._index = load_version(
                self.storage,
                version,
                cache_dir,
                providers=self.settings.ort_providers,
                mount=self.settings.index_mount,
                refine_memory_mb=self.settings.index_refine_memory_mb,
            )
            self._version = version
            log.info("serving index %s", version)
            # Downloads of versions no longer served go (a long-lived worker's disk stayed full of them).
            try:
                prune_cache(cache_dir, served_folders(self._index.manifest))
            except OSError:
                log.exception("pruning the index download cache failed; serving %s", version)

    def _hide_deleted(self, index: ClusterIndex) -> None:
        """Leave deleted images (tombstones in storage) and those hidden by a resolved near-duplicate
        group (:mod:`shared.duplicates`) out of this index's answers."""
        gone = Catalog(self.storage).deleted_ids() | hidden_ids(self.storage)
        rows = [index.row_of(i) for i in gone]
        deleted = np.array(sorted(r for r in rows if r is not None), dtype=np.int64)
        index.hidden = np.union1d(deleted, index.duplicates).astype(np.int64)

    def refresh_hidden(self) -> None:
        """Apply deletions and resolved near-duplicate groups now (after resolving one here)."""
        if self._index is not None:
            self._hide_deleted(self._index)

    def refresh_labels(self) -> None:
        """Apply labels written since the last look now (after taking labels)."""
        if self._index is not None:
            self.overlay.apply(self._index)

    def label_of(self, image_id: str) -> str | None:
        """An indexed image's label now (the label log over the index), None if unlabelled or not indexed."""
        index = self.get()
        row = index.row_of(image_id)
        return index.label_of(row) if row is not None else None

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
