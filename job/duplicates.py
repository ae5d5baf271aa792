"""Near-duplicate images: candidate pairs through the index, scored by pixel match, a threshold calibrated on
the collection's own images.

Candidates are each image's :data:`NEIGHBOURS` nearest through the published index (the embedding) and
its :data:`THUMB_NEIGHBOURS` nearest by grey thumbnail (:func:`thumbnail_pairs`: a blurred copy can be
far from its original in the embedding). Each candidate pair is scored by :mod:`shared.pixel_match`:
the best normalised correlation of the two thumbnails over small crops, turns, gamma curves and blurs
tried on either image. The embedding is not the score: on small images it moves more under a
re-encode, a blur or a one-pixel crop than between two similar garments, where the pixel match of a
copy stays ~0.999.

The threshold is not picked by hand; :func:`choose_threshold` measures it on the collection:

- **copies** (the positives): a seeded sample of the collection's images, each transformed the way
  copies of a photo differ (:data:`TRANSFORMS`: re-encoded as low-quality JPEG, resized down, cropped
  by a few percent, brightness and contrast moved, turned a few degrees; a mirror image is a
  duplicate only when ``flip`` says so) and matched with its original: R(t), the share of copies at or
  above t, is the recall;
- **candidate pairs**: P(t), how many of the collection's candidate pairs reach t. Most are distinct
  images, but the collection's own duplicates are among them; their number D is estimated as the
  smallest P(t) / R(t) over the thresholds that keep at least half the copies (where P(t) is mostly
  duplicates, P(t) / R(t) falls to D; lower, distinct pairs lift it; :func:`duplicate_pairs`).

The estimated precision at t is ``D x R(t) / P(t)``; the threshold is the lowest that reaches the target
(``CLUSTERLENS_DEDUPE_PRECISION``), or 1 (identical thumbnails only) when none does. The estimate leans
on the copies being like the collection's real duplicates: where real duplicates are milder edits than
the copies (the same file saved larger, a brighter print), R(t) under-states their recall at the top,
D is over-estimated and so is the precision (bench/quality.py measures by how much).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

from shared.pixel_match import THUMB, match_scores, slices, thumbnail, unit_vectors
from shared.storage import REPORTS

if TYPE_CHECKING:
    from shared.catalog import ImageRecord
    from shared.encoder import ImageEncoder
    from shared.index import ClusterIndex
    from shared.settings import Settings
    from shared.storage import Storage

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

TRANSFORMS = ("jpeg", "resize", "crop", "tone", "rotate")
FLIP = "flip"
GRID = 2000  # thresholds tried, evenly in [lowest copy, 1]


def _border_fill(img: Image.Image) -> tuple[int, ...]:
    """The median colour of the image's border (what a turned image's corners are filled with)."""
    a = np.asarray(img.convert("RGB"))
    edge = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(edge, axis=0))


def transform(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One calibration copy of an RGB image.

    Kinds: ``jpeg`` (re-encoded at quality 20-40), ``resize`` (each side 50-80%), ``crop`` (2-5% off
    each side), ``tone`` (brightness and contrast each x0.8-1.2), ``rotate`` (2-5 degrees either way,
    corners filled with the border's colour), ``flip`` (mirrored left-right).

    Raises:
        ValueError: an unknown kind.
    """
    img = img.convert("RGB")
    w, h = img.size
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(20, 41)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "resize":
        f = rng.uniform(0.5, 0.8)
        return img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR)
    if kind == "crop":
        left, top, right, bottom = (rng.uniform(0.02, 0.05, 4) * [w, h, w, h]).round().astype(int)
        return img.crop((left, top, max(left + 1, w - right), max(top + 1, h - bottom)))
    if kind == "tone":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
        return ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
    if kind == "rotate":
        angle = rng.uniform(2, 5) * rng.choice([-1, 1])
        return img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_border_fill(img))
    if kind == FLIP:
        return ImageOps.mirror(img)
    raise ValueError(f"unknown transform {kind!r}")


def copies(
    images: Sequence[Image.Image], rng: np.random.Generator, flip: bool = False
) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """Every image in every calibration transform (and mirrored, with ``flip``).

    Returns:
        the copies, int64 the position of each one's original, and each one's transform.
    """
    kinds = [*TRANSFORMS, *([FLIP] if flip else [])]
    out, source, used = [], [], []
    for i, img in enumerate(images):
        for kind in kinds:
            out.append(transform(img, kind, rng))
            source.append(i)
            used.append(kind)
    return out, np.asarray(source, np.int64), used


