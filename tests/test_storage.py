"""The local storage backend: the Blob-like contract every backend must keep."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shared.storage import CONTAINERS, UPLOADS, BlobNotFound, LocalStorage, check_blob_name


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path)


def test_put_get_list_delete(storage: LocalStorage) -> None:
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


def test_create_if_absent_is_atomic_under_races(storage: LocalStorage) -> None:
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
def test_names_cannot_escape_the_container(storage: LocalStorage, name: str) -> None:
    with pytest.raises(ValueError):
        storage.put(UPLOADS, name, b"x")
    with pytest.raises(ValueError):
        check_blob_name(name)


def test_unknown_container_is_refused(storage: LocalStorage) -> None:
    with pytest.raises(ValueError):
        storage.put("elsewhere", "x", b"x")
    assert {"uploads", "embeddings", "index", "labels", "quarantine", "reports", "models"} == set(CONTAINERS)


def test_json_and_files_round_trip(storage: LocalStorage, tmp_path: Path) -> None:
    storage.put_json(UPLOADS, "m.json", {"a": 1})
    assert storage.get_json(UPLOADS, "m.json") == {"a": 1}
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100_000)
    storage.upload_file(UPLOADS, "big.bin", src)
    out = storage.download_file(UPLOADS, "big.bin", tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == src.read_bytes()
    assert storage.local_path(UPLOADS, "big.bin") is not None
    assert storage.local_path(UPLOADS, "missing.bin") is None
