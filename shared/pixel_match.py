"""Pixel match: how well two images' grey thumbnails line up once a small edit between them is undone.

The embedding is the wrong ruler for "the same picture": on small images it moves more under a
re-encode, a blur or a one-pixel crop than between two similar garments photographed alike. The
dedupe job therefore finds candidate pairs through the index and scores each by a pixel match:

- every image becomes a :data:`THUMB` x :data:`THUMB` grey thumbnail (:func:`thumbnail`, 1 KiB);
- a pair is compared at :data:`SIDE` x :data:`SIDE`, both lightly blurred (:data:`BLUR`), by
  normalised cross-correlation (so brightness and contrast do not count);
- the score is the best correlation over edits tried on either image (:func:`hypotheses`): up to
  :data:`CROP_STEPS` cut from each side (crop), small turns (:data:`ANGLES`), gamma curves
  (:data:`GAMMAS`), more blur (:data:`BLURS`). A copy lines up with its original under one of them (median ~0.9995 on
  Fashion-MNIST); two distinct images stay lower wherever they differ.

Each edit is linear in the thumbnail's pixels (a crop and resize, a turn, the blur), so it is one
matrix (:class:`Edit`), applied to all thumbnails at once; gamma is applied to the pixels first.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

THUMB = 32  # stored thumbnail side (grey)
SIDE = 24  # compared at
BLUR = 0.6  # Gaussian sigma, in compared pixels, on both images
CROP_STEPS = (0.0, 0.035, 0.07)  # share cut from each side (1 and 2 pixels of 28)
ANGLES = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)  # degrees
GAMMAS = (0.7, 0.85, 1.2, 1.4)
BLURS = (0.5, 0.8, 1.1)  # more blur on one side (sigma, compared pixels)
PAIR_CHUNK = 8192  # pairs multiplied at a time
PAIR_BLOCK = 262_144  # pairs whose rows are edited together


def thumbnail(img: Image.Image) -> np.ndarray:
    """uint8 (THUMB * THUMB,) grey thumbnail of an image (antialiased, aspect not kept)."""
    return np.asarray(img.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR), np.uint8).reshape(-1)


def resample_matrix(out: int, size: int, start: float = 0.0, stop: float | None = None) -> np.ndarray:
    """float64 (out, size): the span [start, stop) of a ``size``-pixel axis resized to ``out`` pixels
    with a triangle filter widened by the scale when shrinking (as Pillow's antialiased bilinear)."""
    stop = float(size) if stop is None else stop
    scale = (stop - start) / out
    support = max(scale, 1.0)
    centre = start + (np.arange(out) + 0.5) * scale
    x = np.arange(size) + 0.5
    w = np.clip(1.0 - np.abs(x[None, :] - centre[:, None]) / support, 0.0, None)
    empty = w.sum(axis=1) == 0
    if empty.any():  # a span narrower than a pixel: nearest pixel
        w[empty, np.clip(centre[empty].astype(int), 0, size - 1)] = 1.0
    return w / w.sum(axis=1, keepdims=True)


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """float64 (n, n) Gaussian blur along one axis, edges repeated."""
    if sigma <= 0:
        return np.eye(n)
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for k, t in zip(range(-radius, radius + 1), taps, strict=True):
            m[i, min(max(i + k, 0), n - 1)] += t
    return m


def rotation_matrix(size: int, degrees: float) -> np.ndarray:
    """float64 (size*size, size*size): a square image turned about its centre, bilinear, coordinates
    outside clamped to the edge (the border's colour fills the corners)."""
    a = -np.deg2rad(degrees)  # positive: counter-clockwise on screen, as Pillow's rotate
    c, s = np.cos(a), np.sin(a)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    mid = (size - 1) / 2
    # source of each output pixel: the output turned back
    sx = c * (xx - mid) + s * (yy - mid) + mid
    sy = -s * (xx - mid) + c * (yy - mid) + mid
    sx, sy = np.clip(sx, 0, size - 1), np.clip(sy, 0, size - 1)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    x1, y1 = np.minimum(x0 + 1, size - 1), np.minimum(y0 + 1, size - 1)
    fx, fy = sx - x0, sy - y0
    m = np.zeros((size * size, size * size))
    out = np.arange(size * size)
    for xs, ys, w in (
        (x0, y0, (1 - fx) * (1 - fy)),
        (x1, y0, fx * (1 - fy)),
        (x0, y1, (1 - fx) * fy),
        (x1, y1, fx * fy),
    ):
        np.add.at(m, (out, (ys * size + xs).ravel()), w.ravel())
    return m


@dataclass(frozen=True)
class Edit:
    """One edit tried: a crop (rows and columns resampled separately) or a full matrix (a turn), and
    the gamma applied to the pixels first."""

    name: str
    rows: np.ndarray | None = None  # (SIDE, THUMB)
    cols: np.ndarray | None = None  # (SIDE, THUMB)
    full: np.ndarray | None = None  # (SIDE*SIDE, THUMB*THUMB)
    gamma: float = 1.0

    def apply(self, thumbs: np.ndarray) -> np.ndarray:
        """float32 (n, SIDE*SIDE) zero-mean unit vectors of uint8 (n, THUMB*THUMB) thumbnails so edited."""
        x = thumbs.astype(np.float32) / 255.0
        if self.gamma != 1.0:
            x = x**self.gamma
        if self.full is not None:
            v = x @ self.full.T.astype(np.float32)
        else:
            assert self.rows is not None and self.cols is not None
            img = x.reshape(-1, THUMB, THUMB) @ self.cols.T.astype(np.float32)  # (n, THUMB, SIDE)
            v = (self.rows.astype(np.float32) @ img).reshape(len(x), -1)
        v -= v.mean(axis=1, keepdims=True)
        v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-6
        return v


@lru_cache(maxsize=1)
def hypotheses() -> tuple[Edit, ...]:
    """The identity first, then every crop, turn, gamma and blur tried (built once)."""
    g = blur_matrix(SIDE, BLUR)
    base = g @ resample_matrix(SIDE, THUMB)
    edits = [Edit("identity", rows=base, cols=base)]
    for top, left, bottom, right in itertools.product(CROP_STEPS, repeat=4):
        if top or left or bottom or right:
            rows = g @ resample_matrix(SIDE, THUMB, top * THUMB, THUMB * (1 - bottom))
            cols = g @ resample_matrix(SIDE, THUMB, left * THUMB, THUMB * (1 - right))
            edits.append(Edit(f"crop {top:g} {left:g} {bottom:g} {right:g}", rows=rows, cols=cols))
    both = np.kron(base, base)
    edits += [Edit(f"turn {a:g}", full=both @ rotation_matrix(THUMB, a)) for a in ANGLES]
    edits += [Edit(f"gamma {y:g}", rows=base, cols=base, gamma=y) for y in GAMMAS]
    for s in BLURS:
        more = blur_matrix(SIDE, float(np.hypot(BLUR, s))) @ resample_matrix(SIDE, THUMB)
        edits.append(Edit(f"blur {s:g}", rows=more, cols=more))
    return tuple(edits)


def unit_vectors(thumbs: np.ndarray) -> np.ndarray:
    """float32 (n, SIDE*SIDE): thumbnails as compared, unedited (what candidate pairs are searched by)."""
    return hypotheses()[0].apply(thumbs)


def slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` over ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def match_scores(
    thumbs: np.ndarray, left: np.ndarray, right: np.ndarray, edits: tuple[Edit, ...] | None = None
) -> np.ndarray:
    """float32 (p,): each pair's pixel match, the best normalised correlation of ``thumbs[left]`` and
    ``thumbs[right]`` over every edit tried on either side (the other side as it is).

    Pairs are scored :data:`PAIR_BLOCK` at a time (the rows they touch edited once per block: memory
    ~4.6 KB a row per block, whatever the collection's size).

    Args:
        thumbs: uint8 (n, THUMB*THUMB) thumbnails (:func:`thumbnail`).
        left, right: (p,) rows of the pairs.
    """
    edits = hypotheses() if edits is None else edits
    left = np.asarray(left, np.int64)
    right = np.asarray(right, np.int64)
    best = np.full(len(left), -1.0, np.float32)
    for block in slices(len(left), PAIR_BLOCK):
        best[block] = _block_scores(thumbs, left[block], right[block], edits)
    return best


def _block_scores(thumbs: np.ndarray, left: np.ndarray, right: np.ndarray, edits: tuple[Edit, ...]) -> np.ndarray:
    used = np.unique(np.concatenate([left, right]))
    a_all, b_all = np.searchsorted(used, left), np.searchsorted(used, right)
    sub = thumbs[used]
    base = edits[0].apply(sub)
    best = np.full(len(left), -1.0, np.float32)
    for s in slices(len(left), PAIR_CHUNK):
        best[s] = np.einsum("ij,ij->i", base[a_all[s]], base[b_all[s]])
    for edit in edits[1:]:
        v = edit.apply(sub)
        for s in slices(len(left), PAIR_CHUNK):
            a, b = a_all[s], b_all[s]
            one = np.einsum("ij,ij->i", v[a], base[b])
            other = np.einsum("ij,ij->i", base[a], v[b])
            best[s] = np.maximum(best[s], np.maximum(one, other))
    return best
