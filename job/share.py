"""The publisher's copy of each index version on the ``index`` Azure Files share.

The function app opens published versions from its mount of the share (``CLUSTERLENS_INDEX_MOUNT``,
``shared/index_files.py``) instead of downloading gigabytes into a 2-4 GB instance; the reindex job, which
mounts the same share read-write at ``CLUSTERLENS_INDEX_SHARE_DIR``, writes each version there right
before it writes the version's blob manifest and swaps the pointer, so by the time a reader follows the
pointer the share holds the version. Pruning a version from blob storage removes it from the share too
(:func:`share_pruner`, passed to :func:`shared.versions.prune`).

A reader never trusts a file by its presence alone: it compares its size with the blob's and downloads
anything else. Each file is written to a temporary name, flushed to the share and renamed; the folder's
``manifest.json`` goes last, so a folder with a manifest holds every file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shared.head import HEAD_FILE
from shared.index import FILES

if TYPE_CHECKING:
    from shared.index import ClusterIndex
    from shared.manifests import IndexManifest

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def _copy_durably(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` through a temporary name beside it: written, fsynced, renamed."""
    tmp = dest.with_name(f".tmp-{dest.name}.part")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def mirror_version(share_dir: Path, version: str, files: dict[str, Path]) -> None:
    """Copy one version's files to ``<share_dir>/<version>/<name>``, ``manifest.json`` last.

    What the folder held before (the remains of a builder that died with this version number) is removed
    first: the version was just claimed, so no reader follows a pointer to it yet.

    Args:
        share_dir: the share's mount (``CLUSTERLENS_INDEX_SHARE_DIR``).
        version: the version folder (``v000007``).
        files: file name -> local path of each file of the version (include ``manifest.json``).

    Raises:
        ValueError: a name that is not a plain file name.
        OSError: the share could not be written (the caller decides whether publishing goes on).
    """
    for name in files:
        if not name or "/" in name or name in (".", "..") or name.startswith(".tmp-"):
            raise ValueError(f"not a file name for the index share: {name!r}")
    folder = Path(share_dir) / version
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in sorted(files, key=lambda n: (n == MANIFEST, n)):
        _copy_durably(Path(files[name]), folder / name)
    log.info("mirrored index %s to %s (%d files)", version, folder, len(files))


def mirror_published(
    share_dir: Path, version: str, scratch: Path, built: ClusterIndex, manifest: IndexManifest
) -> None:
    """:func:`mirror_version` of what :func:`job.index_build.publish` uploads that a reader opens: the index
    files (those written in ``scratch``, or the streamed build's own), the projection head, the manifest.

    Raises:
        OSError: the share could not be written. Publishing stops there, before the version's blob
            manifest: the current version (on the share) keeps serving, and the job's retry publishes again.
    """
    files = {name: built.files.get(name, scratch / name) for name in FILES}
    files = {name: path for name, path in files.items() if path.is_file()}
    if built.head is not None:
        files[HEAD_FILE] = built.head.path
        (scratch / "head.json").write_text(json.dumps(built.head.manifest.to_json(), indent=1, sort_keys=True))
        files["head.json"] = scratch / "head.json"
    (scratch / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1, sort_keys=True))
    files[MANIFEST] = scratch / MANIFEST
    mirror_version(share_dir, version, files)


def remove_version(share_dir: Path, version: str) -> None:
    """Delete ``<share_dir>/<version>``: its manifest first (never a folder with a manifest and missing
    files), then the rest. Missing is fine."""
    folder = Path(share_dir) / version
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        log.warning("could not remove %s from the index share; the next prune tries again", folder)


def share_pruner(share_dir: Path | None) -> Callable[[str], None] | None:
    """What :func:`shared.versions.prune` calls with each version it deletes from blob storage (None: no
    share). A share that cannot be written is logged, not raised: the blob prune has happened."""
    if share_dir is None:
        return None

    def remove(version: str) -> None:
        try:
            remove_version(share_dir, version)
        except OSError:
            log.exception("removing index %s from the share failed", version)

    return remove
