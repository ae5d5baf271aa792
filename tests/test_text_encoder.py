"""The exported text encoder matches sentence-transformers and needs no torch at run time."""

from __future__ import annotations

import numpy as np
import pytest

from shared.sessions import file_sha256
from shared.settings import Settings
from shared.text_encoder import TextEncoder

SENTENCES = [
    "ankle boot",
    "a bag",
    "trousers",
    "a red dress with long sleeves",
    "A man is eating food.",
    "",
    "x" * 3000,
    "Ein Hund läuft über die Wiese 🐕",
    "a cat sleeping on a sofa",
    "espresso in a small white cup",
    "ROCKET LAUNCH at night!!!",
    "T-shirt/top",
]


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    if not (settings.text_encoder_dir / "manifest.json").is_file():
        pytest.fail("models/minilm_l6 is missing: run `make models` (make test does)")
    return TextEncoder(settings.text_encoder_dir)


def test_parity_with_sentence_transformers(text_encoder: TextEncoder) -> None:
    from tools.export_models import load_text_model

    reference = load_text_model().encode(SENTENCES, normalize_embeddings=True, batch_size=4)
    ours = text_encoder.encode(SENTENCES, batch_size=5)  # different batching: padding must not matter
    assert ours.shape == (len(SENTENCES), 384)
    cosine = (ours * reference).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_class_embeddings_match_the_names(text_encoder: TextEncoder) -> None:
    classes = text_encoder.imagenet_classes()
    assert classes.shape == (1000, 384)
    manifest = text_encoder.manifest
    assert manifest.imagenet_classes is not None
    assert manifest.imagenet_classes.sha256 == file_sha256(text_encoder.folder / "imagenet_classes.npy")
    top = np.argsort(-(classes @ text_encoder.encode(["a cat"])[0]))[:3]
    assert set(top.tolist()) <= {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert 967 in np.argsort(-(classes @ text_encoder.encode(["espresso"])[0]))[:3]  # espresso (550: its maker)