@dataclass
class Calibration:
    """A calibrated threshold and what it was measured on.

    Attributes:
        threshold: the similarity at or above which two images are near-duplicates.
        precision: the estimated precision of the pairs flagged at it.
        recall: the share of copies at or above it.
        target: the precision asked for.
        pairs: the estimated number of duplicate pairs among the candidates.
        candidates: candidate pairs scored.
        copies: float32 (c,) each copy's pixel match to its original.
        kinds: each copy's transform.
        nearest: float32 (n,) every image's best pixel match among its candidates (-1: none).
        reached: whether any threshold reached the target (else the threshold is 1: only identical
            embeddings are grouped).
    """

    threshold: float
    precision: float
    recall: float
    target: float
    pairs: float
    candidates: int
    copies: np.ndarray
    kinds: list[str]
    nearest: np.ndarray
    reached: bool

    def summary(self) -> dict[str, object]:
        """The JSON block of the report (distributions as percentiles)."""
        q = [1, 5, 10, 25, 50, 75, 90, 95, 99]

        def pct(x: np.ndarray) -> dict[str, float]:
            return {f"p{p}": round(float(v), 4) for p, v in zip(q, np.percentile(x, q), strict=True)} if len(x) else {}

        near = self.nearest[self.nearest > -1]  # rows hidden or never searched have none
        per_kind = {
            k: round(float((self.copies[np.array(self.kinds) == k] >= self.threshold).mean()), 4)
            for k in dict.fromkeys(self.kinds)
        }
        return {
            "threshold": round(self.threshold, 4),
            "target_precision": self.target,
            "expected_precision": round(self.precision, 4),
            "expected_recall": round(self.recall, 4),
            "reached": self.reached,
            "signal": "pixel_match",
            "duplicate_pairs": round(self.pairs, 1),
            "candidate_pairs": self.candidates,
            "copies": len(self.copies),
            "recall_by_transform": per_kind,
            "copy_match": pct(self.copies),
            "nearest_match": pct(near),
            "images": len(near),
        }


def duplicate_pairs(copies: np.ndarray, scores: np.ndarray, grid: np.ndarray) -> float:
    """The estimated number of duplicate pairs among the candidate pairs (see the module's docstring):
    the smallest, over thresholds t where at least half the copies stay (R(t) >= 0.5), of P(t) / R(t).
    Where no pair reaches the copies' median, the collection has no duplicates like them: 0.

    Args:
        copies, scores: sorted ascending.
    """
    if not len(copies) or not len(scores):
        return 0.0
    recall = 1.0 - np.searchsorted(copies, grid, side="left") / len(copies)
    above = len(scores) - np.searchsorted(scores, grid, side="left")
    ok = recall >= 0.5  # a threshold keeping half the copies with no pair at all: no duplicates (0)
    return float(np.min(above[ok] / recall[ok])) if ok.any() else 0.0


def choose_threshold(copies: np.ndarray, scores: np.ndarray, target: float) -> Calibration:
    """The lowest threshold whose estimated precision reaches ``target`` (see the module's docstring).

    Args:
        copies: (c,) pixel matches of calibration copies to their originals.
        scores: (p,) pixel matches of every candidate pair in the collection.
        target: the precision wanted, in (0, 1).

    Raises:
        ValueError: no copies, or a target outside (0, 1).
    """
    if not len(copies):
        raise ValueError("need calibration copies")
    if not 0 < target < 1:
        raise ValueError("the target precision is in (0, 1)")
    given = np.asarray(copies, np.float32)
    copies = np.sort(given.astype(np.float64))
    pairs = np.sort(np.asarray(scores, np.float64))
    grid = np.linspace(min(float(copies[0]), 1.0), 1.0, GRID)
    found = duplicate_pairs(copies, pairs, grid)
    recall = 1.0 - np.searchsorted(copies, grid, side="left") / len(copies)
    above = len(pairs) - np.searchsorted(pairs, grid, side="left")
    # the pairs at or above t: the duplicates found (pairs x recall) and the rest
    precision = np.where(above > 0, np.minimum(1.0, found * recall / np.maximum(above, 1)), 0.0)
    ok = np.flatnonzero((precision >= target) & (recall > 0))
    # no threshold backs the target: flag only what is identical (match 1), rather than guess
    at = int(ok[0]) if len(ok) else len(grid) - 1
    return Calibration(
        threshold=float(grid[at]),
        precision=float(precision[at]),
        recall=float(recall[at]),
        target=target,
        pairs=found,
        candidates=len(pairs),
        copies=given,
        kinds=[],
        nearest=np.zeros(0, np.float32),
        reached=bool(len(ok)),
    )


