"""Where the query side reads a published index version's files from: opened in place, never copied
when it can be helped (a Flex Consumption instance has 2-4 GB of memory and a small disk, and a
10M-image version is about 10 GB).

For each file of a version folder, in this order:

1. the blob itself, when storage is local (:meth:`Storage.local_path`);
2. ``<mount>/<folder>/<name>``, the folder's copy on the ``index`` Azure Files share (the function app
   mounts it at ``CLUSTERLENS_INDEX_MOUNT``; the reindex job wrote it there before swapping the pointer,
   ``job/share.py``), when it has the blob's size;
3. ``<cache_dir>/<folder>/<name>``, downloaded once (to a temporary name, then renamed, so a download
   killed half-way never leaves a file that a later start trusts), when it has the blob's size.

The blob sizes come from one listing of the folder (:func:`folder_sizes`): Blob Storage returns the size
of every blob with its name, so a folder of a dozen files costs one request, where a properties lookup per
file costs a dozen (and the optional files' existence checks it replaces were nine). The manifest could
carry the sizes instead (no request at all), but a version made of segments reads other versions' folders,
whose sizes its manifest does not hold, and versions published before the sizes were recorded have none;
one listing a folder works for every version, at one request in a load that maps gigabytes.

The download cache is pruned after each successful load (:func:`prune_cache`): only the folders of the
version now served stay.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from shared.storage import INDEX, Storage

if TYPE_CHECKING:
    from shared.manifests import IndexManifest

log = logging.getLogger(__name__)
_VERSION_FOLDER = re.compile(r"^v\d+$")


def folder_sizes(storage: Storage, folder: str) -> dict[str, int]:
    """``{file name: bytes}`` of one version folder of the index container (one listing request)."""
    prefix = f"{folder}/"
    return {name[len(prefix) :]: size for name, size in storage.sizes(INDEX, prefix).items()}


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:  # missing, or the share is not reachable: not usable
        return False


def version_file(
    storage: Storage,
    folder: str,
    name: str,
    *,
    mount: Path | None,
    cache_dir: Path,
    sizes: Mapping[str, int] | None = None,
) -> Path | None:
    """A local path to read ``<folder>/<name>`` of the index container from (see the module docstring).

    Args:
        folder: the version folder (``v000007``).
        name: the file (``index.faiss``).
        mount: the folder holding versions as ``<version>/<file>`` (the share's mount), or None.
        cache_dir: where downloads go, as ``<cache_dir>/<folder>/<name>``.
        sizes: :func:`folder_sizes` of ``folder`` when already listed (else listed here).

    Returns:
        the path, or None when the version has no such blob (an optional file an older version lacks).
    """
    if sizes is None:
        sizes = folder_sizes(storage, folder)
    size = sizes.get(name)
    if size is None:
        return None
    blob = f"{folder}/{name}"
    local = storage.local_path(INDEX, blob)
    if local is not None:
        return local
    if mount is not None:
        shared = Path(mount) / folder / name
        if _has_size(shared, size):
            return shared
        if shared.exists():
            log.warning("%s on the index share is not the blob's %d bytes: downloading it", shared, size)
    cached = Path(cache_dir) / folder / name
    if _has_size(cached, size):
        return cached
    return storage.download_file(INDEX, blob, cached)  # to a temporary name, then renamed


def served_folders(manifest: IndexManifest) -> set[str]:
    """The version folders a loaded version reads: its segments' folders, and its own."""
    folders = {str(seg["version"]) for seg in manifest.segments if seg.get("version")}
    if manifest.version:
        folders.add(manifest.version)
    return folders


def prune_cache(cache_dir: Path, keep: set[str]) -> int:
    """Delete the downloaded version folders under ``cache_dir`` that are not in ``keep``.

    Only folders named like versions (``v000007``) are touched. A file of a deleted folder that this process
    still has mapped stays readable until it is unmapped (POSIX unlink).

    Returns:
        the bytes freed.
    """
    freed = 0
    root = Path(cache_dir)
    if not root.is_dir():
        return 0
    for child in root.iterdir():
        if child.name in keep or not _VERSION_FOLDER.match(child.name) or not child.is_dir():
            continue
        size = sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
        shutil.rmtree(child, ignore_errors=True)
        if not child.exists():
            freed += size
            log.info("removed cached index folder %s (%d bytes)", child.name, size)
    return freed
