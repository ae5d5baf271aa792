"""Active-learning benchmark: does labelling the images the model is least sure of beat random picks?

Run by ``make bench-al``; writes ``bench/results/active_learning.json`` and
``bench/results/active_learning.png``. The images are the benchmark collection's stored
embeddings (all 70,000 Fashion-MNIST images through the product's pipeline, see
:mod:`bench.collection`): the 60,000 train images are the pool, the 10,000 test images measure
accuracy. :func:`job.simulation.run_simulation` replays the labelling loop with the true labels
as the oracle: LightGBM on PCA-128 features, 3 seeds, a random 5% seed set, then 5% batches up to
20% for random, least confidence, margin and entropy (batches diversified by k-means over 3x their
size); then 1% batches up to 10% for the best uncertainty strategy and random; then one model on all
60,000 labels. (``run_simulation``'s defaults go to 30% and 20%; the bench stops at 20%, where the
best strategy has passed full-label accuracy, to stay near 20 minutes on 2 idle cores.)

This is a benchmark, not a test: about 21 minutes on 2 CPU cores once the collection is embedded
(building the collection first takes another 12-20). On a machine shared with other busy processes
run it with ``LOKY_MAX_CPU_COUNT=1`` (LightGBM's default thread count comes from joblib, not
``OMP_NUM_THREADS``): its OpenMP threads wait on each other at every split, and beside another busy
process a 2-thread fit can run tens of times slower than a 1-thread one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.collection import real_embeddings
from bench.embed import device
from job.active_learning import STRATEGIES
from job.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from job.embeddings import EmbeddingSet
from job.simulation import SimulationData, planned_rounds, plot_learning_curves, run_few_labels, run_simulation
from shared.catalog import Catalog
from shared.settings import Settings
from shared.storage import LocalStorage

ROOT = Path(__file__).resolve().parent.parent
SPLITS = {"train": 60_000, "test": 10_000}


def split_data(settings: Settings, storage: LocalStorage, emb: EmbeddingSet, encoder_version: str) -> SimulationData:
    """The stored embeddings as pool (train split) and test set, each in dataset order.

    Each id's split, index and label come from its catalogue record (``source`` like
    ``fashion-mnist/train/01976``, ``label`` a class name); the labels are checked against the
    dataset's own files.

    Raises:
        ValueError: an embedding without a Fashion-MNIST record, a missing or duplicated image, or a
            label that disagrees with the dataset.
    """
    row_of = {image_id: row for row, image_id in enumerate(emb.ids)}
    rows = {split: np.full(n, -1, dtype=np.int64) for split, n in SPLITS.items()}
    labels = {split: np.full(n, -1, dtype=np.int64) for split, n in SPLITS.items()}
    for record in tqdm(Catalog(storage).records(), total=len(row_of), desc="records", unit="rec"):
        if record.id not in row_of:
            continue
        parts = record.source.split("/")
        if len(parts) != 3 or parts[0] != "fashion-mnist" or parts[1] not in SPLITS:
            raise ValueError(f"image {record.id} is not a Fashion-MNIST image (source {record.source!r})")
        split, index = parts[1], int(parts[2])
        if rows[split][index] != -1:
            raise ValueError(f"{record.source} is in the collection twice")
        rows[split][index] = row_of[record.id]
        labels[split][index] = FASHION_MNIST_CLASSES.index(record.label or "")
    for split in SPLITS:
        missing = int((rows[split] < 0).sum())
        if missing:
            raise ValueError(f"{missing} fashion-mnist/{split} images have no embedding; rebuild the collection")
        _, truth = load_fashion_mnist(settings.fashion_mnist_dir, split)
        if not np.array_equal(truth, labels[split]):
            raise ValueError(f"catalogue labels of fashion-mnist/{split} disagree with the dataset")
    return SimulationData(
        x_pool=emb.vectors[rows["train"]],
        y_pool=labels["train"],
        x_test=emb.vectors[rows["test"]],
        y_test=labels["test"],
        class_names=FASHION_MNIST_CLASSES,
        encoder_version=encoder_version,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seed sets (0, 1, ...)")
    parser.add_argument("--max-frac", type=float, default=0.2, help="labelled share where the main run stops")
    parser.add_argument("--small-batch-frac", type=float, default=0.01, help="0 skips the small-batch variant")
    parser.add_argument("--small-batch-max-frac", type=float, default=0.1)
    parser.add_argument("--classifier", default="lightgbm", choices=["lightgbm", "logistic", "knn"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "active_learning.json")
    parser.add_argument(
        "--few-labels-only",
        action="store_true",
        help="run only the few-labels part (a 2%% start, 0.5%% margin batches to 10%%, random and typical-first "
        "starts) and merge it into --out",
    )
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    settings, storage, encoder, emb = real_embeddings()
    data = split_data(settings, storage, emb, encoder.version)
    print(f"pool {len(data.x_pool):,} and test {len(data.x_test):,} embeddings ({encoder.version})")
    if args.few_labels_only:
        return few_labels_only(data, args)

    seeds = tuple(range(args.seeds))
    n = len(data.x_pool)
    total = len(seeds) * len(STRATEGIES) * planned_rounds(n, 0.05, 0.05, args.max_frac)
    if args.small_batch_frac:
        total += len(seeds) * 2 * planned_rounds(n, 0.05, args.small_batch_frac, args.small_batch_max_frac)
    bar = tqdm(total=total, desc="rounds", unit="round")

    def on_round(strategy: str, seed: int, frac: float, acc: float) -> None:
        bar.set_postfix_str(f"{strategy} seed {seed}: {100 * frac:.0f}% labelled, accuracy {acc:.4f}")
        bar.update(1)

    try:
        result = run_simulation(
            data,
            seeds=seeds,
            max_frac=args.max_frac,
            small_batch_frac=args.small_batch_frac or None,
            small_batch_max_frac=args.small_batch_max_frac,
            classifier=args.classifier,
            on_round=on_round,
        )
    finally:
        bar.close()

    import joblib
    import lightgbm
    import sklearn

    out: dict[str, Any] = dict(result)
    out["device"] = device()
    out["versions"] = {"lightgbm": lightgbm.__version__, "scikit-learn": sklearn.__version__}
    out["lightgbm_threads"] = joblib.cpu_count(only_physical_cores=True)  # what LightGBM's n_jobs=None takes
    out["bench_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    png = plot_learning_curves(result, args.out.with_suffix(".png"))

    print(f"\nfull-label accuracy ({n:,} labels): {result['full_label_accuracy']:.4f}")
    for name in STRATEGIES:
        curve = result[name]
        pairs = ", ".join(
            f"{100 * f:.0f}%: {a:.4f}" for f, a in zip(curve["labeled_frac"], curve["accuracy_mean"], strict=True)
        )
        print(f"{name:>17}: {pairs}")
    print("labels to reach 99% of full:", json.dumps(result["labels_to_reach_99pct_of_full"]))
    print(
        "beats random every round after the first:",
        json.dumps(result["uncertainty_beats_random_every_round_after_first"]),
    )
    small = result["small_batch"]
    if small:
        for name, curve in small.items():
            if isinstance(curve, dict) and "accuracy_mean" in curve:
                pairs = ", ".join(
                    f"{100 * f:.0f}%: {a:.4f}"
                    for f, a in zip(curve["labeled_frac"], curve["accuracy_mean"], strict=True)
                )
                print(f"{name:>17} ({100 * small['batch_frac']:g}% batches): {pairs}")
        print("small batches, labels to reach 99% of full:", json.dumps(small["labels_to_reach_99pct_of_full"]))
    print(f"best strategy: {result['best_strategy']}; {result['seconds']:.0f} s; wrote {args.out} and {png}")
    return 0


def few_labels(data: SimulationData, seeds: tuple[int, ...]) -> dict[str, Any]:
    """:func:`job.simulation.run_few_labels` with a progress bar; its full-label accuracy is fitted in the
    same run, on the same features (a stored one could come from other embeddings or another machine)."""
    bar = tqdm(total=len(seeds) * 2 * planned_rounds(len(data.x_pool), 0.02, 0.005, 0.1), desc="few labels")

    def on_round(name: str, seed: int, frac: float, acc: float) -> None:
        bar.set_postfix_str(f"{name} seed {seed}: {100 * frac:.0f}% labelled, accuracy {acc:.4f}")
        bar.update(1)

    try:
        return run_few_labels(data, seeds=seeds, on_round=on_round)
    finally:
        bar.close()


def few_labels_only(data: SimulationData, args: argparse.Namespace) -> int:
    """The few-labels part alone, merged into the file the full run wrote."""
    out: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    part = few_labels(data, tuple(range(args.seeds)))
    out["few_labels"] = part
    out.setdefault("device", device())
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for start, curve in part["curves"].items():
        pairs = ", ".join(
            f"{100 * f:.0f}%: {a:.4f}" for f, a in zip(curve["labeled_frac"], curve["accuracy_mean"], strict=True)
        )
        print(f"{start:>8} start: {pairs}")
    print("labels to reach 99% of full:", json.dumps(part["labels_to_reach_99pct_of_full"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