def group_pairs(n: int, left: np.ndarray, right: np.ndarray, score: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Groups of near-duplicates among n rows from scored candidate pairs: the pairs at or above the
    threshold are taken best first, and two groups join unless a candidate pair between them scored
    below it. So no group holds two images known not to match (single-link would chain alike images,
    A like B like C with A not like C, into one group); a large set of copies still forms one group,
    as the pairs between them that were never scored are no evidence against it.

    Returns:
        int64 arrays of rows (ascending), largest group first (ties: lowest first row).
    """
    left = np.asarray(left, np.int64)
    right = np.asarray(right, np.int64)
    score = np.asarray(score)
    low = score < threshold
    # only rows in some pair at or above the threshold can join a group: the evidence against a join is
    # the pairs between two of them (at 10M images a few pairs, not every candidate's)
    involved = np.zeros(n, bool)
    involved[left[~low]] = True
    involved[right[~low]] = True
    low &= involved[left] & involved[right]
    # each such row's candidates that scored below the threshold (CSR over both ends)
    ends = np.concatenate([left[low], right[low]])
    others = np.concatenate([right[low], left[low]])
    order = np.argsort(ends, kind="stable")
    starts = np.searchsorted(ends[order], np.arange(n + 1))
    mismatch = others[order]
    group = np.arange(n)
    members: dict[int, list[int]] = {}
    on = np.flatnonzero(score >= threshold)
    for i in on[np.argsort(-score[on], kind="stable")].tolist():
        ga, gb = int(group[left[i]]), int(group[right[i]])
        if ga == gb:
            continue
        ma, mb = members.get(ga, [ga]), members.get(gb, [gb])
        if len(ma) < len(mb):
            ga, gb, ma, mb = gb, ga, mb, ma
        if any((group[mismatch[starts[x] : starts[x + 1]]] == ga).any() for x in mb):
            continue
        group[mb] = ga
        ma.extend(mb)
        members[ga] = ma
        members.pop(gb, None)
    groups = [np.sort(np.asarray(m, np.int64)) for m in members.values()]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


# -- the job ---------------------------------------------------------------------------------------

NEIGHBOURS = 10  # neighbours looked at per image: a group larger than this is found through its chain
THUMB_NEIGHBOURS = 10  # more candidates per image, by thumbnail
EXACT_UP_TO = 50_000  # rows up to which the thumbnail neighbours are searched exactly
PREFIX = "duplicates/"  # in the reports container: duplicates/vNNNNNN/..., duplicates/CURRENT.json


@dataclass
class DedupeResult:
    """A published dedupe version.

    Attributes:
        version: ``vNNNNNN`` under ``reports/duplicates/``.
        calibration: :meth:`Calibration.summary`.
        groups: groups of near-duplicates found.
        images: images in them.
        seconds: per stage.
    """

    version: str
    calibration: dict[str, object]
    groups: int
    images: int
    seconds: dict[str, float]


THUMB_CACHE = "dedupe-thumbnails.npz"  # under the data folder's cache/: thumbnails by image id


def thumbnails(storage: Storage, settings: Settings, index: ClusterIndex) -> tuple[np.ndarray, np.ndarray]:
    """Every indexed row's grey thumbnail (:func:`shared.pixel_match.thumbnail`), read and decoded on the
    embedding job's prefetching loader; those of an earlier run come from a local cache (an image's id
    is its content's hash, so a cached thumbnail never goes stale).

    Returns:
        uint8 (n, THUMB*THUMB) thumbnails and bool (n,) which rows have one (hidden rows and images
        that can no longer be read or decoded have none).
    """
    from job.embeddings import Loaded, decode_workers, prefetch_batches
    from shared.catalog import Catalog
    from shared.errors import ClusterlensError
    from shared.imaging import decode_image

    n = index.count
    thumbs = np.zeros((n, THUMB * THUMB), np.uint8)
    have = np.zeros(n, bool)
    path = settings.data_dir / "cache" / THUMB_CACHE
    ids = np.asarray(index.ids)  # every id at once (O(n)), not one lookup a row
    rows = np.setdiff1d(np.arange(n), index.hidden)
    found = np.zeros(len(rows), bool)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            old_ids, old = f["ids"], f["thumbs"]
        order = np.argsort(old_ids)
        at = np.minimum(np.searchsorted(old_ids, ids[rows], sorter=order), max(len(old_ids) - 1, 0))
        if len(old_ids):
            found = old_ids[order[at]] == ids[rows]
            thumbs[rows[found]], have[rows[found]] = old[order[at[found]]], True
    todo = rows[~found]
    catalog = Catalog(storage)
    row_of = {str(ids[r]): int(r) for r in todo}

    def fetch(image_id: str) -> tuple[str, bytes | None]:
        try:
            return image_id, catalog.image_bytes(catalog.get(image_id))
        except ClusterlensError as exc:
            log.info("no thumbnail for %s: %s", image_id, exc.message)
            return image_id, None

    def decode(fetched: tuple[str, bytes | None]) -> Loaded:
        image_id, data = fetched
        if data is None:
            return Loaded(image_id, None)
        try:
            img = decode_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels).rgb
        except ClusterlensError as exc:
            log.info("no thumbnail for %s: %s", image_id, exc.message)
            return Loaded(image_id, None)
        return Loaded(image_id, thumbnail(img))

    bar = tqdm(total=len(todo), desc="thumbnails", unit="img", disable=None)
    for batch in prefetch_batches(
        [str(ids[r]) for r in todo],
        fetch,
        decode,
        256,
        io_workers=settings.embed_io_workers,
        decode_workers=decode_workers(settings),
    ):
        at = np.array([row_of[i] for i in batch.ids], np.int64)
        if len(at):
            thumbs[at], have[at] = batch.pixels, True
        bar.update(len(batch.ids) + len(batch.failed))
    bar.close()
    if len(todo):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids[have], thumbs=thumbs[have])
        tmp.replace(path)
    return thumbs, have


def thumbnail_pairs(thumbs: np.ndarray, have: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows by unedited thumbnail (inner product of
    :func:`shared.pixel_match.unit_vectors`): exact up to :data:`EXACT_UP_TO` rows, else FAISS IVF over a
    64-d PCA. These find the copies the embedding misses (a blurred copy can be far from its original in
    the embedding and still a near-perfect pixel match).

    Returns:
        (left, right) rows, left < right.
    """
    import faiss

    rows = np.flatnonzero(have)
    if len(rows) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    vectors = np.concatenate([unit_vectors(thumbs[rows[s]]) for s in slices(len(rows), 65_536)])
    dim = vectors.shape[1]
    if len(rows) <= EXACT_UP_TO:
        search: Any = faiss.IndexFlatIP(dim)
    else:
        lists = int(4 * np.sqrt(len(rows)))
        search = faiss.index_factory(dim, f"PCA64,IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(rows), min(len(rows), 64 * lists), replace=False)
        search.train(vectors[np.sort(sample)])
        faiss.extract_index_ivf(search).nprobe = 16
    search.add(vectors)
    lefts, rights = [], []
    kk = min(k + 1, len(rows))
    for s in slices(len(rows), 16_384):
        _, found = search.search(vectors[s], kk)
        me = np.repeat(np.arange(s.start, s.stop), kk)
        other = found.ravel()
        keep = (other >= 0) & (other != me)
        a, b = rows[me[keep]], rows[other[keep]]
        lefts.append(np.minimum(a, b))
        rights.append(np.maximum(a, b))
    return np.concatenate(lefts), np.concatenate(rights)


def calibration_copies(
    storage: Storage,
    settings: Settings,
    index: ClusterIndex,
    thumbs: np.ndarray,
    have: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[str]]:
    """Pixel matches of transformed copies of a seeded sample of indexed images to their originals, with
    each copy's transform. An image whose bytes cannot be read or decoded any more is left out."""
    from shared.catalog import Catalog
    from shared.errors import ClusterlensError
    from shared.imaging import decode_image

    catalog = Catalog(storage)
    rows = rng.permutation(np.flatnonzero(have))[: settings.dedupe_calibration_images]
    originals: list[Image.Image] = []
    for image_id in tqdm(index.ids[np.sort(rows)], desc="calibration images", unit="img", disable=None):
        try:
            data = catalog.image_bytes(catalog.get(str(image_id)))
            originals.append(
                decode_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels).rgb
            )
        except ClusterlensError as exc:
            log.info("calibration leaves out %s: %s", image_id, exc)
    made, source, kinds = copies(originals, rng, flip=settings.dedupe_flip)
    if not made:
        return np.zeros(0, np.float32), kinds
    both = np.stack([thumbnail(img) for img in [*originals, *made]])
    return match_scores(both, source, len(originals) + np.arange(len(made))), kinds


def neighbour_pairs(
    storage: Storage, index: ClusterIndex, encoder_version: str, floor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every indexed image's :data:`NEIGHBOURS` nearest through the index (its own nprobe), shard by shard.

    Returns:
        nearest: float32 (n,) each row's similarity to its nearest other row (-1: none found; hidden
            rows stay -1); and the pairs (left < right rows, similarity) at or above ``floor``.
    """
    from job.embeddings import EmbeddingStore

    n = index.count
    row_type = np.int32 if n < 2**31 else np.int64
    nearest = np.full(n, -1.0, np.float32)
    hidden = np.zeros(n, bool)
    hidden[index.hidden] = True
    lefts, rights, sims = [], [], []
    bar = tqdm(total=n, desc="neighbours", unit="img", disable=None)
    for chunk in EmbeddingStore(storage, encoder_version).iter_chunks():
        rows = index.rows_of(chunk.ids)
        keep = np.flatnonzero(rows >= 0)
        keep = keep[~hidden[rows[keep]]]
        for start in range(0, len(keep), 4096):
            at = keep[start : start + 4096]
            hits = index.search(chunk.vectors[at], NEIGHBOURS + 1)
            me = rows[at][:, None]
            other = (hits.rows >= 0) & (hits.rows != me)
            other &= ~hidden[np.maximum(hits.rows, 0)]
            scores = np.where(other, hits.scores, -1.0)
            nearest[rows[at]] = scores.max(axis=1)
            i, j = np.nonzero(other & (hits.scores >= floor))
            a, b = me[i, 0], hits.rows[i, j]
            lefts.append(np.minimum(a, b).astype(row_type))  # int32 rows: 12 bytes a pair, not 20
            rights.append(np.maximum(a, b).astype(row_type))
            sims.append(hits.scores[i, j])
        bar.update(len(chunk.ids))
    bar.close()
    if not lefts:
        return nearest, np.zeros(0, row_type), np.zeros(0, row_type), np.zeros(0, np.float32)
    left, right, sim = np.concatenate(lefts), np.concatenate(rights), np.concatenate(sims).astype(np.float32)
    # a pair is usually found from both ends: keep it once, with its higher score
    order = np.lexsort((-sim, right, left))
    left, right, sim = left[order], right[order], sim[order]
    first = np.r_[True, (np.diff(left) != 0) | (np.diff(right) != 0)]
    return nearest, left[first], right[first], sim[first]


def candidate_pairs(
    storage: Storage, index: ClusterIndex, encoder_version: str, thumbs: np.ndarray, have: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs the pixel match scores: each image's :data:`NEIGHBOURS` nearest through the index and
    its :data:`THUMB_NEIGHBOURS` nearest by thumbnail, once each, both images with a thumbnail.

    Returns:
        (left, right) rows, left < right.
    """
    _, left, right, _ = neighbour_pairs(storage, index, encoder_version, -1.0)
    more = thumbnail_pairs(thumbs, have, THUMB_NEIGHBOURS)
    left = np.concatenate([left.astype(np.int64), more[0]])
    right = np.concatenate([right.astype(np.int64), more[1]])
    keep = have[left] & have[right]
    pairs = np.unique(left[keep] * index.count + right[keep])
    return pairs // index.count, pairs % index.count


def keeper(records: list[ImageRecord], labelled: set[str]) -> tuple[int, str]:
    """Which image of a group to keep: a labelled one, then the largest (pixels), then the oldest; with
    the rule that decided (``labelled``, ``largest``, ``oldest``)."""

    def size(r: ImageRecord) -> int:
        return r.width * r.height

    pool = list(range(len(records)))
    reason = "oldest"
    with_label = [i for i in pool if records[i].id in labelled]
    if with_label and len(with_label) < len(pool):
        pool, reason = with_label, "labelled"
    biggest = max(size(records[i]) for i in pool)
    largest = [i for i in pool if size(records[i]) == biggest]
    if len(largest) < len(pool) and reason == "oldest":
        reason = "largest"
    best = min(largest, key=lambda i: (records[i].ingested_at, records[i].id))
    return best, reason


def group_id(ids: list[str]) -> str:
    """A group's name: the first 16 hex digits of the sha256 of its sorted member ids (the same group
    found again keeps its name, so a resolution stays attached to it)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def describe_groups(
    storage: Storage,
    index: ClusterIndex,
    groups: list[np.ndarray],
    left: np.ndarray,
    right: np.ndarray,
    sim: np.ndarray,
) -> list[dict[str, Any]]:
    """Each group as the API serves it: members (keeper first) with what the keeper rule reads, and the
    lowest and highest similarity of the pairs that joined it."""
    from shared.catalog import Catalog
    from shared.errors import NotFound
    from shared.labels import LabelLog

    catalog = Catalog(storage)
    labels = {image_id: e.label for image_id, e in LabelLog(storage).current().items()}
    member = np.full(index.count, -1, np.int64)
    for g, rows in enumerate(groups):
        member[rows] = g
    inside = (member[left] >= 0) & (member[left] == member[right])  # a pair whose groups did not join: neither
    edge, sim = member[left][inside], sim[inside]
    lo = np.full(len(groups), np.inf)
    hi = np.full(len(groups), -np.inf)
    np.minimum.at(lo, edge, sim)
    np.maximum.at(hi, edge, sim)
    out = []
    for g, rows in enumerate(tqdm(groups, desc="groups", unit="group", disable=None)):
        records = []
        for image_id in index.ids[rows]:
            try:
                records.append(catalog.get(str(image_id)))
            except NotFound:  # deleted since the index was built
                continue
        if len(records) < 2:
            continue
        keep, reason = keeper(records, set(labels))
        records.insert(0, records.pop(keep))
        ids = [r.id for r in records]
        out.append(
            {
                "group": group_id(ids),
                "size": len(records),
                "keeper": ids[0],
                "reason": reason,
                "similarity": {"min": round(float(lo[g]), 4), "max": round(float(hi[g]), 4)},
                "images": [
                    {
                        "id": r.id,
                        "label": labels.get(r.id),
                        "width": r.width,
                        "height": r.height,
                        "bytes": r.bytes,
                        "ingested_at": r.ingested_at,
                    }
                    for r in records
                ],
            }
        )
    return out


def histogram(calibration: Calibration, bins: int = 60) -> dict[str, Any]:
    """Both distributions on shared bins from the lowest copy to 1 (what the page and report draw)."""
    # from the copies' 1st percentile (the scores crowd just under 1; a few far copies would squash them)
    lo = float(min(np.percentile(calibration.copies, 1), calibration.threshold)) if len(calibration.copies) else 0.0
    edges = np.linspace(lo, 1.0, bins + 1)
    near = calibration.nearest[calibration.nearest > -1]
    return {
        "edges": [round(float(e), 5) for e in edges],
        "copies": np.histogram(np.clip(calibration.copies, lo, 1), edges)[0].tolist(),
        "nearest": np.histogram(np.clip(near, lo, 1), edges)[0].tolist(),
        "nearest_below": int((near < lo).sum()),
    }


def plot(calibration: Calibration, hist: dict[str, Any]) -> bytes:
    """The two distributions and the threshold as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(hist["edges"])
    mids = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    for key, colour, name in (
        ("nearest", "#888", "best match among candidates"),
        ("copies", "#1f77b4", "transformed copy"),
    ):
        counts = np.asarray(hist[key], dtype=np.float64)
        ax.bar(mids, counts / max(counts.sum(), 1), width=width, color=colour, alpha=0.6, label=name)
    ax.axvline(calibration.threshold, color="#d62728", lw=1.5, label=f"threshold {calibration.threshold:.3f}")
    ax.set_xlabel("pixel match (best normalised correlation of the thumbnails)")
    ax.set_ylabel("share")
    ax.set_title(
        f"expected precision {calibration.precision:.3f}, recall {calibration.recall:.3f}"
        f" (target {calibration.target:.2f})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_dedupe(
    storage: Storage, settings: Settings, encoder: ImageEncoder, *, seed: int = 0, progress: Progress | None = None
) -> DedupeResult:
    """Calibrate the threshold, find the groups through the published index, publish them.

    Raises:
        NotReady: no index yet, or one built with another encoder.
    """
    from shared.errors import NotReady
    from shared.index import load_current

    def stage(name: str) -> None:
        if progress is not None:
            progress(name)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    index = load_current(storage, settings.data_dir / "cache" / "index", mount=settings.index_mount)
    if index.manifest.encoder_version != encoder.version:
        raise NotReady(
            f"the index was built with {index.manifest.encoder_version}, not {encoder.version}: reindex first",
            code="index_encoder_mismatch",
        )
    if index.count < 2:
        raise NotReady("near-duplicates need at least 2 indexed images", code="too_few_images")
    stage("thumbnails")
    thumbs, have = thumbnails(storage, settings, index)
    seconds["thumbnails"] = time.perf_counter() - t0
    stage("calibration")
    t = time.perf_counter()
    sims, kinds = calibration_copies(storage, settings, index, thumbs, have, np.random.default_rng(seed))
    if not len(sims):
        raise NotReady("no indexed image could be read for the calibration", code="no_calibration_images")
    seconds["calibration"] = time.perf_counter() - t
    stage("candidates")
    t = time.perf_counter()
    left, right = candidate_pairs(storage, index, encoder.version, thumbs, have)
    seconds["candidates"] = time.perf_counter() - t
    stage("pixel match")
    t = time.perf_counter()
    sim = match_scores(thumbs, left, right)
    seconds["pixel_match"] = time.perf_counter() - t
    nearest = np.full(index.count, -1.0, np.float32)
    np.maximum.at(nearest, left, sim)
    np.maximum.at(nearest, right, sim)
    calibration = choose_threshold(sims, sim, settings.dedupe_precision)
    calibration.kinds = kinds
    calibration.nearest = nearest
    stage("groups")
    t = time.perf_counter()
    on = sim >= calibration.threshold
    groups = group_pairs(index.count, left, right, sim, calibration.threshold)
    items = describe_groups(storage, index, groups, left[on], right[on], sim[on])
    seconds["groups"] = time.perf_counter() - t
    summary = calibration.summary()
    hist = histogram(calibration)
    version = publish(
        storage,
        settings,
        {
            "calibration": summary,
            "histogram": hist,
            "index_version": index.manifest.version,
            "encoder_version": encoder.version,
            "flip_is_duplicate": settings.dedupe_flip,
        },
        items,
        plot(calibration, hist),
    )
    seconds["total"] = time.perf_counter() - t0
    return DedupeResult(
        version=version,
        calibration=summary,
        groups=len(items),
        images=sum(g["size"] for g in items),
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )


def publish(
    storage: Storage, settings: Settings, calibration: dict[str, Any], items: list[dict[str, Any]], png: bytes
) -> str:
    """A new numbered version under ``reports/duplicates/``, then the pointer swap; older versions pruned."""
    from shared.versions import MANIFEST, claim_next, prune, swap_pointer

    version = claim_next(storage, REPORTS, PREFIX)
    folder = f"{PREFIX}{version}/"
    storage.put_json(REPORTS, folder + "calibration.json", calibration)
    storage.put_json(REPORTS, folder + "groups.json", {"items": items})
    storage.put(REPORTS, folder + "calibration.png", png)
    manifest = {
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "threshold": calibration["calibration"]["threshold"],
        "groups": len(items),
        "images": sum(g["size"] for g in items),
        "files": ["calibration.json", "groups.json", "calibration.png"],
    }
    storage.put_json(REPORTS, folder + MANIFEST, manifest)
    swap_pointer(storage, REPORTS, version, PREFIX)
    prune(storage, REPORTS, settings.analysis_keep_versions, version, PREFIX)
    return version
