"""Near-duplicate images: pairs found through the index, a threshold calibrated on the collection's own images.

Two images are near-duplicates when the cosine similarity of their embeddings (power + L2
normalised, 1280-d: the similarity search answers with) reaches a threshold. The threshold is not
picked by hand; :func:`calibrate` measures it on the collection:

- **copies** (the positives): a seeded sample of the collection's images, each transformed the way
  copies of a photo differ (:data:`TRANSFORMS`: re-encoded as low-quality JPEG, resized down, cropped
  by a few percent, brightness and contrast moved, turned a few degrees; a mirror image is a
  duplicate only when ``flip`` says so), embedded by the same encoder and compared with the
  original's stored embedding: how similar a copy stays;
- **nearest neighbours**: every image's nearest other image in the collection, found through the
  index (:func:`neighbour_pairs`). Most are distinct images, but the collection's own duplicates
  are among them, in a share (the prior) that is estimated from the upper tail: a duplicate's
  nearest neighbour is at least as similar as the q-quantile of the copies with probability 1 - q,
  and distinct images rarely are, so ``share(nearest >= copies_q) / (1 - q)`` over-estimates the
  prior by the distinct images up there; the smallest over q = 0.5, 0.75, 0.9 is taken
  (:func:`duplicate_share`).

For each threshold t, recall R(t) is the share of copies at or above t, and precision the share of
duplicates among the images whose nearest neighbour reaches t: ``prior x R(t) / A(t)``, with A(t)
that share of all images. The threshold is the lowest that reaches the target precision
(``CLUSTERLENS_DEDUPE_PRECISION``). The estimate leans on the copies being like the collection's
real duplicates: where real duplicates are milder edits than the copies (the same file saved
larger, a brighter print), the prior and so the precision are over-estimated.
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

from shared.features import normalize
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
        prior: the estimated share of images that have a near-duplicate in the collection.
        copies: float32 (c,) each copy's similarity to its original.
        kinds: each copy's transform.
        nearest: float32 (n,) every image's similarity to its nearest other image.
        reached: whether any threshold reached the target (else the threshold is 1: only identical
            embeddings are grouped).
    """

    threshold: float
    precision: float
    recall: float
    target: float
    prior: float
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
            "duplicate_share": round(self.prior, 4),
            "copies": len(self.copies),
            "recall_by_transform": per_kind,
            "copy_similarity": pct(self.copies),
            "nearest_similarity": pct(near),
            "images": len(near),
        }


TAIL_QUANTILES = (0.5, 0.75, 0.9)


def duplicate_share(copies: np.ndarray, nearest: np.ndarray) -> float:
    """The estimated share of images with a near-duplicate (see the module's docstring): the smallest,
    over the copies' quantiles q in :data:`TAIL_QUANTILES`, of the share of images whose nearest
    neighbour reaches that quantile, divided by 1 - q (capped at 1)."""
    if not len(copies) or not len(nearest):
        return 0.0
    ratios = [(nearest >= np.quantile(copies, q)).mean() / (1.0 - q) for q in TAIL_QUANTILES]
    return float(min(1.0, *ratios))


