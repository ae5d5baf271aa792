"""Issue 22: published index versions on the Azure Files share, opened in place by the query side.

Real folders stand for the share (a mount is a folder) and real indexes are built from Fashion-MNIST pixels;
remote blob storage is a local folder behind the remote interface (no in-place paths, every request counted).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from job.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from job.index_build import IndexParams, build_index, publish
from job.share import mirror_version
from shared.index import FILES, ClusterIndex, current_version, list_versions, load_version
from shared.index_files import folder_sizes, prune_cache, served_folders, version_file
from shared.live_index import LiveIndex
from shared.storage import INDEX, LocalStorage
from tests.conftest import make_settings


class RemoteStorage(LocalStorage):
    """Blob storage as the function app sees it: nothing readable in place, every request counted."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.calls: Counter[str] = Counter()
        self.downloaded: list[str] = []

    def local_path(self, container: str, name: str) -> Path | None:
        return None

    def get(self, container: str, name: str) -> bytes:
        self.calls["get"] += 1
        return super().get(container, name)

    def exists(self, container: str, name: str) -> bool:
        self.calls["exists"] += 1
        return super().exists(container, name)

    def sizes(self, container: str, prefix: str) -> dict[str, int]:
        self.calls["list"] += 1
        return super().sizes(container, prefix)

    def download_file(self, container: str, name: str, dest: Path) -> Path:
        self.downloaded.append(name)
        return super().download_file(container, name, dest)


@pytest.fixture(scope="module")
def pixels() -> tuple[np.ndarray, list[str], list[str | None]]:
    """600 real Fashion-MNIST test images as 784-d vectors, with their ids and class names."""
    x, y = load_fashion_mnist(make_settings(Path("/nonexistent")).fashion_mnist_dir, "test")
    vectors = x[:600].reshape(600, -1).astype(np.float32) / 255.0
    return vectors, [f"img{i:04d}" for i in range(600)], [FASHION_MNIST_CLASSES[c] for c in y[:600]]


def _build(pixels: tuple[np.ndarray, list[str], list[str | None]], n: int = 600) -> ClusterIndex:
    vectors, ids, labels = pixels
    params = IndexParams(kind="ivf_flat", pca_dim=64)
    return build_index(vectors[:n], ids[:n], labels[:n], encoder_version="test", params=params)


def _same_answers(a: ClusterIndex, b: ClusterIndex, queries: np.ndarray) -> None:
    ha, hb = a.search(queries, 10), b.search(queries, 10)
    assert np.array_equal(ha.rows, hb.rows) and np.allclose(ha.scores, hb.scores)
    assert [a.ids[r] for r in ha.rows[0]] == [b.ids[r] for r in hb.rows[0]]


# --- the publisher --------------------------------------------------------------------------------------


def test_publish_mirrors_each_version_before_its_pointer_and_prune_removes_it(tmp_path: Path, pixels) -> None:  # type: ignore[no-untyped-def]
    storage, share = LocalStorage(tmp_path / "blobs"), tmp_path / "share"
    versions = [publish(storage, _build(pixels, n), keep=2, share_dir=share) for n in (600, 500, 400)]
    assert versions == ["v000001", "v000002", "v000003"] and current_version(storage) == "v000003"
    # pruned in blob storage and on the share alike: never the current one
    assert list_versions(storage) == ["v000002", "v000003"]
    assert sorted(p.name for p in share.iterdir()) == ["v000002", "v000003"]
    for version in ("v000002", "v000003"):
        folder = share / version
        blobs = folder_sizes(storage, version)
        for name in FILES:
            if name in blobs:  # every file a reader opens, byte for byte
                assert (folder / name).read_bytes() == storage.get(INDEX, f"{version}/{name}"), name
        assert json.loads((folder / "manifest.json").read_text()) == storage.get_json(INDEX, f"{version}/manifest.json")
        assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_a_mirror_cut_short_leaves_no_manifest_and_no_half_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ids.npy").write_bytes(b"x" * 1000)
    (src / "manifest.json").write_text("{}")
    share = tmp_path / "share"
    files = {"ids.npy": src / "ids.npy", "manifest.json": src / "manifest.json", "labels.npy": src / "missing.npy"}
    with pytest.raises(FileNotFoundError):
        mirror_version(share, "v000001", files)
    written = sorted(p.name for p in (share / "v000001").iterdir())
    assert written == ["ids.npy"]  # the manifest comes last: a folder without one is not complete
    mirror_version(share, "v000001", {"ids.npy": src / "ids.npy", "manifest.json": src / "manifest.json"})
    assert sorted(p.name for p in (share / "v000001").iterdir()) == ["ids.npy", "manifest.json"]
    with pytest.raises(ValueError):
        mirror_version(share, "v000002", {"../escape": src / "ids.npy"})


# --- the query side -------------------------------------------------------------------------------------


