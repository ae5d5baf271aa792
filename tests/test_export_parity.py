"""The exported ONNX encoder computes what the torch model computes, and that is a good model."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from shared.encoder import ImageEncoder
from shared.sessions import file_sha256
from tools.export_models import load_torch_model

# foolbox is installed (--no-deps) only for its 20 labelled ImageNet photos; locate it without importing it.
_FOOLBOX = importlib.util.find_spec("foolbox")
FOOLBOX_DIR = os.path.dirname(_FOOLBOX.origin) if _FOOLBOX and _FOOLBOX.origin else ""
FOOLBOX_IMAGENET = sorted(glob.glob(os.path.join(FOOLBOX_DIR, "data", "imagenet_*.jpg")))
EGYPTIAN_CAT, TABBY, TIGER_CAT, ESPRESSO = 285, 281, 282, 967


@pytest.fixture(scope="module")
def photos() -> tuple[list[Image.Image], list[int]]:
    assert len(FOOLBOX_IMAGENET) == 20, "foolbox's 20 ImageNet samples are installed by `make test`"
    images = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())]
    images += [Image.open(f).convert("RGB") for f in FOOLBOX_IMAGENET]
    labels = [int(Path(f).stem.split("_")[2]) for f in FOOLBOX_IMAGENET]
    return images, labels


@pytest.fixture(scope="module")
def torch_model():  # type: ignore[no-untyped-def]
    return load_torch_model()


@pytest.mark.parametrize("size", [224, 128])
def test_onnx_matches_torch_on_real_images(encoder: ImageEncoder, torch_model, photos, size: int) -> None:  # type: ignore[no-untyped-def]
    """Every one of the 22 real photos (skimage chelsea and coffee, foolbox's 20 ImageNet samples), each
    held to the tolerance on its own: one photo, or a mean over many, could hide a broken one."""
    images, _ = photos
    assert len(images) == 22
    enc = ImageEncoder(encoder.folder, size=size) if size != encoder.size else encoder
    x = enc.preprocess(images)
    out = enc.encode_array(x)
    with torch.no_grad():
        t = torch.from_numpy(x)
        ref_emb = torch_model.extract_features(t).mean((2, 3)).numpy()
        ref_logits = torch_model(t).numpy()
    assert out.vectors.shape == (22, 1280) and out.logits.shape == (22, 1000)
    emb_err = np.abs(out.vectors - ref_emb).max(axis=1)
    logit_err = np.abs(out.logits - ref_logits).max(axis=1)
    assert (emb_err <= 1e-4).all(), emb_err
    assert (logit_err <= 1e-4).all(), logit_err
    # and they are 22 different photos, not one repeated: the embeddings differ
    assert len(np.unique(out.vectors.round(3), axis=0)) == 22
    assert (out.logits.argmax(axis=1) == ref_logits.argmax(axis=1)).all()


def test_onnx_model_classifies_real_photos(encoder: ImageEncoder, photos) -> None:  # type: ignore[no-untyped-def]
    """Parity alone would pass a faithfully exported broken model: check ImageNet top-1 too."""
    images, labels = photos
    top1 = encoder.encode(images).logits.argmax(axis=1)
    assert top1[0] in (EGYPTIAN_CAT, TABBY, TIGER_CAT)  # skimage chelsea is a cat
    assert top1[1] == ESPRESSO  # skimage coffee
    assert (top1[2:] == np.array(labels)).sum() >= 15  # 17/20 seen at export time


def test_manifest_describes_the_file(encoder: ImageEncoder) -> None:
    manifest = json.loads((encoder.folder / "manifest.json").read_text())
    for key in ("name", "version", "input", "normalisation", "outputs", "opset", "sha256"):
        assert key in manifest
    assert manifest["sha256"] == file_sha256(encoder.folder / manifest["file"])
    assert manifest["outputs"] == {"embedding": 1280, "logits": 1000}
    assert manifest["normalisation"]["mean"] == 127.0 and manifest["normalisation"]["std"] == 128.0
