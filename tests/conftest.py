"""Shared fixtures: real model, real Fashion-MNIST, a real collection built once per session."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from job.datasets import FASHION_MNIST_CLASSES, fashion_mnist_items, load_fashion_mnist
from job.embeddings import embed_pending
from job.reindex import reindex
from shared.encoder import ImageEncoder
from shared.ingest import ingest_bytes
from shared.runtime import get_runtime
from shared.search import SearchService
from shared.settings import Settings, get_settings
from shared.storage import LocalStorage
from tests.azurite import Azurite
from tests.azurite import start as start_azurite
from tests.keys import API_KEY, AUTH

__all__ = ["API_KEY", "AUTH"]  # tests import them from here

COLLECTION_SIZE = 1000


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings over ``data_dir`` with the tests' write key (``api_key=None`` for a closed app)."""
    overrides.setdefault("api_key", API_KEY)
    return Settings(data_dir=data_dir, _env_file=None, **overrides)  # type: ignore[call-arg,arg-type]


@pytest.fixture(scope="session")
def encoder() -> ImageEncoder:
    """The exported encoder from `make models`; a missing model is a failure, not a skip."""
    settings = make_settings(Path("/nonexistent"))
    if not (settings.encoder_dir / "manifest.json").is_file():
        pytest.fail("models/efficientnet_lite0 is missing: run `make models` (make test does)")
    return ImageEncoder.from_settings(settings)


@pytest.fixture(scope="session")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST test split (never ingested: held out)."""
    return load_fashion_mnist(make_settings(Path("/nonexistent")).fashion_mnist_dir, "test")


@dataclass
class Collection:
    settings: Settings
    storage: LocalStorage
    service: SearchService
    encoder: ImageEncoder


@pytest.fixture(scope="session")
def collection(tmp_path_factory: pytest.TempPathFactory, encoder: ImageEncoder) -> Collection:
    """1,000 Fashion-MNIST training images ingested, embedded and indexed in a fresh data dir."""
    settings = make_settings(tmp_path_factory.mktemp("collection"))
    storage = LocalStorage(settings.data_dir)
    for item in fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=COLLECTION_SIZE):
        assert ingest_bytes(storage, settings, item).status == "added"
    stats = embed_pending(storage, settings, encoder)
    assert stats.embedded == COLLECTION_SIZE
    reindex(storage, settings, encoder.version)
    return Collection(settings, storage, SearchService(settings, storage, encoder=encoder), encoder)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """A real Azurite (blob + queue) for the session; each test takes its own container prefix."""
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def use_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Any], None]]:
    """Point the process's settings and runtime (what triggers use) at a backend."""

    def apply(backend: Any) -> None:  # a tests.jobs_support.Backend
        for name in [n for n in os.environ if n.startswith("CLUSTERLENS_")]:
            monkeypatch.delenv(name)
        for name, value in backend.env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        get_runtime.cache_clear()

    yield apply
    get_settings.cache_clear()
    get_runtime.cache_clear()


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["FASHION_MNIST_CLASSES", "Azurite", "Collection", "make_settings", "png"]


@pytest.fixture(scope="session")
def full_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir of a small complete collection (index, classifier, report); copy it before changing it."""
    from tests import full_collection as full

    data_dir = tmp_path_factory.mktemp("full") / "data"
    full.build(full.settings_for(data_dir))
    return data_dir