def choose_threshold(copies: np.ndarray, nearest: np.ndarray, target: float) -> Calibration:
    """The lowest threshold whose estimated precision reaches ``target`` (see the module's docstring).

    Args:
        copies: (c,) similarities of calibration copies to their originals.
        nearest: (n,) every image's similarity to its nearest other image.
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
    nearest_sorted = np.sort(np.asarray(nearest, np.float64))
    prior = duplicate_share(copies, nearest_sorted)
    grid = np.linspace(min(float(copies[0]), 1.0), 1.0, GRID)
    recall = 1.0 - np.searchsorted(copies, grid, side="left") / len(copies)
    above = 1.0 - np.searchsorted(nearest_sorted, grid, side="left") / max(len(nearest_sorted), 1)
    # the images whose nearest neighbour reaches t: the duplicates found (prior x recall) and the rest
    precision = np.where(above > 0, np.minimum(1.0, prior * recall / np.maximum(above, 1e-300)), 0.0)
    ok = np.flatnonzero((precision >= target) & (recall > 0))
    # no threshold backs the target: flag only what is identical (similarity 1), rather than guess
    at = int(ok[0]) if len(ok) else len(grid) - 1
    return Calibration(
        threshold=float(grid[at]),
        precision=float(precision[at]),
        recall=float(recall[at]),
        target=target,
        prior=prior,
        copies=given,
        kinds=[],
        nearest=np.asarray(nearest, np.float32),
        reached=bool(len(ok)),
    )


def group_pairs(n: int, left: np.ndarray, right: np.ndarray) -> list[np.ndarray]:
    """Connected components (size >= 2) of the graph on n rows with edges (left[i], right[i]).

    Returns:
        int64 arrays of rows, largest group first (ties: lowest first row).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(left):
        return []
    graph = coo_matrix((np.ones(len(left), np.int8), (left, right)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.argsort(label, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(label[order]) != 0])
    parts = np.split(order, starts[1:])
    groups = [p for p in parts if len(p) >= 2]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


# -- the job ---------------------------------------------------------------------------------------

NEIGHBOURS = 10  # neighbours looked at per image: a group larger than this is found through its chain
PREFIX = "duplicates/"  # in the reports container: duplicates/vNNNNNN/..., duplicates/CURRENT.json
BATCH = 64


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


def similarity_space(index: ClusterIndex, raw: np.ndarray) -> np.ndarray:
    """Unit vectors of raw embeddings (n, input_dim) in the space the index's scores are cosines in:
    the raw space (power + L2) where the index re-ranks by raw codes, else its own space."""
    xt, xr = index.prepare(np.ascontiguousarray(raw, dtype=np.float32))
    return normalize(xr if xr is not None else xt)


def encode_all(encoder: ImageEncoder, images: list[Image.Image]) -> np.ndarray:
    """float32 (n, 1280) embeddings of RGB images, :data:`BATCH` at a time."""
    out = [encoder.encode(images[i : i + BATCH]).vectors for i in range(0, len(images), BATCH)]
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def calibration_copies(
    storage: Storage,
    settings: Settings,
    encoder: ImageEncoder,
    index: ClusterIndex,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[str]]:
    """Similarities of transformed copies of a seeded sample of indexed images to their originals
    (both encoded now, by the same encoder), with each copy's transform. An image whose bytes cannot
    be read or decoded any more is left out of the sample."""
    from shared.catalog import Catalog
    from shared.errors import ClusterlensError
    from shared.imaging import decode_image

    catalog = Catalog(storage)
    visible = np.setdiff1d(np.arange(index.count), index.hidden)
    rows = rng.permutation(visible)[: settings.dedupe_calibration_images]
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
    a = similarity_space(index, encode_all(encoder, originals))
    b = similarity_space(index, encode_all(encoder, made))
    return (a[source] * b).sum(axis=1).astype(np.float32), kinds


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
    edge = member[left]
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
    lo = float(min(calibration.copies.min(), calibration.threshold)) if len(calibration.copies) else 0.0
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
    for key, colour, name in (("nearest", "#888", "nearest other image"), ("copies", "#1f77b4", "transformed copy")):
        counts = np.asarray(hist[key], dtype=np.float64)
        ax.bar(mids, counts / max(counts.sum(), 1), width=width, color=colour, alpha=0.6, label=name)
    ax.axvline(calibration.threshold, color="#d62728", lw=1.5, label=f"threshold {calibration.threshold:.3f}")
    ax.set_xlabel("cosine similarity")
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
    stage("calibration")
    sims, kinds = calibration_copies(storage, settings, encoder, index, np.random.default_rng(seed))
    if not len(sims):
        raise NotReady("no indexed image could be read for the calibration", code="no_calibration_images")
    seconds["calibration"] = time.perf_counter() - t0
    stage("neighbours")
    t = time.perf_counter()
    floor = float(min(sims.min(), 1.0))
    nearest, left, right, sim = neighbour_pairs(storage, index, encoder.version, floor)
    seconds["neighbours"] = time.perf_counter() - t
    calibration = choose_threshold(sims, nearest[nearest > -1], settings.dedupe_precision)
    calibration.kinds = kinds
    calibration.nearest = nearest
    stage("groups")
    t = time.perf_counter()
    on = sim >= calibration.threshold
    groups = group_pairs(index.count, left[on], right[on])
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
