"""Data-quality benchmark: finding wrong labels (and near-duplicates) in real images.

Run by ``make bench-quality``; writes ``bench/results/data_quality.json``. The images are the
benchmark collection's stored embeddings (all 70,000 Fashion-MNIST images through the product's
pipeline, see :mod:`bench.collection`).

**Label issues**: 10,000 Fashion-MNIST training images (a seeded sample) with their true labels,
then two kinds of noise, each on 10% of them: *random* flips (to any other class, uniformly) and
*confusable* flips (T-shirt/top <-> Shirt, Sneaker <-> Sandal, Pullover <-> Coat: 1,000 of the
6,000 images of those classes, each to its partner), each drawn with 3 seeds. Every method of
:mod:`job.label_issues` is asked for the issues on the features the analysis job uses (power + L2
+ PCA 128 for the classifiers, unit vectors in the index's PCA-256 space for the neighbours, both
fitted on these images) and scored against the flipped set: precision, recall and F1 (median of
the seeds, with the spread), and its seconds: the neighbours' vote; confident learning over the
mean of logistic regression and the weighted vote (the default), also without cleanlab's count cut;
over logistic regression alone; over LightGBM. The bar: F1 >= 0.80 on random flips for the
product's default (``CLUSTERLENS_ANALYSIS_LABEL_ISSUES``, ``CLUSTERLENS_ANALYSIS_LABEL_ISSUE_MODEL``).

**Near-duplicates**: 20,000 Fashion-MNIST training images (a seeded sample) and 2,000 test images,
each test image also added once more as a transformed copy, the transform drawn from a set the
job's calibration never makes (:data:`BENCH_TRANSFORMS`: JPEG at quality 50-90, 1-2 pixels cut
from some sides, enlarged 1.5-2x, a gamma curve, a slight blur, turned 1-2 degrees). All 24,000 go through the product:
ingested into their own data dir (``bench/cache/quality``), embedded, indexed, then the ``dedupe``
job calibrates its threshold on the collection (copies of 200 of its images) and publishes its
groups. Every pair of images in a group is a predicted pair; the 2,000 copy pairs are the truth
(Fashion-MNIST's own near-identical images count against precision). Beside it, imagededup's
perceptual hashes (PHash, DHash; its hashing needs no weights) of the same 24,000 images, scored
on the same pairs at its default Hamming distance (10) and at the distance that gives each hash
its best F1 (a threshold tuned on the answers, which the product never sees). The bar: precision
>= 0.97 and recall >= 0.90, and an F1 ahead of the best hash's.

This is a benchmark, not a test (~10 minutes on 2 CPU cores once the collection is embedded).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.active_learning import split_data
from bench.collection import real_embeddings
from bench.embed import device
from job.classifier import FeatureSpace
from job.datasets import FASHION_MNIST_CLASSES
from job.label_issues import find_issues, precision_recall
from shared.features import normalize
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "data_quality.json"
CONFUSABLE = (("T-shirt/top", "Shirt"), ("Sneaker", "Sandal"), ("Pullover", "Coat"))
LABEL_BAR_F1 = 0.80


def flip_random(y: np.ndarray, n_classes: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """``y`` with ``share`` of its labels (chosen at random) moved to another class, uniformly."""
    noisy = y.copy()
    at = rng.choice(len(y), int(round(share * len(y))), replace=False)
    noisy[at] = (y[at] + rng.integers(1, n_classes, len(at))) % n_classes
    return noisy


def flip_confusable(y: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``y`` with ``share`` of all its labels flipped within the :data:`CONFUSABLE` pairs (drawn from
    the images of those classes)."""
    partner = np.arange(int(y.max()) + 1)
    for a, b in CONFUSABLE:
        ia, ib = FASHION_MNIST_CLASSES.index(a), FASHION_MNIST_CLASSES.index(b)
        partner[ia], partner[ib] = ib, ia
    pool = np.flatnonzero(partner[y] != np.arange(len(partner))[y])
    at = rng.choice(pool, int(round(share * len(y))), replace=False)
    noisy = y.copy()
    noisy[at] = partner[y[at]]
    return noisy


