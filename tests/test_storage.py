"""The Blob-like contract every storage backend keeps: the local folder, and Azure Blob Storage on Azurite."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from shared.storage import CONTAINERS, UPLOADS, AzureBlobStorage, BlobNotFound, LocalStorage, Storage, check_blob_name


@pytest.fixture(params=["local", pytest.param("azure", marks=pytest.mark.integration)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path)
    azurite = request.getfixturevalue("azurite")
    return AzureBlobStorage(connection_string=azurite.connection_string, container_prefix=azurite.fresh_prefix())


def test_put_get_list_delete(storage: Storage) -> None:
    assert storage.put(UPLOADS, "a/b/c.png", b"1", metadata={"label": "x"})
    storage.put(UPLOADS, "a/d.png", b"2")
    storage.put(UPLOADS, "e.png", b"3")
    assert storage.get(UPLOADS, "a/b/c.png") == b"1"
    assert list(storage.list(UPLOADS)) == ["a/b/c.png", "a/d.png", "e.png"]
    assert list(storage.list(UPLOADS, "a/")) == ["a/b/c.png", "a/d.png"]
    assert list(storage.list(UPLOADS, "a/b")) == ["a/b/c.png"]
    assert storage.get_metadata(UPLOADS, "a/b/c.png") == {"label": "x"}
    assert storage.get_metadata(UPLOADS, "e.png") == {}
    assert storage.delete(UPLOADS, "a/b/c.png") and not storage.delete(UPLOADS, "a/b/c.png")
    with pytest.raises(BlobNotFound):
        storage.get(UPLOADS, "a/b/c.png")
    with pytest.raises(BlobNotFound):
        storage.get_metadata(UPLOADS, "a/b/c.png")


def test_sizes_lists_every_blob_under_a_prefix_with_its_size(storage: Storage) -> None:
    storage.put(UPLOADS, "v000001/a.npy", b"12345")
    storage.put(UPLOADS, "v000001/b/c.npy", b"")
    storage.put(UPLOADS, "v000002/a.npy", b"1")
    assert storage.sizes(UPLOADS, "v000001/") == {"v000001/a.npy": 5, "v000001/b/c.npy": 0}
    assert storage.sizes(UPLOADS, "v000009/") == {}


def test_delete_many_deletes_what_exists_in_batches_and_skips_what_does_not(storage: Storage) -> None:
    names = [f"m/{i:04d}.json" for i in range(300)]  # more than one Blob batch (256)
    for name in names[:290]:
        storage.put(UPLOADS, name, b"{}")
    storage.put(UPLOADS, "keep.json", b"{}")
    assert storage.delete_many(UPLOADS, names) == 290  # on Azurite, which refuses batches: one by one
    assert list(storage.list(UPLOADS)) == ["keep.json"]
    assert storage.delete_many(UPLOADS, []) == 0


def test_create_if_absent_is_atomic_under_races(storage: Storage) -> None:
    winners = []

    def attempt(i: int) -> None:
        if storage.put(UPLOADS, "one.bin", str(i).encode(), overwrite=False):
            winners.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert storage.get(UPLOADS, "one.bin") == str(winners[0]).encode()
    assert list(storage.list(UPLOADS)) == ["one.bin"]  # no temp files left behind


@pytest.mark.parametrize("name", ["", "/abs", "../x", "a/../../x", "a//b", "a/./b", "sp ace", "a\\b", ".metadata/x"])
def test_names_cannot_escape_the_container(storage: Storage, name: str) -> None:
    with pytest.raises(ValueError):
        storage.put(UPLOADS, name, b"x")
    with pytest.raises(ValueError):
        check_blob_name(name)


def test_unknown_container_is_refused(storage: Storage) -> None:
    with pytest.raises(ValueError):
        storage.put("elsewhere", "x", b"x")
    assert {"uploads", "embeddings", "index", "labels", "quarantine", "reports", "models", "jobs"} == set(CONTAINERS)


def test_json_and_files_round_trip(storage: Storage, tmp_path: Path) -> None:
    storage.put_json(UPLOADS, "m.json", {"a": 1})
    assert storage.get_json(UPLOADS, "m.json") == {"a": 1}
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100_000)
    storage.upload_file(UPLOADS, "big.bin", src)
    out = storage.download_file(UPLOADS, "big.bin", tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == src.read_bytes()
    if isinstance(storage, LocalStorage):
        assert storage.local_path(UPLOADS, "big.bin") is not None
    assert storage.local_path(UPLOADS, "missing.bin") is None
    with pytest.raises(BlobNotFound):
        storage.download_file(UPLOADS, "missing.bin", tmp_path / "out" / "missing.bin")
    assert not (tmp_path / "out" / "missing.bin").exists()


def test_large_files_stream_both_ways(storage: Storage, tmp_path: Path) -> None:
    """Bigger than one upload request: sent and fetched in blocks, byte for byte."""
    src = tmp_path / "large.bin"
    src.write_bytes(np.random.default_rng(0).bytes(9 * 1024 * 1024))
    storage.upload_file(UPLOADS, "large.bin", src)
    out = storage.download_file(UPLOADS, "large.bin", tmp_path / "large-copy.bin")
    assert out.read_bytes() == src.read_bytes()


def test_metadata_keeps_any_text(storage: Storage) -> None:
    """Azure takes ASCII header values only: other text is encoded on the way in and back."""
    meta = {"label": "T-shirt/top", "caption": "Zürich café, 100% \u2713", "source": "blob:uploads/a b.png"}
    storage.put(UPLOADS, "m.png", b"x", metadata=meta)
    assert storage.get_metadata(UPLOADS, "m.png") == meta
