"""Shared fixtures: real model, real Fashion-MNIST, a real collection built once per session."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
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
HELD_OUT = 500


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings over ``data_dir`` with the tests' write key (``api_key=None`` for a closed app)."""
    overrides.setdefault("api_key", API_KEY)
    return Settings(data_dir=data_dir, _env_file=None, **overrides)  # type: ignore[call-arg,arg-type]


# Modules whose tests take longest, started first: pytest-xdist (make test: --dist loadfile and
# --no-loadscope-reorder) hands whole files to workers in collection order, so the long ones do not
# start last and leave one worker running alone at the end. The rest keep pytest's order.
SLOW_FIRST = (
    "test_analysis.py",  # the 2,000-image analysis: UMAP's first compile, t-SNE, classifiers
    "test_types.py",  # mypy
    "test_crash.py",
    "test_page.py",  # a complete collection served to Chromium
    "test_demo.py",  # three demos in a row
    "test_cli.py",
    "test_azure.py",
    "test_labels.py",
    "test_jobs.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order


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


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build`` fills once per test run, however many pytest-xdist workers there are.

    The first worker to ask builds it, under a lock, in the temporary folder all workers of the run
    share; the others wait for it and use the same folder. So users must only read it: a test that
    changes it works on a copy (``shutil.copytree``), as the delete, head and page tests do.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: its own temporary folder
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # the run's folder; each worker's basetemp is inside
    folder, done = shared / name, shared / f"{name}.built"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also if build raises
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def _build_collection(data_dir: Path, encoder: ImageEncoder) -> None:
    settings = make_settings(data_dir)
    storage = LocalStorage(data_dir)
    for item in fashion_mnist_items(settings.fashion_mnist_dir, "train", limit=COLLECTION_SIZE):
        assert ingest_bytes(storage, settings, item).status == "added"
    stats = embed_pending(storage, settings, encoder)
    assert stats.embedded == COLLECTION_SIZE
    reindex(storage, settings, encoder.version)


@pytest.fixture(scope="session")
def collection(tmp_path_factory: pytest.TempPathFactory, encoder: ImageEncoder) -> Collection:
    """1,000 Fashion-MNIST training images ingested, embedded and indexed in a fresh data dir
    (built once per run: read it, or copy it to change it)."""
    data_dir = built_once(tmp_path_factory, "collection", lambda folder: _build_collection(folder, encoder))
    settings = make_settings(data_dir)
    storage = LocalStorage(settings.data_dir)
    return Collection(settings, storage, SearchService(settings, storage, encoder=encoder), encoder)


@pytest.fixture(scope="session")
def held_out(tmp_path_factory: pytest.TempPathFactory, encoder: ImageEncoder) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (fp32 encoder, 224 px) and labels of the first 500 Fashion-MNIST test images: never
    ingested, never trained on. Computed once per run for the tests that need them as queries."""

    def embed(folder: Path) -> None:
        x, y = load_fashion_mnist(make_settings(folder).fashion_mnist_dir, "test")
        images = [Image.fromarray(p).convert("RGB") for p in x[:HELD_OUT]]
        vectors = np.concatenate([encoder.encode(images[i : i + 64]).vectors for i in range(0, HELD_OUT, 64)])
        np.save(folder / "vectors.npy", vectors)
        np.save(folder / "labels.npy", y[:HELD_OUT])

    folder = built_once(tmp_path_factory, "held-out", embed)
    return np.load(folder / "vectors.npy"), np.load(folder / "labels.npy")


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
    """The data dir of a small complete collection (index, classifier, report), built once per run;
    copy it before changing it."""
    from tests import full_collection as full

    return built_once(tmp_path_factory, "full", lambda folder: full.build(full.settings_for(folder)))