def label_issues(x: np.ndarray, y: np.ndarray, settings: Settings, share: float, seed: int) -> dict[str, Any]:
    """Every method against random and confusable flips of ``share`` of the labels of (x, y)."""
    features = FeatureSpace(dim=settings.classifier_pca_dim, power=settings.index_power, seed=seed).fit(x).transform(x)
    # the neighbours are found where the analysis finds them: the index's space (power + L2 + PCA 256, unit)
    unit = normalize(
        FeatureSpace(dim=settings.index_pca_dim, power=settings.index_power, seed=seed).fit(x).transform(x)
    )
    n_classes = len(FASHION_MNIST_CLASSES)
    out: dict[str, Any] = {}
    for noise in ("random", "confusable"):
        rng = np.random.default_rng(seed)
        noisy = flip_random(y, n_classes, share, rng) if noise == "random" else flip_confusable(y, share, rng)
        truth = noisy != y
        rows: dict[str, Any] = {}
        for method, model, cut in [
            ("knn_vote", None, True),
            ("confident_learning", "logistic+knn", True),
            ("confident_learning", "logistic+knn", False),
            ("confident_learning", "logistic", True),
            ("confident_learning", "lightgbm", True),
        ]:
            t0 = time.perf_counter()
            issues = find_issues(
                features,
                unit,
                noisy,
                n_classes,
                method,
                model=model or "logistic+knn",
                min_share=settings.analysis_mislabel_vote,
                cut=cut,
                seed=seed,
            )
            name = method if model is None else f"{method} ({model}{'' if cut else ', uncut'})"
            rows[name] = {**precision_recall(issues.order, truth), "seconds": round(time.perf_counter() - t0, 2)}
            print(noise, name, rows[name], flush=True)
        out[noise] = {"flipped": int(truth.sum()), "methods": rows}
    return out


# -- near-duplicates -------------------------------------------------------------------------------

BENCH_TRANSFORMS = ("jpeg_hq", "crop_sides", "enlarge", "gamma", "blur", "rotate_small")
DATA_DIR = ROOT / "bench" / "cache" / "quality"
DUP_BAR = {"precision": 0.97, "recall": 0.90}


