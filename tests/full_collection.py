"""A small but complete collection: every artefact the API serves (index, classifier, analysis report).

600 real Fashion-MNIST images, every other one labelled, embedded at 64 px. Built once per test
session (``full_collection`` in conftest) and copied by each user that changes it (the page tests,
the fuzzing run); :mod:`bench.reliability` builds its own with :func:`build`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from job.datasets import fashion_mnist_items
from job.embeddings import embed_pending
from job.reindex import reindex
from job.retrain import train_and_publish
from job.run_analysis import run_analysis
from shared.encoder import ImageEncoder
from shared.ingest import ingest_bytes
from shared.settings import Settings
from shared.storage import LocalStorage

SIZE = 600
# What a server over this collection needs in its environment (besides CLUSTERLENS_DATA_DIR).
ENV = {"CLUSTERLENS_IMAGE_SIZE": "64", "CLUSTERLENS_EMBED_BATCH_SECONDS": "1", "CLUSTERLENS_JOB_POLL_SECONDS": "0.2"}


def build(settings: Settings, size: int = SIZE) -> None:
    """Ingest, embed, index, train the classifier and run the analysis (PCA map only) in ``settings.data_dir``.

    Raises:
        AssertionError: if the classifier could not be published.
    """
    storage = LocalStorage(settings.data_dir)
    for i, item in enumerate(fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=size)):
        ingest_bytes(storage, settings, item if i % 2 == 0 else dataclasses.replace(item, label=None))
    encoder = ImageEncoder(
        settings.encoder_dir, size=settings.image_size, intra_op_threads=settings.ort_intra_op_threads
    )
    embed_pending(storage, settings, encoder)
    reindex(storage, settings, encoder.version)
    assert train_and_publish(storage, settings, encoder.version).version is not None
    run_analysis(storage, settings, encoder.version)


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    """The settings the collection is built with (64 px, PCA map only)."""
    from tests.conftest import make_settings

    return make_settings(data_dir, image_size=64, analysis_maps=["pca"], **overrides)
