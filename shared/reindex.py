"""Rebuild the index from stored embeddings and publish it (skipped when nothing changed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shared.catalog import Catalog
from shared.embeddings import EmbeddingStore
from shared.errors import NotReady
from shared.index import ClusterIndex, current_version, fingerprint, publish
from shared.settings import Settings
from shared.storage import INDEX, Storage

log = logging.getLogger(__name__)


@dataclass
class ReindexResult:
    version: str
    built: bool
    count: int
    nlist: int
    seconds: float


def reindex(
    storage: Storage, settings: Settings, encoder_version: str, *, force: bool = False, keep_versions: int = 3
) -> ReindexResult:
    """Build and publish an index over every embedding of ``encoder_version``.

    If the published index was built from exactly the same shards and parameters, nothing is
    built unless ``force``.

    Raises:
        NotReady: if there are no embeddings for this encoder version.
    """
    store = EmbeddingStore(storage, encoder_version)
    params = {
        "pca_dim": settings.index_pca_dim,
        "nlist": settings.index_nlist,
        "nprobe": settings.index_nprobe,
        "power": settings.index_power,
        "min_points_per_list": settings.index_min_points_per_list,
    }
    shards = store.shards()
    if not shards:
        raise NotReady(
            f"no embeddings for encoder {encoder_version}: run `clusterlens embed` first", code="no_embeddings"
        )
    fp = fingerprint(encoder_version, shards, params)
    current = current_version(storage)
    if current and not force:
        manifest = storage.get_json(INDEX, f"{current}/manifest.json")
        if manifest.get("source", {}).get("fingerprint") == fp:
            log.info("index %s is up to date", current)
            return ReindexResult(
                current, False, int(manifest["count"]), int(manifest["nlist"]), float(manifest["build_seconds"])
            )
    emb = store.load()
    catalog = Catalog(storage)
    labels = [catalog.get(image_id).label for image_id in emb.ids]
    built = ClusterIndex.build(
        emb.vectors,
        emb.ids,
        labels,
        encoder_version=encoder_version,
        pca_dim=settings.index_pca_dim,
        nlist=settings.index_nlist,
        nprobe=settings.index_nprobe,
        min_points_per_list=settings.index_min_points_per_list,
        power=settings.index_power,
        class_top=emb.top_class,
        class_prob=emb.top_prob,
        source={"fingerprint": fp, "shards": len(shards), "params": params},
    )
    version = publish(storage, built, keep=keep_versions)
    return ReindexResult(
        version, True, built.count, int(built.manifest["nlist"]), float(built.manifest["build_seconds"])
    )