def bench_copy(pixels: np.ndarray, kind: str, rng: np.random.Generator) -> bytes:
    """A transformed copy of a grey image as file bytes (JPEG for ``jpeg_hq``, else PNG), by a transform
    the calibration does not make: JPEG at quality 50-90 (calibration: 20-40), 1-2 pixels cut from some
    sides only (calibration: 2-5% from every side), enlarged 1.5-2x (calibration: shrunk), a gamma curve
    (calibration: linear brightness and contrast), a Gaussian blur (none), turned 1-2 degrees
    (calibration: 2-5).

    Raises:
        ValueError: an unknown kind.
    """
    from PIL import Image, ImageFilter

    img = Image.fromarray(pixels)
    w, h = img.size
    if kind == "jpeg_hq":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(50, 91)))
        return buf.getvalue()
    if kind == "crop_sides":
        cut = rng.integers(1, 3, 4) * (rng.random(4) < 0.5)
        if not cut.any():
            cut[rng.integers(4)] = 1
        img = img.crop((int(cut[0]), int(cut[1]), w - int(cut[2]), h - int(cut[3])))
    elif kind == "enlarge":
        f = rng.uniform(1.5, 2.0)
        img = img.resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC)
    elif kind == "gamma":
        g = rng.uniform(0.7, 1.4)
        img = Image.fromarray((255.0 * (np.asarray(img) / 255.0) ** g).round().astype(np.uint8))
    elif kind == "blur":
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.8)))
    elif kind == "rotate_small":
        img = img.rotate(rng.uniform(1, 2) * rng.choice([-1, 1]), resample=Image.Resampling.BICUBIC)
    else:
        raise ValueError(f"unknown transform {kind!r}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class DupCollection:
    settings: Settings
    ids: list[str]  # every image, in order: originals (train, then test), then copies
    pixels: list[np.ndarray]  # what imagededup hashes: each image decoded as the product stored it
    truth: set[frozenset[str]]  # the copy pairs
    kinds: dict[str, str]  # copy id -> its transform
    identical: int  # copies whose bytes were their original's (stored once at ingest, not a pair)


def dup_collection(train: int, held_out: int, seed: int) -> DupCollection:
    """Ingest and embed the benchmark's images into :data:`DATA_DIR` (skipped where done), index them."""
    from PIL import Image

    from job.datasets import load_fashion_mnist, png_bytes
    from job.embeddings import embed_pending
    from job.reindex import reindex
    from shared.encoder import ImageEncoder
    from shared.ingest import IngestItem, ingest_bytes
    from shared.storage import LocalStorage

    settings = Settings(_env_file=None, data_dir=DATA_DIR)  # type: ignore[call-arg]
    storage = LocalStorage(DATA_DIR)
    rng = np.random.default_rng(seed)
    x_train, _ = load_fashion_mnist(settings.fashion_mnist_dir, "train")
    x_test, _ = load_fashion_mnist(settings.fashion_mnist_dir, "test")
    originals = [x_train[i] for i in np.sort(rng.choice(len(x_train), train, replace=False))]
    tests = [x_test[i] for i in np.sort(rng.choice(len(x_test), held_out, replace=False))]
    kinds = rng.choice(BENCH_TRANSFORMS, held_out)
    copies = [bench_copy(px, str(k), rng) for px, k in zip(tests, kinds, strict=True)]
    ids, pixels, truth, copy_kind = [], [], set(), {}
    identical = 0
    for i, px in enumerate(tqdm(originals + tests, desc="ingest originals", unit="img")):
        r = ingest_bytes(storage, settings, IngestItem(data=png_bytes(px), source=f"bench/original/{i}"))
        ids.append(r.id)
        pixels.append(px)
    for i, (data, kind) in enumerate(tqdm(list(zip(copies, kinds, strict=True)), desc="ingest copies", unit="img")):
        r = ingest_bytes(storage, settings, IngestItem(data=data, source=f"bench/copy/{kind}/{i}"))
        if r.id == ids[train + i]:  # the same bytes as its original (ingest stores it once): no pair to find
            identical += 1
            continue
        ids.append(r.id)
        pixels.append(np.asarray(Image.open(io.BytesIO(data)).convert("L")))
        truth.add(frozenset((ids[train + i], r.id)))
        copy_kind[r.id] = str(kind)
    encoder = ImageEncoder.from_settings(settings)
    embed_pending(storage, settings, encoder)
    reindex(storage, settings, encoder.version)
    return DupCollection(settings, ids, pixels, truth, copy_kind, identical)


def pair_scores(groups: list[list[str]], truth: set[frozenset[str]], kinds: dict[str, str]) -> dict[str, Any]:
    """Pair-level precision, recall and F1 of groups against the copy pairs; recall per transform."""
    predicted = {frozenset((a, b)) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]}
    hit = predicted & truth
    p = len(hit) / len(predicted) if predicted else 0.0
    r = len(hit) / len(truth)
    by_kind: dict[str, list[bool]] = {}
    for pair in truth:
        kind = next(kinds[i] for i in pair if i in kinds)
        by_kind.setdefault(kind, []).append(pair in hit)
    return {
        "pairs_predicted": len(predicted),
        "pairs_found": len(hit),
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
        "recall_by_transform": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_kind.items())},
    }


def curve(scores: np.ndarray, true: np.ndarray, pairs: int, thresholds: np.ndarray) -> dict[str, Any]:
    """Precision, recall and F1 of the pairs at or above each threshold, scored on the answers."""
    rows = []
    for t in thresholds:
        on = scores >= t
        predicted, hit = int(on.sum()), int((on & true).sum())
        p, r = (hit / predicted if predicted else 0.0), hit / pairs
        rows.append(
            {
                "threshold": round(float(t), 4),
                "precision": round(p, 4),
                "recall": round(r, 4),
                "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
            }
        )
    return {"best": max(rows, key=lambda c: c["f1"]), "curve": rows}


