"""Per-class posting lists, so a text query reads the rows its heaviest classes point at, not all n.

Text search scores an image by ``sum_j prob[row, j] * w[top[row, j]]`` (its top ImageNet classes,
weighted by how well each class matches the query). Written once at publish time, the lists invert
``class_top``/``class_prob``: for each class, the rows that have it among their top classes, most
probable first. :meth:`ClassLists.top_rows` finds the exact top-k rows for a weight vector with
Fagin's Threshold Algorithm: it reads down the lists of the classes that can still matter most
(sorted access), scores each row it meets exactly (random access to its own classes), and stops
once the k-th best score is at least the best an unseen row could still reach,
``sum_c w[c] * (next probability in list c)``. Classes never read are bounded by their list's
first probability, so a class with a light weight is read only if its bound could still matter.

Files (in an index version's folder)::

    class_offsets.npy  int64 (C + 1,): class c's entries are [offsets[c], offsets[c + 1])
    class_rows.npy     int32: the rows, grouped by class, each group by probability descending
    class_probs.npy    float32: each entry's probability (float32 as in class_prob.npy: the bound
                       must never be below a row's own value)
    class_mass.npy     float64 (1,): the largest probability mass of one row (at most 1 for softmax
                       probabilities); it caps the bound, and without the file no cap is assumed

The cap matters: the plain bound lets an unseen row hold every list's next probability at once,
so a query whose classes have few confident images would read most of the light classes' lists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

OFFSETS_FILE, ROWS_FILE, PROBS_FILE = "class_offsets.npy", "class_rows.npy", "class_probs.npy"
MASS_FILE = "class_mass.npy"
LIST_FILES = (OFFSETS_FILE, ROWS_FILE, PROBS_FILE, MASS_FILE)
IMAGENET_CLASSES = 1000  # the encoder's classifier head: what class_top indexes
FIRST_STEP = 64  # entries read from a list the first time it is read; doubled each time after
# An unseen row's float32 score may round above the float64 bound by a few units in the last place
SLACK = 1e-5
READ_SHARE = 0.5  # each round reads every list whose bound is at least this share of the largest


def class_score(class_top: np.ndarray, class_prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float32 (m,) ``sum_j class_prob[:, j] * weights[class_top[:, j]]`` of (m, t) rows (0 for t = 0)."""
    if class_top.shape[1] == 0:
        return np.zeros(len(class_top), np.float32)
    return (class_prob * weights[class_top]).sum(axis=1).astype(np.float32)