def test_a_version_on_the_mount_is_opened_in_place_never_downloaded(tmp_path: Path, pixels) -> None:  # type: ignore[no-untyped-def]
    share = tmp_path / "share"
    version = publish(LocalStorage(tmp_path / "blobs"), _build(pixels), share_dir=share)
    remote = RemoteStorage(tmp_path / "blobs")
    cache = tmp_path / "cache"
    loaded = load_version(remote, version, cache, mount=share)
    assert remote.downloaded == []
    assert remote.calls["list"] == 1  # one listing gives every file's size (no per-file lookups)
    assert loaded.mapped is not None and loaded.mapped.is_relative_to(share)  # the lists mapped from the share
    assert not cache.exists() or not any(cache.rglob("*.npy"))
    _same_answers(loaded, load_version(LocalStorage(tmp_path / "blobs"), version, tmp_path / "c2"), pixels[0][:5])


def test_a_file_whose_size_differs_from_the_blob_is_downloaded(tmp_path: Path, pixels) -> None:  # type: ignore[no-untyped-def]
    share = tmp_path / "share"
    version = publish(LocalStorage(tmp_path / "blobs"), _build(pixels), share_dir=share)
    with open(share / version / "ids.npy", "ab") as fh:  # a stale or damaged copy
        fh.write(b"\0")
    (share / version / "clusters.npy").unlink()  # and a missing one
    remote = RemoteStorage(tmp_path / "blobs")
    loaded = load_version(remote, version, tmp_path / "cache", mount=share)
    assert sorted(remote.downloaded) == [f"{version}/clusters.npy", f"{version}/ids.npy"]
    blob = tmp_path / "blobs" / "index" / version / "ids.npy"
    assert (tmp_path / "cache" / version / "ids.npy").read_bytes() == blob.read_bytes()
    _same_answers(loaded, load_version(LocalStorage(tmp_path / "blobs"), version, tmp_path / "c2"), pixels[0][:5])


def test_without_a_mount_a_file_is_downloaded_once_and_a_partial_one_again(tmp_path: Path, pixels) -> None:  # type: ignore[no-untyped-def]
    version = publish(LocalStorage(tmp_path / "blobs"), _build(pixels))
    remote, cache = RemoteStorage(tmp_path / "blobs"), tmp_path / "cache"
    present = folder_sizes(remote, version)
    load_version(remote, version, cache)
    assert sorted(remote.downloaded) == sorted(f"{version}/{n}" for n in FILES if n in present)
    remote.downloaded.clear()
    load_version(remote, version, cache)
    assert remote.downloaded == []  # the cache is used
    ids = cache / version / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:100])  # what a download killed half-way would have left without a rename
    path = version_file(remote, version, "ids.npy", mount=None, cache_dir=cache)
    assert path == ids and remote.downloaded == [f"{version}/ids.npy"]
    assert ids.stat().st_size == present["ids.npy"]
    assert version_file(remote, version, "no-such.npy", mount=None, cache_dir=cache) is None


def test_prune_cache_keeps_the_served_folders_and_frees_the_rest(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for version, size in (("v000001", 3000), ("v000002", 500), ("v000003", 700)):
        (cache / version).mkdir(parents=True)
        (cache / version / "ids.npy").write_bytes(b"x" * size)
        (cache / version / "labels.npy").write_bytes(b"y" * 10)
    (cache / "heads").mkdir()  # not a version folder: never touched
    (cache / "heads" / "x").write_bytes(b"z")
    assert prune_cache(cache, {"v000002", "v000003"}) == 3010
    assert sorted(p.name for p in cache.iterdir()) == ["heads", "v000002", "v000003"]
    assert prune_cache(cache, {"v000002", "v000003"}) == 0
    assert prune_cache(tmp_path / "absent", set()) == 0


def test_live_index_prunes_downloads_of_versions_it_no_longer_serves(tmp_path: Path, pixels) -> None:  # type: ignore[no-untyped-def]
    blobs = tmp_path / "blobs"
    v1 = publish(LocalStorage(blobs), _build(pixels, 600))
    settings = make_settings(tmp_path / "data", index_refresh_seconds=0)
    live = LiveIndex(settings, RemoteStorage(blobs))
    cache = settings.data_dir / "cache" / "index"
    assert live.get().manifest.version == v1 and (cache / v1 / "index.faiss").is_file()
    v2 = publish(LocalStorage(blobs), _build(pixels, 500))
    served = live.get()
    assert served.manifest.version == v2 and served.count == 500
    assert sorted(p.name for p in cache.iterdir()) == sorted(served_folders(served.manifest)) == [v2]


def test_live_index_opens_from_the_mount_the_settings_name(tmp_path: Path, pixels) -> None:  # type: ignore[no-untyped-def]
    blobs, share = tmp_path / "blobs", tmp_path / "share"
    publish(LocalStorage(blobs), _build(pixels), share_dir=share)
    settings = make_settings(tmp_path / "data", index_mount=share)
    remote = RemoteStorage(blobs)
    index = LiveIndex(settings, remote).get()
    assert remote.downloaded == [] and index.mapped is not None and index.mapped.is_relative_to(share)
