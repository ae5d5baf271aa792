"""Rebuild the index from stored embeddings and publish it (skipped when nothing changed)."""

from __future__ import annotations

import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from job.embeddings import EmbeddingStore, fill_records
from job.index_build import (
    TRAINED_FILE,
    IndexParams,
    build_delta,
    extend_index,
    fingerprint,
    grow_version,
    publish,
)
from job.stream_build import StreamedBuild, build_streaming
from shared.catalog import Catalog
from shared.errors import ClusterlensError, NotReady, QualityGate, VersionMismatch
from shared.head import ProjectionHead, load_head
from shared.index import Captions, ClusterIndex, current_version, load_segments, load_version, read_manifest
from shared.manifests import IndexManifest
from shared.refine import CODEC_FILE, RAW_CODEC_FILE, RefineCodec
from shared.settings import Settings
from shared.storage import EMBEDDINGS, INDEX, BlobNotFound, Storage

log = logging.getLogger(__name__)


def embed_captions(settings: Settings, captions: list[str | None]) -> Captions | None:
    """Embed the rows' captions with the text encoder; None if there are none.

    A missing text model does not stop a reindex: the captions are left out (and logged), and
    similarity search is unaffected.
    """
    rows = [i for i, c in enumerate(captions) if c]
    return embed_caption_texts(settings, np.array(rows, np.int64), [str(captions[i]) for i in rows])


