"""Ingest from folders and datasets: labels, dedupe by content, quarantine with reasons."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job.datasets import FASHION_MNIST_CLASSES, fashion_mnist_items, load_fashion_mnist
from shared.catalog import Catalog
from shared.encoder import ImageEncoder
from shared.ingest import IngestItem, IngestSummary, folder_items, ingest_bytes, scan_folder
from shared.storage import QUARANTINE, UPLOADS, LocalStorage
from tests.conftest import make_settings, png


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "puppies").mkdir(parents=True)
    (root / "cats" / "a.jpg").write_bytes(_jpeg(1))
    (root / "cats" / "b.JPEG").write_bytes(_jpeg(2))
    (root / "dogs" / "puppies" / "c.png").write_bytes(png(np.full((8, 8), 200, np.uint8)))
    (root / "loose.webp").write_bytes(_webp())
    (root / "cats" / "copy-of-a.jpg").write_bytes(_jpeg(1))  # same bytes as a.jpg
    (root / "cats" / "broken.png").write_bytes(png(np.zeros((50, 50), np.uint8))[:40])
    (root / "dogs" / "notes.png").write_bytes(b"definitely not a png")
    (root / "readme.txt").write_text("not an image extension: ignored")
    return root


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (1, 2, 3)).save(buf, format="WEBP")
    return buf.getvalue()


def test_folder_layout_gives_labels(image_folder: Path) -> None:
    found = {p.relative_to(image_folder).as_posix(): label for p, label in scan_folder(image_folder)}
    assert found == {
        "cats/a.jpg": "cats",
        "cats/b.JPEG": "cats",
        "cats/copy-of-a.jpg": "cats",
        "cats/broken.png": "cats",
        "dogs/puppies/c.png": "dogs",
        "dogs/notes.png": "dogs",
        "loose.webp": None,
    }


def test_ingest_folder_dedupes_and_quarantines(tmp_path: Path, image_folder: Path) -> None:
    settings = make_settings(tmp_path / "data")
    storage = LocalStorage(settings.data_dir)
    summary = IngestSummary()
    for item in folder_items(scan_folder(image_folder)):
        summary.count(ingest_bytes(storage, settings, item))
    assert (summary.added, summary.duplicate, summary.quarantined) == (4, 1, 2)
    reasons = {Path(p.source).name: p.reason for p in summary.problems}
    assert reasons["broken.png"].startswith("invalid_image")
    assert reasons["notes.png"].startswith("unsupported_media_type")
    quarantined = sorted(n for n in storage.list(QUARANTINE) if n.endswith(".json"))
    assert len(quarantined) == 2
    for name in quarantined:
        record = storage.get_json(QUARANTINE, name)
        assert record["reason"] and record["code"] and record["source"]
    catalog = Catalog(storage)
    labels = sorted((r.label or "-") for r in catalog.records())
    assert labels == ["-", "cats", "cats", "dogs"]
    for record in catalog.records():
        assert storage.exists(UPLOADS, record.blob)
    # Everything again: all known, nothing new.
    again = IngestSummary()
    for item in folder_items(scan_folder(image_folder)):
        again.count(ingest_bytes(storage, settings, item))
    assert again.added == 0 and again.duplicate == 5


def test_bad_bytes_never_raise(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_upload_bytes=2048)
    storage = LocalStorage(tmp_path)
    big = png(np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8))
    for data, code in [
        (b"", "empty_image"),
        (b"\x89PNG\r\n\x1a\n", "invalid_image"),
        (big, "payload_too_large"),
        (b"GIF89a" + b"\x00" * 10, "invalid_image"),
    ]:
        result = ingest_bytes(storage, settings, IngestItem(data=data, source="t"))
        assert result.status == "quarantined"
        assert result.reason is not None and result.reason.startswith(code), result.reason


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_image_pixels=10_000)
    buf = io.BytesIO()
    Image.new("L", (1000, 1000)).save(buf, format="PNG")  # tiny file, a million pixels
    result = ingest_bytes(LocalStorage(tmp_path), settings, IngestItem(data=buf.getvalue(), source="bomb"))
    assert result.status == "quarantined" and result.reason and result.reason.startswith("image_too_large")


def test_fashion_mnist_items_are_labelled_pngs(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    images, labels = load_fashion_mnist(settings.fashion_mnist_dir, "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    items = list(fashion_mnist_items(settings.fashion_mnist_dir, "test", limit=5, offset=10))
    assert [i.label for i in items] == [FASHION_MNIST_CLASSES[int(y)] for y in labels[10:15]]
    decoded = np.asarray(Image.open(io.BytesIO(items[0].data)))
    assert np.array_equal(decoded, images[10])


def test_images_that_stop_decoding_are_quarantined_at_embedding(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    """A stored image that no longer decodes is quarantined with its reason; the rest of the batch embeds."""
    from job.embeddings import embed_pending

    settings = make_settings(tmp_path, embed_batch_size=4)
    storage = LocalStorage(tmp_path)
    rng = np.random.default_rng(3)
    results = [
        ingest_bytes(
            storage,
            settings,
            IngestItem(data=png(rng.integers(0, 255, (20, 20), dtype=np.uint8)), source=f"img{i}", label="x"),
        )
        for i in range(6)
    ]
    broken = Catalog(storage).get(results[2].id)
    storage.put(UPLOADS, broken.blob, storage.get(UPLOADS, broken.blob)[:30])  # damaged in storage
    stats = embed_pending(storage, settings, encoder)
    assert stats.embedded == 5 and stats.failed == [broken.id]
    reason = storage.get_json(QUARANTINE, f"{broken.id}.json")
    assert (
        reason["code"] == "invalid_image" and reason["reason"].startswith("at embedding") and reason["source"] == "img2"
    )
    assert storage.exists(QUARANTINE, f"{broken.id}.bin") and not storage.exists(UPLOADS, broken.blob)
    assert not Catalog(storage).exists(broken.id)
    again = embed_pending(storage, settings, encoder)
    assert again.pending == 0  # not retried forever


def test_a_record_removed_during_embedding_does_not_stop_the_run(
    tmp_path: Path, encoder: ImageEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from job import embeddings
    from job.embeddings import embed_pending

    settings = make_settings(tmp_path, embed_batch_size=2)
    storage = LocalStorage(tmp_path)
    rng = np.random.default_rng(4)
    ids = [
        ingest_bytes(
            storage, settings, IngestItem(data=png(rng.integers(0, 255, (20, 20), dtype=np.uint8)), source=f"i{i}")
        ).id
        for i in range(4)
    ]
    listed = sorted(ids)
    real_prefetch = embeddings.prefetch_batches
    removed: list[str] = []

    def prefetch_after_a_removal(items, *args, **kwargs):  # type: ignore[no-untyped-def]
        catalog = Catalog(storage)
        catalog.remove(catalog.get(listed[1]))  # another worker withdrew it after the pending list was made
        removed.append(listed[1])
        return real_prefetch(items, *args, **kwargs)

    # raising=True (the default): if embed_pending stops looking the prefetcher up here, this fails
    # loudly instead of silently patching nothing (as it did when the code moved to job/).
    monkeypatch.setattr(embeddings, "prefetch_batches", prefetch_after_a_removal)
    stats = embed_pending(storage, settings, encoder)
    assert removed == [listed[1]]  # the removal really happened in the middle of the run
    assert stats.embedded == 3 and stats.failed == [listed[1]]
