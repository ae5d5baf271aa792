"""The active-learning simulation on a real labelled dataset: does choosing what to label pay?

:func:`dataset_features` embeds a labelled dataset (Fashion-MNIST: the train split is the pool that
is "labelled" round by round, the test split measures accuracy) with the product's encoder and
caches the arrays; :func:`run_simulation` replays the labelling loop of
:func:`job.active_learning.simulate` for every strategy, a smaller-batch variant for the best
uncertainty strategy and random, and the accuracy of a model trained on every pool label, and
returns one JSON-able summary; :func:`plot_learning_curves` draws it.

Imports numpy and pillow at the top; scikit-learn, LightGBM (through :mod:`job.active_learning`)
and matplotlib load inside the functions that use them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from job.active_learning import (
    COLD_STARTS,
    STRATEGIES,
    UNCERTAINTY_STRATEGIES,
    labels_to_reach,
    simulate,
)
from job.classifier import FeatureSpace, fit_classifier, full_proba
from job.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from shared.encoder import ImageEncoder
from shared.settings import Settings

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist",)
CACHE_FOLDER = Path("cache") / "simulate"  # under settings.data_dir
TARGET_SHARE = 0.99  # "reaches full-label accuracy": within 1% of it


@dataclass
class SimulationData:
    """A labelled pool and test set as raw embeddings.

    Attributes:
        x_pool: float32 (n, d) embeddings of the pool (the images the loop may label).
        y_pool: int64 (n,) their classes.
        x_test: float32 (m, d) embeddings of the held-out test images.
        y_test: int64 (m,) their classes.
        class_names: name of each class index.
        encoder_version: the embedding space (``ImageEncoder.version``).
        dataset: the dataset's name.
    """

    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    encoder_version: str
    dataset: str = "fashion-mnist"

    def __post_init__(self) -> None:
        self.x_pool = np.asarray(self.x_pool, dtype=np.float32)
        self.x_test = np.asarray(self.x_test, dtype=np.float32)
        self.y_pool = np.asarray(self.y_pool, dtype=np.int64)
        self.y_test = np.asarray(self.y_test, dtype=np.int64)
        if self.x_pool.ndim != 2 or self.x_test.ndim != 2 or self.x_pool.shape[1] != self.x_test.shape[1]:
            raise ValueError(
                f"pool and test must be (n, d) with the same d, got {self.x_pool.shape}, {self.x_test.shape}"
            )
        if self.y_pool.shape != (len(self.x_pool),) or self.y_test.shape != (len(self.x_test),):
            raise ValueError("labels must be (n,) with one per embedding")
        if len(self.x_pool) < 2 or len(self.x_test) < 1:
            raise ValueError("need at least 2 pool and 1 test images")
        top = int(max(self.y_pool.max(), self.y_test.max()))
        if min(self.y_pool.min(), self.y_test.min()) < 0 or top >= len(self.class_names):
            raise ValueError(f"labels must be class indices in [0, {len(self.class_names)})")


# -- features -------------------------------------------------------------------------------------


def _cache_path(settings: Settings, dataset: str, split: str, limit: int | None, version: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", version)
    name = f"{dataset}_{split}_{'all' if limit is None else limit}_{slug}.npz"
    return Path(settings.data_dir) / CACHE_FOLDER / name


def _embed_split(
    settings: Settings,
    encoder: ImageEncoder,
    dataset: str,
    split: str,
    limit: int | None,
    progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 embeddings and (n,) int64 labels of one split, from the cache when there."""
    path = _cache_path(settings, dataset, split, limit, encoder.version)
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            x, y = cached["x"], cached["y"]
        log.info("%s %s: %d embeddings from the cache %s", dataset, split, len(x), path)
        if progress:
            progress(len(x))
        return x, y
    images, labels = load_fashion_mnist(settings.fashion_mnist_dir, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    t0 = time.perf_counter()
    parts = []
    step = settings.embed_batch_size
    for start in range(0, len(images), step):
        batch = [Image.fromarray(a).convert("RGB") for a in images[start : start + step]]
        parts.append(encoder.encode(batch).vectors)
        if progress:
            progress(len(batch))
    x = np.concatenate(parts).astype(np.float32, copy=False)
    y = np.asarray(labels, dtype=np.int64)
    log.info("%s %s: embedded %d images in %.1f s", dataset, split, len(x), time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, x=x, y=y)
    os.replace(tmp, path)  # readers never see a half-written cache file
    return x, y


def dataset_features(
    settings: Settings,
    encoder: ImageEncoder,
    dataset: str = "fashion-mnist",
    limit: int | None = None,
    test_limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimulationData:
    """Embed a labelled dataset's train split (the pool) and test split, cached on disk.

    Images are embedded in memory (nothing is ingested) in batches of ``settings.embed_batch_size``;
    Fashion-MNIST's 28x28 greys become RGB as ingest would make them, and the encoder resizes. The
    arrays are cached as ``.npz`` under ``settings.data_dir/cache/simulate`` keyed by dataset,
    split, limit and encoder version, so a second call does not run the encoder.

    Args:
        settings: for the data dir, the dataset folder and the batch size.
        encoder: the image encoder (its ``version`` keys the cache).
        dataset: one of :data:`DATASETS`.
        limit: the first ``limit`` train images only (None: all 60,000).
        test_limit: the first ``test_limit`` test images only (None: all 10,000).
        progress: called with the number of images just done, after each batch (or once per split
            read from the cache).

    Returns:
        The pool and test embeddings, float32 (n, d), with int64 labels.

    Raises:
        ValueError: unknown dataset, or a limit below 1.
        DatasetMissing: the dataset's files are not installed.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choices: {', '.join(DATASETS)}")
    for name, value in (("limit", limit), ("test_limit", test_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or None for all), got {value}")
    x_pool, y_pool = _embed_split(settings, encoder, dataset, "train", limit, progress)
    x_test, y_test = _embed_split(settings, encoder, dataset, "test", test_limit, progress)
    return SimulationData(
        x_pool=x_pool,
        y_pool=y_pool,
        x_test=x_test,
        y_test=y_test,
        class_names=FASHION_MNIST_CLASSES,
        encoder_version=encoder.version,
        dataset=dataset,
    )


# -- the simulation -------------------------------------------------------------------------------


def planned_rounds(n_pool: int, seed_frac: float, batch_frac: float, max_frac: float) -> int:
    """How many rounds (trained models) one strategy and seed of :func:`simulate` runs."""
    seed_n = max(2, int(round(seed_frac * n_pool)))
    batch_n = max(1, int(round(batch_frac * n_pool)))
    max_n = min(int(round(max_frac * n_pool)), n_pool)
    return 1 + max(0, -(-(max_n - seed_n) // batch_n))


def _score(summary: dict[str, Any]) -> float:
    """A curve's quality: mean accuracy over its rounds (area under the curve, per round)."""
    return float(np.mean(summary["accuracy_mean"]))


def run_simulation(
    data: SimulationData,
    *,
    strategies: Sequence[str] = STRATEGIES,
    seeds: Sequence[int] = (0, 1, 2),
    seed_frac: float = 0.05,
    batch_frac: float = 0.05,
    max_frac: float = 0.3,
    small_batch_frac: float | None = 0.01,
    small_batch_max_frac: float = 0.2,
    classifier: str = "lightgbm",
    pca_dim: int = 128,
    pool_factor: float = 3.0,
    on_round: Callable[[str, int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Replay labelling on ``data`` for each strategy and summarise it as JSON-able values.

    Features: :class:`FeatureSpace` (power, L2, PCA ``pca_dim``) fitted on the pool embeddings.
    Then :func:`simulate` for ``strategies`` (``seed_frac`` random seed labels, ``batch_frac`` of the
    pool per round up to ``max_frac``); then, unless ``small_batch_frac`` is None or 0, the same with
    ``small_batch_frac`` per round up to ``small_batch_max_frac`` for the uncertainty strategy with
    the best mean accuracy over the rounds, and random; then one model on every pool label.

    Args:
        data: the pool and test embeddings.
        strategies: from :data:`job.active_learning.STRATEGIES`.
        seeds: one random seed set per seed, shared by the strategies.
        on_round: called with (strategy, seed, labelled fraction, accuracy) after each round; the
            small-batch variant's rounds come as ``"small_batch/<strategy>"``.

    Returns:
        ``{<strategy>: curve, "full_label_accuracy", "labels_to_reach_99pct_of_full": {strategy:
        fraction or None}, "best_strategy", "uncertainty_beats_random_every_round_after_first":
        {strategy: bool}, "small_batch": {"batch_frac", <strategy>: curve,
        "labels_to_reach_99pct_of_full"} or None, "config", "seconds"}``, where a curve is
        ``{"labeled_frac", "accuracy_mean", "accuracy_std", "seeds", "seconds"}`` (lists per round).

    Raises:
        ValueError: no or unknown strategies, no seeds, or bad fractions.
    """
    if not strategies or any(s not in STRATEGIES for s in strategies):
        raise ValueError(f"strategies must be a non-empty subset of {', '.join(STRATEGIES)}")
    if not seeds:
        raise ValueError("need at least one seed")
    if small_batch_frac and not (0 < small_batch_frac <= 1 and seed_frac <= small_batch_max_frac <= 1):
        raise ValueError("need 0 < small_batch_frac <= 1 and seed_frac <= small_batch_max_frac <= 1")
    t0 = time.perf_counter()
    space = FeatureSpace(dim=pca_dim).fit(data.x_pool)
    x_pool, x_test = space.transform(data.x_pool), space.transform(data.x_test)
    log.info("features: %d pool, %d test, %d-d", len(x_pool), len(x_test), x_pool.shape[1])
    # The same pool, test set, seeds and classifier for the main run and the small-batch variant.
    replay = functools.partial(
        simulate,
        x_pool,
        data.y_pool,
        x_test,
        data.y_test,
        seeds=tuple(seeds),
        seed_frac=seed_frac,
        classifier=classifier,
        pool_factor=pool_factor,
    )

    curves = replay(strategies=tuple(strategies), batch_frac=batch_frac, max_frac=max_frac, on_round=on_round)
    main = {name: curve.summary() for name, curve in curves.items()}
    for name, summary in main.items():
        log.info("%s: %s", name, summary["accuracy_mean"])

    t_full = time.perf_counter()
    n_classes = len(data.class_names)
    full_acc = full_label_accuracy_of(classifier, x_pool, data.y_pool, x_test, data.y_test, n_classes, int(seeds[0]))
    log.info("full-label accuracy %.4f (%d labels, %.1f s)", full_acc, len(x_pool), time.perf_counter() - t_full)
    target = TARGET_SHARE * full_acc

    uncertain = [s for s in strategies if s in UNCERTAINTY_STRATEGIES]
    beats: dict[str, bool] = {}
    if "random" in main:
        base = main["random"]["accuracy_mean"]
        for name in uncertain:
            accs = main[name]["accuracy_mean"]
            beats[name] = len(accs) == len(base) and all(a > b for a, b in zip(accs[1:], base[1:], strict=True))

    small: dict[str, Any] | None = None
    if small_batch_frac:
        chosen = [max(uncertain, key=lambda s: _score(main[s]))] if uncertain else []
        chosen.append("random")

        def small_round(strategy: str, seed: int, frac: float, acc: float) -> None:
            if on_round:
                on_round(f"small_batch/{strategy}", seed, frac, acc)

        small_curves = replay(
            strategies=tuple(chosen), batch_frac=small_batch_frac, max_frac=small_batch_max_frac, on_round=small_round
        )
        small = {"batch_frac": small_batch_frac}
        small.update({name: curve.summary() for name, curve in small_curves.items()})
        small["labels_to_reach_99pct_of_full"] = {name: labels_to_reach(small[name], target) for name in chosen}

    result: dict[str, Any] = dict(main)
    result["full_label_accuracy"] = round(full_acc, 4)
    result["labels_to_reach_99pct_of_full"] = {name: labels_to_reach(main[name], target) for name in main}
    result["best_strategy"] = max(main, key=lambda s: _score(main[s]))
    result["uncertainty_beats_random_every_round_after_first"] = beats
    result["small_batch"] = small
    result["config"] = {
        "dataset": data.dataset,
        "pool": len(x_pool),
        "test": len(x_test),
        "classifier": classifier,
        "pca_dim": pca_dim,
        "seed_frac": seed_frac,
        "batch_frac": batch_frac,
        "max_frac": max_frac,
        "seeds": [int(s) for s in seeds],
        "pool_factor": pool_factor,
        "encoder_version": data.encoder_version,
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def full_label_accuracy_of(
    classifier: str,
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    seed: int,
) -> float:
    """Test accuracy of ``classifier`` fitted on every pool label: what the loop's curves are measured against."""
    model = fit_classifier(classifier, x_pool, y_pool, seed=seed)
    return float((full_proba(model, x_test, n_classes).argmax(axis=1) == y_test).mean())


def run_few_labels(
    data: SimulationData,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    strategy: str = "margin",
    seed_frac: float = 0.02,
    batch_frac: float = 0.005,
    max_frac: float = 0.1,
    cold_starts: Sequence[str] = COLD_STARTS,
    classifier: str = "lightgbm",
    pca_dim: int = 128,
    full_label_accuracy: float | None = None,
    on_round: Callable[[str, int, float, float], None] | None = None,
) -> dict[str, Any]:
    """The labelling loop started small: ``seed_frac`` of the pool as the first labels (each of
    ``cold_starts``: at random, or the most typical image of as many clusters), then ``strategy``
    batches of ``batch_frac`` up to ``max_frac``, for each seed; with the share of labels at which each
    start reaches 99% of ``full_label_accuracy`` (fitted on every pool label here when None).

    Returns:
        ``{"curves": {cold_start: curve}, "labels_to_reach_99pct_of_full": {cold_start: fraction or
        None}, "full_label_accuracy", "config", "seconds"}``.
    """
    t0 = time.perf_counter()
    space = FeatureSpace(dim=pca_dim).fit(data.x_pool)
    x_pool, x_test = space.transform(data.x_pool), space.transform(data.x_test)
    if full_label_accuracy is None:
        full_label_accuracy = full_label_accuracy_of(
            classifier, x_pool, data.y_pool, x_test, data.y_test, len(data.class_names), int(seeds[0])
        )
    curves = {}
    for start in cold_starts:

        def tagged(name: str, seed: int, frac: float, acc: float, start: str = start) -> None:
            if on_round:
                on_round(f"{start}/{name}", seed, frac, acc)

        run = simulate(
            x_pool,
            data.y_pool,
            x_test,
            data.y_test,
            strategies=(strategy,),
            seeds=tuple(seeds),
            seed_frac=seed_frac,
            batch_frac=batch_frac,
            max_frac=max_frac,
            classifier=classifier,
            cold_start=start,
            on_round=tagged,
        )
        curves[start] = run[strategy].summary()
    target = TARGET_SHARE * full_label_accuracy
    return {
        "curves": curves,
        "labels_to_reach_99pct_of_full": {k: labels_to_reach(c, target) for k, c in curves.items()},
        "full_label_accuracy": round(full_label_accuracy, 4),
        "config": {
            "strategy": strategy,
            "seed_frac": seed_frac,
            "batch_frac": batch_frac,
            "max_frac": max_frac,
            "seeds": [int(s) for s in seeds],
            "classifier": classifier,
            "pca_dim": pca_dim,
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -- the picture ----------------------------------------------------------------------------------


def run_relabel_simulation(
    data: SimulationData,
    *,
    shares: Sequence[float] = (0.0, 0.2),
    noise: float = 0.1,
    strategy: str = "margin",
    seeds: Sequence[int] = (0, 1, 2),
    max_frac: float = 0.2,
    classifier: str = "lightgbm",
    pca_dim: int = 128,
    on_round: Callable[[str, int, float, float], None] | None = None,
) -> dict[str, Any]:
    """The labelling loop with an oracle wrong ``noise`` of the time, for each relabel share
    (:func:`job.active_learning.simulate_relabel`), on the features :func:`run_simulation` uses.

    Returns:
        ``{"share <s>": curve, "accuracy_at": {"0.1": {"share <s>": mean accuracy}, "0.2": ...},
        "config", "seconds"}``.
    """
    from job.active_learning import simulate_relabel

    t0 = time.perf_counter()
    space = FeatureSpace(dim=pca_dim).fit(data.x_pool)
    x_pool, x_test = space.transform(data.x_pool), space.transform(data.x_test)
    curves = simulate_relabel(
        x_pool,
        data.y_pool,
        x_test,
        data.y_test,
        shares=shares,
        noise=noise,
        strategy=strategy,
        seeds=tuple(seeds),
        max_frac=max_frac,
        classifier=classifier,
        on_round=on_round,
    )
    out: dict[str, Any] = {name: c.summary() for name, c in curves.items()}
    at: dict[str, dict[str, float]] = {}
    for name, c in out.items():
        for frac, acc in zip(c["labeled_frac"], c["accuracy_mean"], strict=True):
            if any(abs(frac - f) < 1e-6 for f in (0.1, 0.2)):
                at.setdefault(f"{frac:g}", {})[name] = acc
    out["accuracy_at"] = at
    out["config"] = {
        "pool": len(data.y_pool),
        "test": len(data.y_test),
        "noise": noise,
        "shares": list(shares),
        "strategy": strategy,
        "classifier": classifier,
        "pca_dim": pca_dim,
        "seeds": list(seeds),
        "batch_frac": 0.05,
        "seed_frac": 0.05,
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _strategy_curves(block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (name, curve) entries of a result (or its small-batch block), strategies in canonical order."""
    names = [s for s in STRATEGIES if s in block] + [s for s in block if s not in STRATEGIES]
    return [(s, block[s]) for s in names if isinstance(block[s], dict) and "accuracy_mean" in block[s]]


def plot_learning_curves(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against labelled share for each strategy, as one PNG.

    Mean accuracy with a +-std band per strategy; the small-batch variant dashed and lighter on the
    same axes; full-label accuracy dashed, 99% of it dotted.

    Args:
        result: what :func:`run_simulation` returns.
        path: the PNG to write (its folder is created).

    Returns:
        ``path``.

    Raises:
        ValueError: ``result`` has no strategy curves or no full-label accuracy.
    """
    curves = _strategy_curves(result)
    if not curves or "full_label_accuracy" not in result:
        raise ValueError("result has no strategy curves or full-label accuracy (is it from run_simulation?)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours: dict[str, Any] = dict(zip(STRATEGIES, ("tab:grey", "tab:blue", "tab:red", "tab:green"), strict=True))
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    try:
        for name, curve in curves:
            x = 100 * np.asarray(curve["labeled_frac"])
            mean, std = np.asarray(curve["accuracy_mean"]), np.asarray(curve["accuracy_std"])
            colour = colours.get(name)
            (line,) = ax.plot(x, mean, marker="o", markersize=4, color=colour, label=name.replace("_", " "))
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
            colours[name] = line.get_color()
        small = result.get("small_batch") or {}
        for name, curve in _strategy_curves(small):
            x = 100 * np.asarray(curve["labeled_frac"])
            mean, std = np.asarray(curve["accuracy_mean"]), np.asarray(curve["accuracy_std"])
            label = f"{name.replace('_', ' ')}, {100 * small['batch_frac']:g}% batches"
            ax.plot(x, mean, linestyle="--", linewidth=1.2, alpha=0.6, color=colours.get(name), label=label)
            ax.fill_between(x, mean - std, mean + std, color=colours.get(name), alpha=0.07, linewidth=0)
        full = float(result["full_label_accuracy"])
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label=f"all labels ({full:.3f})")
        ax.axhline(TARGET_SHARE * full, color="black", linestyle=":", linewidth=1, label="99% of all labels")
        config = result.get("config", {})
        ax.set_title(
            f"Active learning on {config.get('dataset', '?')}: {config.get('classifier', '?')}, "
            f"pool {config.get('pool', 0):,} images, test {config.get('test', 0):,}"
        )
        ax.set_xlabel("labelled share of the pool (%)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