def embed_caption_texts(settings: Settings, rows: np.ndarray, texts: list[str]) -> Captions | None:
    """:func:`embed_captions` for the rows that have one: ``rows`` int64 (m,) and their texts."""
    if not len(rows):
        return None
    from shared.text_encoder import TextEncoder

    try:
        encoder = TextEncoder.from_settings(settings, verify="sha256")
    except NotReady as exc:
        log.warning("captions left out of the index: %s", exc.message)
        return None
    vectors = np.concatenate([encoder.encode(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    return Captions(np.asarray(rows, np.int64), vectors.astype(np.float16), np.array(texts))


@dataclass
class ReindexResult:
    version: str
    built: bool
    count: int
    nlist: int
    seconds: float
    nprobe: int = 0
    recall_at_10: float | None = None
    # "full" (clusters trained), "incremental" (added to them), "unchanged", or "superseded" (built, but a
    # concurrent build holding more shards was published first: kept for rollback, not made current)
    mode: str = "full"
    added: int = 0
    kind: str = "ivf_flat"


def reindex(storage: Storage, settings: Settings, encoder_version: str, *, force: bool = False) -> ReindexResult:
    """Build and publish an index over every embedding of ``encoder_version``.

    If the published index was built from exactly the same shards and parameters, nothing is
    built unless ``force``. After building, recall@10 against exact search is measured and nprobe
    chosen to reach ``settings.index_recall_target``; a build below the target (possible with a
    fixed ``index_nprobe``) is not published unless ``force``.

    With ``settings.index_space == "head"`` the index is built in the space of the current
    projection head (``clusterlens train-head``), which must have been trained on this encoder's
    embeddings.

    Raises:
        NotReady: if there are no embeddings for this encoder version, or no head when one is asked for.
        VersionMismatch: if the current head was trained on another encoder's embeddings.
        QualityGate: if recall@10 is below the target and not ``force``.
    """
    store = EmbeddingStore(storage, encoder_version)
    head: ProjectionHead | None = None
    if settings.index_space == "head":
        head = load_head(storage, settings)
        if head.encoder_version != encoder_version:
            raise VersionMismatch(
                f"the projection head was trained on {head.encoder_version} embeddings, not {encoder_version}: "
                "run `clusterlens train-head` again"
            )
    index_params = IndexParams.from_settings(settings)
    params = {  # what the build depends on: the fingerprint and the incremental check compare it
        "space": settings.index_space,
        "head": head.version if head else None,
        "text_encoder": settings.text_encoder,
        **index_params.to_json(),
    }
    current = current_version(storage)
    prior = read_manifest(storage, current) if current else None
    # Shards a compaction replaced stay listed until the next full build deletes them: never read again.
    retired = set(prior.source.get("replaced", [])) if prior else set()
    listed = store.shards()
    shards = [s for s in listed if s not in retired]
    if not shards:
        raise NotReady(
            f"no embeddings for encoder {encoder_version}: run `clusterlens embed` first", code="no_embeddings"
        )
    catalog = Catalog(storage)
    deleted = catalog.deleted_ids()
    fp = fingerprint(encoder_version, [*shards, *(f"deleted:{i}" for i in sorted(deleted))], params)
    source = {
        "fingerprint": fp,
        "shards": len(shards),
        "shard_names": sorted(shards),
        "params": params,
        "deleted": fingerprint("deleted", sorted(deleted), {}),
        "replaced": sorted(retired & set(listed)),
    }
    if prior is not None and current and not force:
        manifest = prior
        if manifest.fingerprint == fp:
            log.info("index %s is up to date", current)
            return _result(current, False, manifest, mode="unchanged")
        grown = _try_incremental(
            storage, settings, index_params, store, catalog, manifest, current, shards, params, source, deleted, head
        )
        if grown is not None:
            return _publish(storage, settings, grown, force, mode="incremental")
    with tempfile.TemporaryDirectory(prefix="clusterlens-build-") as tmp:
        streamed = build_streaming(
            store,
            catalog,
            shards,
            deleted=deleted,
            params=index_params,
            workdir=Path(tmp),
            head=head,
            embed_captions=lambda rows, texts: embed_caption_texts(settings, rows, texts),
            compact_rows=settings.embed_compact_rows,
            source=source,
        )
        built = streamed.index
        if streamed.compaction is not None:  # the index stands on the compacted shards now
            built.manifest.source |= _compacted_source(encoder_version, streamed, deleted, params)
        result = _publish(storage, settings, built, force, mode="full")
    if result.mode == "full":
        _delete_retired(storage, sorted(retired & set(listed)))
    return result


def _compacted_source(
    encoder_version: str, streamed: StreamedBuild, deleted: set[str], params: dict[str, Any]
) -> dict[str, Any]:
    """A compacting build's ``source``: the shards it stands on (its fingerprint theirs, so the next reindex
    finds it up to date) and those it replaced."""
    assert streamed.compaction is not None
    shards = streamed.shards
    return {
        "fingerprint": fingerprint(encoder_version, [*shards, *(f"deleted:{i}" for i in sorted(deleted))], params),
        "shards": len(shards),
        "shard_names": sorted(shards),
        "replaced": sorted(streamed.compaction.replaced),
        "compaction": {
            "written": len(streamed.compaction.written),
            "rows": streamed.compaction.rows,
        },
    }


def _delete_retired(storage: Storage, names: list[str]) -> None:
    """Delete the shards an earlier compaction replaced, now that a newer full build is current.

    One generation later, not at once: a reader (an incremental reindex, an embed's full check) that
    listed the shards before the compaction may still be reading them; by the next full build it has
    long finished. A delete that fails leaves a shard whose rows are all in others: the next full
    build reads it as a small shard, finds nothing new and replaces it again.
    """
    for name in names:
        try:
            storage.delete(EMBEDDINGS, name)
        except ClusterlensError as exc:
            log.warning("replaced shard %s not deleted: %s", name, exc.message)
    if names:
        log.info("deleted %d shards replaced by the previous compaction", len(names))


def _try_incremental(
    storage: Storage,
    settings: Settings,
    index_params: IndexParams,
    store: EmbeddingStore,
    catalog: Catalog,
    manifest: IndexManifest,
    current: str,
    shards: list[str],
    params: dict[str, Any],
    source: dict[str, Any],
    deleted: set[str],
    head: ProjectionHead | None = None,
) -> ClusterIndex | None:
    """The current index plus the newly embedded images, or None when a full build is due.

    The new rows become a delta segment (:func:`build_delta`) added to the base's trained index, not
    to a copy of the whole current version: the job reads the new shards, the base's trained index and
    any smaller deltas the new one absorbs, and writes only the new segment.

    Incremental only when the current version was built from a subset of today's shards with the
    same encoder and parameters, and the collection has grown by at most
    ``settings.index_retrain_fraction`` since its clusters were trained, with no image deleted or
    added back since.
    """
    src = manifest.source
    old_shards = manifest.shard_names
    if (
        src.get("deleted") != source["deleted"]  # deletes (or re-adds) since: rows change, build again
        or settings.index_retrain_fraction <= 0
        or src.get("params") != params
        or manifest.encoder_version != store.encoder_version
        or not old_shards
        or not old_shards <= set(shards)
    ):
        return None
    base = manifest.segments[0]["version"] if manifest.segments else current
    try:
        trained = storage.get(INDEX, f"{base}/{TRAINED_FILE}")
    except BlobNotFound:  # built before versions kept their trained index: grow a full copy, once
        return _extend_copy(storage, settings, index_params, store, catalog, manifest, current, shards, source, deleted)
    new = store.load(sorted(set(shards) - old_shards), skip=deleted)
    trained_count = manifest.trained_count or manifest.count
    if manifest.count + len(new.ids) > trained_count * (1 + settings.index_retrain_fraction):
        log.info("collection grew past %.0f%% since training: retraining", 100 * settings.index_retrain_fraction)
        return None
    new = fill_records(catalog, new)
    codec = None
    if manifest.kind == "ivf_pq":
        try:
            codec = RefineCodec.from_array(np.load(io.BytesIO(storage.get(INDEX, f"{base}/{CODEC_FILE}"))))
        except BlobNotFound:  # an IVF-PQ base from before re-ranking codes: build it again
            log.info("the current IVF-PQ version has no re-ranking codes: a full build")
            return None
    raw_codec = None
    if manifest.raw_rerank:
        try:
            raw_codec = RefineCodec.from_array(np.load(io.BytesIO(storage.get(INDEX, f"{base}/{RAW_CODEC_FILE}"))))
        except BlobNotFound:
            log.info("the current version has no raw codes: a full build")
            return None
    delta = build_delta(
        trained,
        manifest,
        new.vectors if new.ids else np.zeros((0, manifest.input_dim), np.float32),
        new.ids,
        new.labels,
        head=head,
        class_top=new.top_class if new.ids else None,
        class_prob=new.top_prob if new.ids else None,
        captions=embed_captions(settings, new.captions),
        ingested=new.ingested if new.ids else None,
        codec=codec,
        raw_codec=raw_codec,
    )
    # Deltas merge like a binary counter: the newest absorbs older ones no bigger than what it holds,
    # so a version has O(log growth) segments and a row is rewritten O(log growth) times, never the base.
    segments = manifest.segments or [{"version": current, "rows": manifest.count, "label_names": manifest.label_names}]
    keep, absorb = list(segments), list[dict[str, Any]]()
    rows = len(new.ids)
    while len(keep) > 1 and int(keep[-1]["rows"]) <= max(rows, 1):
        absorb.insert(0, keep.pop())
        rows += int(absorb[0]["rows"])
    parts = load_segments(
        storage, absorb, settings.data_dir / "cache" / "index", manifest, head=head, mount=settings.index_mount
    )
    return grow_version(manifest, [*parts, delta], keep, source, added=len(new.ids))


def _extend_copy(
    storage: Storage,
    settings: Settings,
    index_params: IndexParams,
    store: EmbeddingStore,
    catalog: Catalog,
    manifest: IndexManifest,
    current: str,
    shards: list[str],
    source: dict[str, Any],
    deleted: set[str],
) -> ClusterIndex | None:
    """The current version read whole plus the new rows, published whole (versions without trained.faiss)."""
    old_shards = manifest.shard_names
    cur = load_version(
        storage,
        current,
        settings.data_dir / "cache" / "index",
        providers=settings.ort_providers,
        mount=settings.index_mount,
    )
    new = store.load(sorted(set(shards) - old_shards), skip=set(np.asarray(cur.ids).tolist()) | deleted)
    trained = manifest.trained_count or manifest.count
    if cur.count + len(new.ids) > trained * (1 + settings.index_retrain_fraction):
        log.info("collection grew past %.0f%% since training: retraining", 100 * settings.index_retrain_fraction)
        return None
    if not new.ids:  # new shards held only images already indexed (a retried embed)
        empty = np.zeros((0, cur.manifest.input_dim), np.float32)
        return extend_index(cur, empty, [], [], params=index_params, source=source)
    new = fill_records(catalog, new)
    return extend_index(
        cur,
        new.vectors,
        new.ids,
        new.labels,
        params=index_params,
        class_top=new.top_class,
        class_prob=new.top_prob,
        captions=embed_captions(settings, new.captions),
        ingested=new.ingested,
        source=source,
    )


def _publish(storage: Storage, settings: Settings, built: ClusterIndex, force: bool, mode: str) -> ReindexResult:
    recall = built.manifest.recall
    if recall is not None and not recall.meets_target:
        if not force:
            raise QualityGate(
                f"recall@10 is {recall.at_10} at nprobe {built.nprobe}, below the target "
                f"{recall.target}: not published (raise CLUSTERLENS_INDEX_NPROBE, set it to 0 to tune, "
                "or reindex --force to publish anyway)",
                code="recall_below_target",
            )
        log.warning("publishing an index below its recall target (forced): %s", recall.at_10)
    version = publish(
        storage,
        built,
        keep=settings.index_keep_versions,
        swap_if=lambda: _still_newest(storage, built),
        share_dir=settings.index_share_dir,
    )
    if built.manifest.published is False:
        return _result(version, True, built.manifest, mode="superseded")
    return _result(version, True, built.manifest, mode=mode)


def _still_newest(storage: Storage, built: ClusterIndex) -> bool:
    """Whether ``built`` may replace the current version: it holds every shard the current one does.

    Two reindex jobs can run at once (parallel job replicas); shards only ever accumulate, so the
    build that read fewer of them must not replace the one that read more. A build for another
    encoder version (a model change) always may.
    """
    current = current_version(storage)
    if current is None:
        return True
    manifest = read_manifest(storage, current)
    if manifest.encoder_version != built.manifest.encoder_version:
        return True
    covered = built.manifest.shard_names | set(built.manifest.source.get("replaced", []))  # compacted ones too
    return manifest.shard_names <= covered


def _result(version: str, built: bool, manifest: IndexManifest, mode: str) -> ReindexResult:
    return ReindexResult(
        version,
        built,
        manifest.count,
        manifest.nlist,
        manifest.build_seconds,
        manifest.nprobe,
        manifest.recall.at_10 if manifest.recall else None,
        mode,
        int((manifest.incremental or {}).get("added", 0)) if mode == "incremental" else 0,
        manifest.kind,
    )