class TopRows(ABC):
    """What text search asks of class lists, one index's or its segments'."""

    @property
    @abstractmethod
    def n_classes(self) -> int: ...

    @abstractmethod
    def top_rows_counted(
        self,
        class_weights: np.ndarray,
        k: int,
        score_rows: Callable[[np.ndarray], np.ndarray],
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int]: ...

    def top_rows(
        self,
        class_weights: np.ndarray,
        k: int,
        score_rows: Callable[[np.ndarray], np.ndarray],
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-``k`` rows and their scores (see :meth:`ClassLists.top_rows_counted`)."""
        rows, scores, _ = self.top_rows_counted(class_weights, k, score_rows, exclude)
        return rows, scores


class ClassLists(TopRows):
    """Rows by class, each class's rows most probable first (see the module docstring).

    Attributes:
        offsets: int64 (C + 1,); rows: int32 (e,); probs: float32 (e,). Possibly memory-mapped.
        mass: no row's probabilities sum to more (infinite: unknown).
    """

    def __init__(self, offsets: np.ndarray, rows: np.ndarray, probs: np.ndarray, mass: float = np.inf):
        if offsets.ndim != 1 or len(offsets) < 1 or rows.shape != probs.shape or int(offsets[-1]) != len(rows):
            raise ValueError("offsets must be (C + 1,) ending at len(rows), and rows and probs aligned")
        self.offsets = offsets
        self.rows = rows
        self.probs = probs
        self.mass = float(mass)
        self._starts = np.asarray(offsets[:-1], np.int64)
        self._lengths = np.diff(np.asarray(offsets, np.int64))

    @property
    def n_classes(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def build(cls, class_top: np.ndarray, class_prob: np.ndarray, n_classes: int) -> ClassLists:
        """Invert (n, t) top classes and probabilities into per-class lists.

        Entries with probability 0 are left out (they add nothing to any score); a class listed twice
        for a row (never from a top-t, but possible in padding) becomes one entry with the summed
        probability, so a row's entry in a list is its whole share of that class.

        Raises:
            ValueError: if the shapes differ or a class is outside 0..n_classes-1.
        """
        if class_top.shape != class_prob.shape or class_top.ndim != 2:
            raise ValueError(f"class_top and class_prob must be (n, t) alike: {class_top.shape}, {class_prob.shape}")
        n, t = class_top.shape
        top = np.asarray(class_top, np.int64).ravel()
        prob = np.asarray(class_prob, np.float32).ravel()
        if len(top) and (top.min() < 0 or top.max() >= n_classes):
            raise ValueError(f"classes must be in 0..{n_classes - 1}")
        # rounded up a little: the float32 sums the scores use may round above the float64 one
        mass = float(np.asarray(class_prob, np.float64).clip(0).sum(axis=1).max(initial=0.0)) * (1 + 1e-6)
        row = np.repeat(np.arange(n, dtype=np.int64), t)
        keep = prob > 0
        top, prob, row = top[keep], prob[keep], row[keep]  # row-major: rows ascending within a class
        if _repeats(class_top, class_prob):
            key = top * max(n, 1) + row
            order = np.argsort(key, kind="stable")
            key, prob = key[order], prob[order]
            first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            prob = np.add.reduceat(prob, first).astype(np.float32)
            top, row = key[first] // max(n, 1), key[first] % max(n, 1)  # by class, then row
        # One stable sort on (class, probability descending): a positive float32's bits sort as its value.
        descending = np.int64(0xFFFFFFFF) - prob.view(np.uint32).astype(np.int64)
        order = np.argsort((top << 32) | descending, kind="stable")
        offsets = np.searchsorted(top[order], np.arange(n_classes + 1), side="left").astype(np.int64)
        return cls(offsets, row[order].astype(np.int32), prob[order], mass)

    def save(self, folder: Path) -> None:
        """Write the files (:data:`LIST_FILES`) into ``folder``."""
        folder = Path(folder)
        np.save(folder / OFFSETS_FILE, np.asarray(self.offsets, np.int64))
        np.save(folder / ROWS_FILE, np.asarray(self.rows, np.int32))
        np.save(folder / PROBS_FILE, np.asarray(self.probs, np.float32))
        np.save(folder / MASS_FILE, np.array([self.mass], np.float64))

    @classmethod
    def load(cls, folder: Path) -> ClassLists:
        """Read the files from ``folder``, rows and probabilities memory-mapped."""
        return cls.from_files({name: Path(folder) / name for name in LIST_FILES})

    @classmethod
    def from_files(cls, paths: dict[str, Path]) -> ClassLists:
        """Read the files (file name -> where it is; the mass file may be missing or absent), rows and
        probabilities memory-mapped.

        Raises:
            KeyError: if one of the three list files is not given.
        """
        mass_file = paths.get(MASS_FILE)
        mass = float(np.load(mass_file)[0]) if mass_file is not None and Path(mass_file).is_file() else np.inf
        return cls(
            np.load(paths[OFFSETS_FILE], allow_pickle=False),
            np.load(paths[ROWS_FILE], mmap_mode="r", allow_pickle=False),
            np.load(paths[PROBS_FILE], mmap_mode="r", allow_pickle=False),
            mass,
        )

    def top_rows_counted(
        self,
        class_weights: np.ndarray,
        k: int,
        score_rows: Callable[[np.ndarray], np.ndarray],
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """The exact top-``k`` rows by ``score(row) = sum_j prob[row, j] * w[top[row, j]]`` (Threshold Algorithm).

        Args:
            class_weights: (C,) non-negative weight of each class.
            k: rows wanted.
            score_rows: random access: int64 (m,) ascending rows -> float32 (m,) their exact scores,
                by the formula above over the same top classes the lists were built from.
            exclude: int64 rows never to return (they may still be read).

        Returns:
            rows int64 (<= k,) and their scores float32, best first, ties to the lower row (exactly the
            scan's top k: the search stops only once no unread row can tie the k-th), rows scoring 0
            left out, so fewer than ``k`` when fewer score above 0; and the number of distinct
            rows scored (the random accesses).

        Raises:
            ValueError: for weights of the wrong shape or negative weights.
        """
        w = np.asarray(class_weights, np.float64)
        if w.shape != (self.n_classes,):
            raise ValueError(f"class_weights must be ({self.n_classes},), got {w.shape}")
        if (w < 0).any():
            raise ValueError("class_weights must be non-negative")
        empty = np.zeros(0, np.int64)
        if k <= 0 or not len(self.rows):
            return empty, np.zeros(0, np.float32), 0
        skip = np.unique(np.asarray(exclude, np.int64)) if exclude is not None and len(exclude) else empty
        by_weight = np.argsort(-w, kind="stable")
        pos = np.zeros(self.n_classes, np.int64)
        step = np.full(self.n_classes, max(FIRST_STEP, k), np.int64)
        seen = empty
        found_rows, found_scores = empty, np.zeros(0, np.float32)
        last = len(self.probs) - 1
        while True:
            more = pos < self._lengths
            nxt = np.where(more, self.probs[np.minimum(self._starts + pos, last)], 0.0)
            bound = _bound(w, nxt, by_weight, self.mass)
            threshold = float(bound.sum())
            if threshold <= 0.0:
                break  # every list read to its end, or only weightless classes left
            if len(found_scores) >= k:
                kth = float(np.partition(found_scores, len(found_scores) - k)[len(found_scores) - k])
                if kth > threshold * (1 + SLACK):  # strictly: no unseen row can even tie the k-th
                    break
            read = np.flatnonzero(bound >= bound.max() * READ_SHARE)
            ends = np.minimum(pos[read] + step[read], self._lengths[read])
            starts = self._starts[read]
            chunks = [self.rows[s + p : s + e] for s, p, e in zip(starts, pos[read], ends, strict=True)]
            pos[read] = ends
            step[read] *= 2
            new = np.unique(np.concatenate(chunks).astype(np.int64))
            new = new[~_member(new, seen)]
            seen = np.union1d(seen, new)
            new = new[~_member(new, skip)]
            if len(new):
                found_rows = np.concatenate([found_rows, new])
                found_scores = np.concatenate([found_scores, np.asarray(score_rows(new), np.float32)])
        order = np.lexsort((found_rows, -found_scores))[:k]
        order = order[found_scores[order] > 0]
        return found_rows[order], found_scores[order], len(seen)


class SegmentLists(TopRows):
    """The lists of an index made of segments: consecutive ranges of rows, each with its own lists
    (rows counted from the segment's start), searched one by one. A row is in one segment only, so the
    best ``k`` overall are among the segments' best ``k``: exact, and nothing is rebuilt at load.

    Attributes:
        parts: (first row, lists) of each segment, in row order.
        count: rows in all segments.
    """

    def __init__(self, parts: list[tuple[int, ClassLists]], count: int):
        if not parts or len({lists.n_classes for _, lists in parts}) != 1:
            raise ValueError("segment lists need at least one part, all over the same classes")
        self.parts = parts
        self.count = count

    @property
    def n_classes(self) -> int:
        return self.parts[0][1].n_classes

    def top_rows_counted(
        self,
        class_weights: np.ndarray,
        k: int,
        score_rows: Callable[[np.ndarray], np.ndarray],
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """As :meth:`ClassLists.top_rows_counted`, over all segments (rows are the index's)."""
        skip = np.asarray(exclude if exclude is not None else np.zeros(0), np.int64)
        ends = [start for start, _ in self.parts[1:]] + [self.count]
        found_rows, found_scores, touched = [], [], 0
        for (start, lists), end in zip(self.parts, ends, strict=True):
            mine = skip[(skip >= start) & (skip < end)] - start
            rows, scores, read = lists.top_rows_counted(class_weights, k, _shifted(score_rows, start), mine)
            found_rows.append(rows + start)
            found_scores.append(scores)
            touched += read
        rows, scores = np.concatenate(found_rows), np.concatenate(found_scores)
        order = np.lexsort((rows, -scores))[:k]
        return rows[order], scores[order], touched


def _shifted(score_rows: Callable[[np.ndarray], np.ndarray], start: int) -> Callable[[np.ndarray], np.ndarray]:
    """``score_rows`` for rows counted from ``start``."""
    return lambda rows: score_rows(rows + start)


def _repeats(class_top: np.ndarray, class_prob: np.ndarray) -> bool:
    """Whether some row lists a class twice with a positive probability."""
    if class_top.shape[1] < 2:
        return False
    t = class_top.shape[1]
    classes = np.where(np.asarray(class_prob) > 0, np.asarray(class_top, np.int64), -1 - np.arange(t))
    classes.sort(axis=1)
    return bool((classes[:, 1:] == classes[:, :-1]).any())


def _bound(w: np.ndarray, nxt: np.ndarray, by_weight: np.ndarray, mass: float) -> np.ndarray:
    """Each class's share of the most an unseen row can still score: ``w[c] * p[c]`` maximised over
    ``0 <= p[c] <= nxt[c]`` (the row's entry in list c is not above the next one) and ``sum p <= mass``
    (a row's probabilities); the heaviest classes take the mass first (a fractional knapsack)."""
    p = nxt[by_weight]
    before = np.cumsum(p) - p
    take = np.clip(mass - before, 0.0, p)
    out = np.zeros_like(w)
    out[by_weight] = w[by_weight] * take
    return out


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """bool (m,): which of ``values`` are in the ascending ``sorted_set``."""
    if not len(sorted_set) or not len(values):
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def write_class_lists(
    folder: Path, class_top: np.ndarray, class_prob: np.ndarray, n_classes: int = IMAGENET_CLASSES
) -> None:
    """Build the lists of an index's (n, t) top classes and write them into ``folder`` (publish time).

    Nothing is written for an index without class predictions (t = 0): text search refuses it anyway.
    """
    if class_top.ndim != 2 or class_top.shape[1] == 0:
        return
    ClassLists.build(class_top, class_prob, n_classes).save(folder)
