"""Rebuild the index from stored embeddings and publish it (skipped when nothing changed)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from shared.catalog import Catalog
from shared.embeddings import EmbeddingStore
from shared.errors import NotReady, VersionMismatch
from shared.head import ProjectionHead, load_head
from shared.index import Captions, ClusterIndex, current_version, fingerprint, publish
from shared.settings import Settings
from shared.storage import INDEX, Storage

log = logging.getLogger(__name__)


def embed_captions(settings: Settings, captions: list[str | None]) -> Captions | None:
    """Embed the rows' captions with the text encoder; None if there are none.

    A missing text model does not stop a reindex: the captions are left out (and logged), and
    similarity search is unaffected.
    """
    rows = [i for i, c in enumerate(captions) if c]
    if not rows:
        return None
    from shared.text_encoder import TextEncoder

    try:
        encoder = TextEncoder(
            settings.text_encoder_dir, providers=settings.ort_providers, intra_op_threads=settings.ort_intra_op_threads
        )
    except NotReady as exc:
        log.warning("captions left out of the index: %s", exc.message)
        return None
    texts = [str(captions[i]) for i in rows]
    vectors = np.concatenate([encoder.encode(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    return Captions(np.array(rows, np.int64), vectors.astype(np.float16), np.array(texts))


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

    With ``settings.index_space == "head"`` the index is built in the space of the current
    projection head (``clusterlens train-head``), which must have been trained on this encoder's
    embeddings.

    Raises:
        NotReady: if there are no embeddings for this encoder version, or no head when one is asked for.
        VersionMismatch: if the current head was trained on another encoder's embeddings.
    """
    store = EmbeddingStore(storage, encoder_version)
    head: ProjectionHead | None = None
    if settings.index_space == "head":
        head = load_head(
            storage,
            settings.data_dir / "cache",
            providers=settings.ort_providers,
            intra_op_threads=settings.ort_intra_op_threads,
        )
        if head.encoder_version != encoder_version:
            raise VersionMismatch(
                f"the projection head was trained on {head.encoder_version} embeddings, not {encoder_version}: "
                "run `clusterlens train-head` again"
            )
    params = {
        "space": settings.index_space,
        "head": head.version if head else None,
        "text_encoder": settings.text_encoder,
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
    records = [catalog.get(image_id) for image_id in emb.ids]
    labels = [r.label for r in records]
    captions = embed_captions(settings, [r.caption for r in records])
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
        head=head,
        captions=captions,
        source={"fingerprint": fp, "shards": len(shards), "params": params},
    )
    version = publish(storage, built, keep=keep_versions)
    return ReindexResult(
        version, True, built.count, int(built.manifest["nlist"]), float(built.manifest["build_seconds"])
    )