def tuned_curves(storage: Any, coll: DupCollection) -> dict[str, Any]:
    """What a threshold tuned on the answers would give: for the pixel match on the job's candidate pairs
    (0.990-0.9995), and for the embedding's cosine alone on the index's neighbour pairs (0.90-0.995),
    beside the hashes' tuned distances."""
    from job.duplicates import candidate_pairs, neighbour_pairs, thumbnails
    from shared.index import load_current
    from shared.pixel_match import match_scores

    index = load_current(storage, coll.settings.data_dir / "cache" / "index")
    row = dict(zip(coll.ids, index.rows_of(coll.ids).tolist(), strict=True))
    truth = {tuple(sorted(row[i] for i in pair)) for pair in coll.truth}

    def is_true(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return np.array([(int(a), int(b)) in truth for a, b in zip(left, right, strict=True)], bool)

    thumbs, have = thumbnails(storage, coll.settings, index)
    left, right = candidate_pairs(storage, index, index.manifest.encoder_version, thumbs, have)
    match = match_scores(thumbs, left, right)
    found = is_true(left, right)
    _, eleft, eright, cosine = neighbour_pairs(storage, index, index.manifest.encoder_version, 0.9)
    return {
        "candidate_pairs": len(left),
        "copy_pairs_among_candidates": int(found.sum()),
        "pixel_match": curve(match, found, len(truth), np.round(np.arange(0.99, 0.99951, 0.0005), 4)),
        "embedding": curve(cosine, is_true(eleft, eright), len(truth), np.round(np.arange(0.90, 0.9951, 0.005), 3)),
    }


def hash_scores(coll: DupCollection, method: str) -> dict[str, Any]:
    """imagededup's ``method`` hashes of every image, pairs within each Hamming distance scored."""
    hasher = imagededup_hasher(method)
    t0 = time.perf_counter()
    hexes = [hasher.encode_image(image_array=px) for px in tqdm(coll.pixels, desc=method, unit="img")]
    seconds = time.perf_counter() - t0
    codes = np.array([int(h, 16) for h in hexes], dtype=np.uint64)
    n = len(codes)
    index = {image_id: i for i, image_id in enumerate(coll.ids)}
    truth_rows = {tuple(sorted(index[i] for i in pair)) for pair in coll.truth}
    rows_a, rows_b, dists = [], [], []
    for start in range(0, n, 2048):  # every pair within distance 16 (block by block)
        d = np.bitwise_count(codes[start : start + 2048, None] ^ codes[None, :])
        a, b = np.nonzero(d <= 16)
        keep = start + a < b
        rows_a.append(start + a[keep])
        rows_b.append(b[keep])
        dists.append(d[a[keep], b[keep]])
    a, b, d = np.concatenate(rows_a), np.concatenate(rows_b), np.concatenate(dists)
    true = np.array([(int(x), int(y)) in truth_rows for x, y in zip(a, b, strict=True)], bool)
    curve = []
    for t in range(17):
        on = d <= t
        predicted, hit = int(on.sum()), int((on & true).sum())
        p = hit / predicted if predicted else 0.0
        r = hit / len(truth_rows)
        curve.append(
            {
                "distance": t,
                "precision": round(p, 4),
                "recall": round(r, 4),
                "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
            }
        )
    best = max(curve, key=lambda c: c["f1"])
    return {"seconds": round(seconds, 1), "default_distance_10": curve[10], "best": best, "curve": curve}


def imagededup_hasher(method: str) -> Any:
    """imagededup's PHash or DHash, imported without its CNN parts (``imagededup.methods`` and
    ``imagededup.utils`` import torch and torchvision in their ``__init__``, and torchvision is never
    installed here; the hashing methods need only numpy, scipy, PyWavelets and Pillow): the two
    packages are registered bare, so importing ``imagededup.methods.hashing`` runs neither ``__init__``."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("imagededup")
    if spec is None or spec.origin is None:
        raise RuntimeError("imagededup is not installed: make bench-quality installs it")
    for name in ("methods", "utils"):
        if f"imagededup.{name}" not in sys.modules:
            package = types.ModuleType(f"imagededup.{name}")
            package.__path__ = [str(Path(spec.origin).parent / name)]
            sys.modules[f"imagededup.{name}"] = package
    from imagededup.methods.hashing import DHash, PHash

    return {"phash": PHash, "dhash": DHash}[method](verbose=False)


def duplicates(train: int, held_out: int, seed: int, calibrations: int = 3) -> dict[str, Any]:
    """The product's dedupe job (``calibrations`` times, each with another seed for the calibration's
    sample and copies: the figures are the median run's, with the spread) and imagededup's hashes on the
    same images."""
    from job.duplicates import THUMB_CACHE, run_dedupe
    from shared.encoder import ImageEncoder
    from shared.storage import LocalStorage

    t0 = time.perf_counter()
    coll = dup_collection(train, held_out, seed)
    prepared = time.perf_counter() - t0
    storage = LocalStorage(DATA_DIR)
    runs = []
    for run in range(calibrations):
        (DATA_DIR / "cache" / THUMB_CACHE).unlink(missing_ok=True)  # each run reads every image, as a first one
        t0 = time.perf_counter()
        result = run_dedupe(storage, coll.settings, ImageEncoder.from_settings(coll.settings), seed=seed + run)
        seconds = time.perf_counter() - t0
        items = json.loads(storage.get("reports", f"duplicates/{result.version}/groups.json"))["items"]
        groups = [[m["id"] for m in g["images"]] for g in items]
        scores = {**pair_scores(groups, coll.truth, coll.kinds), "groups": len(groups), "seconds": round(seconds, 1)}
        runs.append({**scores, "seed": seed + run, "calibration": result.calibration, "stage_seconds": result.seconds})
        print("clusterlens", {k: v for k, v in runs[-1].items() if k != "calibration"}, flush=True)
    ours = dict(sorted(runs, key=lambda r: r["f1"])[len(runs) // 2])  # the median run by F1
    ours["calibration_runs"] = [
        {k: r[k] for k in ("seed", "precision", "recall", "f1")} | {"threshold": r["calibration"]["threshold"]}
        for r in runs
    ]
    ours["tuned_on_the_answers"] = tuned_curves(storage, coll)
    peers = {}
    for method in ("phash", "dhash"):
        peers[method] = hash_scores(coll, method)
        print(method, peers[method]["best"], peers[method]["default_distance_10"], flush=True)
    best_hash = max(peers, key=lambda m: peers[m]["best"]["f1"])
    return {
        "method": (
            f"{train:,} Fashion-MNIST training images and {held_out:,} test images, each test image once more as a "
            f"copy transformed by one of {', '.join(BENCH_TRANSFORMS)} (none of them the calibration's); "
            "pair-level precision and recall against the copy pairs"
        ),
        "images": len(coll.ids),
        "copy_pairs": len(coll.truth),
        "copies_identical_to_their_original": coll.identical,
        "prepare_seconds": round(prepared, 1),
        "clusterlens": ours,
        "imagededup": peers,
        "bar": {
            "precision": ours["precision"],
            "recall": ours["recall"],
            "f1": ours["f1"],
            "best_hash": best_hash,
            "best_hash_f1": peers[best_hash]["best"]["f1"],
            "met": ours["precision"] >= DUP_BAR["precision"]
            and ours["recall"] >= DUP_BAR["recall"]
            and ours["f1"] > peers[best_hash]["best"]["f1"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=10_000, help="labelled training images")
    parser.add_argument("--share", type=float, default=0.1, help="share of labels flipped")
    parser.add_argument("--seed", type=int, default=0, help="duplicates: the seed of the sample and copies")
    parser.add_argument(
        "--calibrations", type=int, default=3, help="duplicates: dedupe runs, each calibrated on another sample"
    )
    parser.add_argument("--seeds", type=int, default=3, help="label issues: seeds of flips and folds")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--parts", nargs="+", choices=("labels", "duplicates", "relabel"), default=["labels", "duplicates", "relabel"]
    )
    parser.add_argument("--train", type=int, default=20_000, help="duplicates: training images")
    parser.add_argument("--held-out", type=int, default=2_000, help="duplicates: test images, each with a copy")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if "duplicates" in args.parts:
        result["duplicates"] = duplicates(args.train, args.held_out, args.seed, args.calibrations)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "labels" in args.parts:
        label_part(args, result)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "relabel" in args.parts:
        result["relabel"] = relabel_part(args.seeds)
    result["device"] = device()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def relabel_part(seeds: int) -> dict[str, Any]:
    """Active learning with a noisy oracle (10% wrong answers), with and without a share of every batch
    spent re-asking the likeliest label issues: accuracy at 10% and 20% of the pool labelled."""
    from job.simulation import run_relabel_simulation

    settings, storage, encoder, emb = real_embeddings()
    data = split_data(settings, storage, emb, encoder.version)

    def show(name: str, seed: int, frac: float, acc: float) -> None:
        print(f"relabel {name} seed {seed}: {frac:.2f} labelled, accuracy {acc:.4f}", flush=True)

    out = run_relabel_simulation(data, seeds=range(seeds), classifier=settings.classifier_kind, on_round=show)
    out["method"] = (
        f"The labelling loop on all {len(data.y_pool):,} Fashion-MNIST training images ({out['config']['strategy']}, "
        f"{out['config']['classifier']} on PCA-{out['config']['pca_dim']}, 5% seed set, 5% batches), an oracle "
        f"wrong {out['config']['noise']:.0%} of the time (asked again, it answers afresh); each batch spends a share "
        "on re-asking confident learning's likeliest label issues; accuracy on the 10,000 test images, "
        f"mean of {seeds} seeds"
    )
    return out


def label_part(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The label-issue block of the results: every method on the same images, flips drawn with
    ``args.seeds`` seeds; per method the median F1 and its spread."""
    settings, storage, encoder, emb = real_embeddings()
    data = split_data(settings, storage, emb, encoder.version)
    pick = np.sort(np.random.default_rng(0).choice(len(data.y_pool), args.labelled, replace=False))
    runs = [
        label_issues(data.x_pool[pick], data.y_pool[pick], settings, args.share, seed) for seed in range(args.seeds)
    ]
    summary: dict[str, Any] = {}
    for noise in runs[0]:
        summary[noise] = {}
        for method in runs[0][noise]["methods"]:
            f1 = [r[noise]["methods"][method]["f1"] for r in runs]
            summary[noise][method] = {
                key: round(float(np.median([r[noise]["methods"][method][key] for r in runs])), 4)
                for key in ("precision", "recall", "f1", "seconds")
            } | {"f1_min": min(f1), "f1_max": max(f1)}
    default = settings.analysis_label_issues
    default_name = default if default == "knn_vote" else f"{default} ({settings.analysis_label_issue_model})"
    f1 = summary["random"][default_name]["f1"]
    result["label_issues"] = {
        "method": (
            f"{args.labelled:,} Fashion-MNIST training images (seeded sample), {args.share:.0%} of labels flipped; "
            "random: to any other class; confusable: within "
            + ", ".join(f"{a}/{b}" for a, b in CONFUSABLE)
            + f"; {args.seeds} seeds of flips and folds, medians"
        ),
        "images": args.labelled,
        "seeds": args.seeds,
        "features": (
            f"classifiers: power + L2 + PCA {settings.classifier_pca_dim} (the analysis job's); neighbours: "
            f"unit vectors of power + L2 + PCA {settings.index_pca_dim} (the index's space)"
        ),
        "default": default_name,
        "summary": summary,
        "runs": runs,
        "bar": {"f1_random": f1, "target": LABEL_BAR_F1, "met": f1 >= LABEL_BAR_F1},
    }


if __name__ == "__main__":
    raise SystemExit(main())
