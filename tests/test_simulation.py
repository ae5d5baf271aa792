"""The active-learning simulation on real Fashion-MNIST images through the real encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from job.simulation import SimulationData, dataset_features, plot_learning_curves, run_few_labels, run_simulation
from shared.encoder import ImageEncoder
from shared.settings import Settings
from tests.conftest import make_settings

POOL = 1200
TEST = 400
CURVE_KEYS = {"labeled_frac", "accuracy_mean", "accuracy_std", "seeds", "seconds"}
CONFIG_KEYS = {
    "dataset",
    "pool",
    "test",
    "classifier",
    "pca_dim",
    "seed_frac",
    "batch_frac",
    "max_frac",
    "seeds",
    "pool_factor",
    "encoder_version",
}


class NoEncoder:
    """Has the real encoder's version but cannot encode: only a cache hit gets past it."""

    def __init__(self, version: str):
        self.version = version

    def encode(self, images: Any) -> Any:
        raise AssertionError("the encoder ran: the cache was missed")

    encode_array = encode


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    """The real encoder at 64 px (Fashion-MNIST images are 28 px): embeds ~15x faster than at 224 px."""
    return ImageEncoder(make_settings(Path("/nonexistent")).encoder_dir, size=64)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("simulate"))


@pytest.fixture(scope="module")
def data(settings: Settings, encoder: ImageEncoder) -> SimulationData:
    done: list[int] = []
    out = dataset_features(settings, encoder, limit=POOL, test_limit=TEST, progress=done.append)
    assert sum(done) == POOL + TEST
    return out


@pytest.fixture(scope="module")
def result(data: SimulationData) -> dict[str, Any]:
    return run_simulation(
        data,
        seeds=(0,),
        seed_frac=0.05,
        batch_frac=0.1,
        max_frac=0.15,
        small_batch_frac=0.05,
        small_batch_max_frac=0.15,
        classifier="logistic",  # the loop is the same for any classifier; LightGBM's fits are slower
        pca_dim=128,
    )


def test_features_are_real_embeddings(data: SimulationData, encoder: ImageEncoder) -> None:
    assert data.x_pool.shape == (POOL, encoder.dim) and data.x_pool.dtype == np.float32
    assert data.x_test.shape == (TEST, encoder.dim)
    assert data.y_pool.dtype == np.int64 and set(np.unique(data.y_pool)) == set(range(10))
    assert data.encoder_version == encoder.version
    assert np.isfinite(data.x_pool).all() and np.linalg.norm(data.x_pool, axis=1).min() > 0


def test_second_call_hits_the_cache(settings: Settings, data: SimulationData, encoder: ImageEncoder) -> None:
    again = dataset_features(settings, NoEncoder(encoder.version), limit=POOL, test_limit=TEST)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.x_pool, data.x_pool)
    np.testing.assert_array_equal(again.y_test, data.y_test)
    # A different limit is a different cache entry: it must embed, and this encoder cannot.
    with pytest.raises(AssertionError, match="cache was missed"):
        dataset_features(settings, NoEncoder(encoder.version), limit=POOL - 1, test_limit=TEST)  # type: ignore[arg-type]


def test_margin_round_beats_its_seed_model(result: dict[str, Any]) -> None:
    margin = result["margin"]
    assert margin["labeled_frac"] == [0.05, 0.15]
    assert margin["accuracy_mean"][1] > margin["accuracy_mean"][0]
    assert result["full_label_accuracy"] > 0.7  # 1,200 real embeddings, ten classes: chance is 0.1


def test_result_has_the_spec_keys(result: dict[str, Any]) -> None:
    strategies = {"random", "least_confidence", "margin", "entropy"}
    assert set(result) == strategies | {
        "full_label_accuracy",
        "labels_to_reach_99pct_of_full",
        "best_strategy",
        "uncertainty_beats_random_every_round_after_first",
        "small_batch",
        "config",
        "seconds",
    }
    for name in strategies:
        assert set(result[name]) == CURVE_KEYS and result[name]["seeds"] == 1
        assert len(result[name]["accuracy_mean"]) == len(result[name]["labeled_frac"]) == 2
    assert set(result["labels_to_reach_99pct_of_full"]) == strategies
    assert result["best_strategy"] in strategies
    assert set(result["uncertainty_beats_random_every_round_after_first"]) == strategies - {"random"}
    small = result["small_batch"]
    picked = [s for s in small if s in strategies]
    assert len(picked) == 2 and "random" in picked
    assert small["batch_frac"] == 0.05 and set(small["labels_to_reach_99pct_of_full"]) == set(picked)
    for name in picked:
        assert small[name]["labeled_frac"] == [0.05, 0.1, 0.15]
    assert set(result["config"]) == CONFIG_KEYS
    assert result["config"]["pool"] == POOL and result["config"]["test"] == TEST


def test_plot_writes_a_png(result: dict[str, Any], tmp_path: Path) -> None:
    path = plot_learning_curves(result, tmp_path / "plots" / "curves.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_unknown_dataset_is_refused(settings: Settings, encoder: ImageEncoder) -> None:
    with pytest.raises(ValueError, match="fashion-mnist"):
        dataset_features(settings, encoder, dataset="cifar-10")


def test_few_labels_start_small_from_random_or_typical_images(data: SimulationData) -> None:
    part = run_few_labels(
        data, seeds=(0,), seed_frac=0.02, batch_frac=0.02, max_frac=0.06, classifier="logistic", pca_dim=32
    )
    assert set(part["curves"]) == {"random", "typical"}
    for curve in part["curves"].values():
        assert set(curve) == CURVE_KEYS and curve["labeled_frac"][0] == pytest.approx(0.02, abs=0.002)
        assert curve["labeled_frac"][-1] == pytest.approx(0.06, abs=0.002)
        assert curve["accuracy_mean"][-1] > curve["accuracy_mean"][0]  # margin batches pay on real images
    assert 0.5 < part["full_label_accuracy"] < 1 and part["config"]["strategy"] == "margin"
    target = 0.99 * part["full_label_accuracy"]
    for start, at in part["labels_to_reach_99pct_of_full"].items():
        curve = part["curves"][start]
        pairs = zip(curve["labeled_frac"], curve["accuracy_mean"], strict=True)
        reached = [frac for frac, acc in pairs if acc >= target]
        assert at == (reached[0] if reached else None)
