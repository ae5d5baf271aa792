"""The pixel match on real Fashion-MNIST images: a copy made by any of the benchmark's edits (none of
them the calibration's) lines up with its original better than the most alike distinct image does,
and the edit matrices do what a Pillow crop, resize or turn does."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from shared.pixel_match import (
    SIDE,
    THUMB,
    blur_matrix,
    hypotheses,
    match_scores,
    resample_matrix,
    rotation_matrix,
    thumbnail,
)

EDITS = ("jpeg", "crop", "enlarge", "gamma", "blur", "turn")


def edit(pixels: np.ndarray, kind: str) -> Image.Image:
    img = Image.fromarray(pixels)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=60)
        return Image.open(io.BytesIO(buf.getvalue()))
    if kind == "crop":
        return img.crop((1, 0, img.width, img.height - 2))
    if kind == "enlarge":
        return img.resize((50, 50), Image.Resampling.BICUBIC)
    if kind == "gamma":
        return Image.fromarray((255.0 * (pixels / 255.0) ** 1.3).round().astype(np.uint8))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(0.7))
    return img.rotate(1.5, resample=Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def images(fashion_test: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return fashion_test[0][:300]


def test_a_copy_matches_its_original_better_than_any_distinct_image(images: np.ndarray) -> None:
    n = len(images)
    originals = np.stack([thumbnail(Image.fromarray(p)) for p in images])
    sources = np.arange(0, n, 10)  # 30 originals, each copied by every edit
    copies = [(int(i), kind, thumbnail(edit(images[i], kind))) for i in sources for kind in EDITS]
    thumbs = np.concatenate([originals, np.stack([c[2] for c in copies])])
    to_own = match_scores(thumbs, np.array([c[0] for c in copies]), n + np.arange(len(copies)))
    # every copy against every original but its own: the most alike distinct image
    left = np.repeat(n + np.arange(len(copies)), n)
    right = np.tile(np.arange(n), len(copies))
    others = match_scores(thumbs, left, right).reshape(len(copies), n)
    others[np.arange(len(copies)), [c[0] for c in copies]] = -1
    wins = to_own > others.max(axis=1)
    by_kind = {k: float(wins[[c[1] == k for c in copies]].mean()) for k in EDITS}
    assert all(share >= 0.9 for share in by_kind.values()), by_kind
    assert np.median(to_own) > 0.998 and to_own.min() > 0.98
    assert match_scores(originals, np.arange(5), np.arange(5)) == pytest.approx(1.0, abs=1e-5)


def test_edit_matrices_agree_with_pillow() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (THUMB, THUMB), np.uint8))
    x = np.asarray(img, np.float64)
    ours = resample_matrix(SIDE, THUMB) @ x @ resample_matrix(SIDE, THUMB).T
    pillow = np.asarray(img.resize((SIDE, SIDE), Image.Resampling.BILINEAR), np.float64)
    assert np.abs(ours - pillow).mean() < 1.0  # grey levels: Pillow rounds to 8 bits
    box = (1.5, 2.0, THUMB - 3.0, THUMB - 1.0)
    cropped = resample_matrix(SIDE, THUMB, box[1], box[3]) @ x @ resample_matrix(SIDE, THUMB, box[0], box[2]).T
    pillow = np.asarray(img.resize((SIDE, SIDE), Image.Resampling.BILINEAR, box=box), np.float64)
    assert np.abs(cropped - pillow).mean() < 1.5
    turned = (rotation_matrix(THUMB, 3.0) @ x.ravel()).reshape(THUMB, THUMB)
    pillow = np.asarray(img.rotate(3.0, resample=Image.Resampling.BILINEAR), np.float64)
    inner = slice(4, THUMB - 4)  # Pillow fills the corners black, ours with the edge
    assert np.abs(turned[inner, inner] - pillow[inner, inner]).mean() < 2.0
    assert np.allclose(blur_matrix(SIDE, 0.6).sum(axis=1), 1.0) and np.allclose(blur_matrix(SIDE, 0), np.eye(SIDE))
    names = [e.name for e in hypotheses()]
    assert names[0] == "identity" and len(names) == len(set(names)) == 1 + 80 + 6 + 4 + 3
