"""Per-class posting lists: the Threshold Algorithm's top-k equals the exhaustive scan's, reading few rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.class_lists import ClassLists, SegmentLists, class_score, write_class_lists


def softmax_top(logits: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top ``t`` classes (int16) and their softmax probabilities (float32), as the encoder writes."""
    top = np.argsort(-logits, axis=1)[:, :t]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return top.astype(np.int16), np.take_along_axis(p, top, 1).astype(np.float32)


def photo_like(n: int, n_classes: int = 1000, t: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose main class follows a skewed popularity and is predicted with 2..8 logits to spare."""
    rng = np.random.default_rng(seed)
    popularity = np.bincount(rng.zipf(1.3, size=n_classes * 10) % n_classes, minlength=n_classes) + 1
    main = rng.choice(n_classes, size=n, p=popularity / popularity.sum())
    parts = []
    for start in range(0, n, 10_000):  # 10,000 rows of logits at a time: 40 MB, not 400
        m = min(10_000, n - start)
        logits = rng.normal(size=(m, n_classes)).astype(np.float32)
        logits[np.arange(m), main[start : start + m]] += rng.uniform(2, 8, m).astype(np.float32)
        parts.append(softmax_top(logits, t))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def query_weights(rng: np.random.Generator, n_classes: int, peaked: bool) -> np.ndarray:
    """Class weights as text search makes them: a softmax at temperature 0.05 over cosine similarities,
    with a few classes matching the query well when ``peaked``."""
    sims = rng.normal(0.15, 0.07, n_classes)
    if peaked:
        hot = rng.choice(n_classes, 3, replace=False)
        sims[hot] = rng.uniform(0.45, 0.7, 3)
    w = np.exp((sims - sims.max()) / 0.05)
    return (w / w.sum()).astype(np.float32)


def exhaustive(top: np.ndarray, prob: np.ndarray, w: np.ndarray, k: int, exclude: np.ndarray | None = None):  # type: ignore[no-untyped-def]
    scores = class_score(top, prob, w)
    if exclude is not None:
        scores[exclude] = -1.0
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    order = order[scores[order] > 0]
    return order, scores[order]


def check_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    """The same rows in the same order (ties to the lower row) with the same scores."""
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def scorer(top: np.ndarray, prob: np.ndarray, w: np.ndarray):  # type: ignore[no-untyped-def]
    return lambda rows: class_score(top[rows], prob[rows], w)


@pytest.mark.parametrize("seed", range(3))
def test_top_rows_equal_the_exhaustive_scan_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c, t = 3_000, 50, 3
    top, prob = softmax_top(rng.normal(size=(n, c)).astype(np.float32) * 2, t)
    lists = ClassLists.build(top, prob, c)
    for _ in range(40):
        w = rng.dirichlet(np.full(c, rng.choice([0.05, 1.0, 20.0]))).astype(np.float32)  # peaked to flat
        k = int(rng.integers(1, 60))
        exclude = np.sort(rng.choice(n, int(rng.integers(0, 200)), replace=False)).astype(np.int64)
        got = lists.top_rows(w, k, scorer(top, prob, w), exclude)
        check_same(got, exhaustive(top, prob, w, k, exclude))
        assert not np.isin(got[0], exclude).any()


def test_top_rows_on_photo_like_data_read_a_small_share_of_the_rows() -> None:
    """100,000 images with skewed, confident predictions and 1,000 classes: peaked text queries read under
    10% of the rows and still get exactly the scan's top 20; flat weights are exact too."""
    n = 100_000
    top, prob = photo_like(n)
    lists = ClassLists.build(top, prob, 1000)
    rng = np.random.default_rng(7)
    touched = []
    for i in range(30):
        w = query_weights(rng, 1000, peaked=i % 5 != 0)
        rows, scores, read = lists.top_rows_counted(w, 20, scorer(top, prob, w))
        check_same((rows, scores), exhaustive(top, prob, w, 20))
        if i % 5:
            touched.append(read)
    assert max(touched) < 0.1 * n, touched
    assert np.median(touched) < 0.01 * n, touched


def test_lists_hold_each_row_once_per_class_most_probable_first(tmp_path: Path) -> None:
    top = np.array([[2, 0], [0, 1], [2, 2], [1, 0]], np.int16)  # row 2 lists class 2 twice (padding)
    prob = np.array([[0.5, 0.25], [0.75, 0.0], [0.25, 0.25], [0.5, 0.5]], np.float32)
    lists = ClassLists.build(top, prob, 4)
    assert lists.offsets.tolist() == [0, 3, 4, 6, 6]
    assert lists.rows.tolist() == [1, 3, 0, 3, 0, 2] and lists.probs.tolist() == [0.75, 0.5, 0.25, 0.5, 0.5, 0.5]
    assert lists.mass == pytest.approx(1.0)
    write_class_lists(tmp_path, top, prob, n_classes=4)
    loaded = ClassLists.load(tmp_path)
    assert isinstance(loaded.rows, np.memmap) and loaded.rows.tolist() == lists.rows.tolist()
    assert loaded.mass == lists.mass
    w = np.array([0.1, 0.2, 0.6, 0.1], np.float32)
    check_same(loaded.top_rows(w, 4, scorer(top, prob, w)), exhaustive(top, prob, w, 4))


def test_without_the_mass_file_the_bound_is_uncapped_and_still_exact(tmp_path: Path) -> None:
    top, prob = photo_like(5_000, n_classes=100, seed=3)
    write_class_lists(tmp_path, top, prob, n_classes=100)
    (tmp_path / "class_mass.npy").unlink()
    lists = ClassLists.load(tmp_path)
    assert lists.mass == np.inf
    w = query_weights(np.random.default_rng(1), 100, peaked=True)
    check_same(lists.top_rows(w, 10, scorer(top, prob, w)), exhaustive(top, prob, w, 10))


def test_bad_input_is_refused(tmp_path: Path) -> None:
    top, prob = photo_like(100, n_classes=10)
    lists = ClassLists.build(top, prob, 10)
    with pytest.raises(ValueError, match="class_weights"):
        lists.top_rows(np.ones(9, np.float32), 3, scorer(top, prob, np.ones(10)))
    with pytest.raises(ValueError, match="non-negative"):
        lists.top_rows(-np.ones(10, np.float32), 3, scorer(top, prob, np.ones(10)))
    with pytest.raises(ValueError, match="classes must be in"):
        ClassLists.build(top, prob, 5)
    with pytest.raises(ValueError, match="same shape|alike"):
        ClassLists.build(top, prob[:, :2], 10)
    write_class_lists(tmp_path, np.zeros((5, 0), np.int16), np.zeros((5, 0), np.float32))
    assert not list(tmp_path.iterdir())  # no class predictions: nothing to list


def test_segment_lists_give_the_top_rows_of_all_segments() -> None:
    """An index of three segments keeps each one's lists (rows from its own start): the best k overall equal
    the scan's, hidden rows of any segment left out."""
    rng = np.random.default_rng(4)
    top, prob = photo_like(6_000, n_classes=200, seed=4)
    bounds = [0, 1_000, 4_500, 6_000]
    parts = [(a, ClassLists.build(top[a:b], prob[a:b], 200)) for a, b in zip(bounds, bounds[1:], strict=False)]
    lists = SegmentLists(parts, 6_000)
    for _ in range(20):
        w = query_weights(rng, 200, peaked=bool(rng.integers(0, 2)))
        exclude = np.sort(rng.choice(6_000, 300, replace=False)).astype(np.int64)
        check_same(lists.top_rows(w, 15, scorer(top, prob, w), exclude), exhaustive(top, prob, w, 15, exclude))
    with pytest.raises(ValueError, match="same classes"):
        SegmentLists([(0, parts[0][1]), (1_000, ClassLists.build(top[:10], prob[:10], 300))], 1_010)
