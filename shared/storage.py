"""Blob-style storage: named containers of named blobs with string metadata.

``LocalStorage`` keeps containers as folders under one root and is the default. The interface
mirrors Azure Blob Storage (containers, ``/``-separated names, metadata, create-if-absent), so an
Azure implementation can be dropped in by :func:`open_storage` without touching callers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ClusterlensError, NotFound

if TYPE_CHECKING:
    from shared.settings import Settings

UPLOADS = "uploads"
EMBEDDINGS = "embeddings"
INDEX = "index"
LABELS = "labels"
QUARANTINE = "quarantine"
REPORTS = "reports"
MODELS = "models"  # trained artefacts (projection heads), versioned
CONTAINERS = (UPLOADS, EMBEDDINGS, INDEX, LABELS, QUARANTINE, REPORTS, MODELS)

_NAME_RE = re.compile(r"^[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*$")
_META_DIR = ".metadata"


class BlobNotFound(NotFound):
    """A blob that was asked for does not exist."""

    code = "blob_not_found"


def check_blob_name(name: str) -> str:
    """Validate a blob name: ``/``-separated segments of ``[A-Za-z0-9._-]``, no ``.``/``..`` segments.

    Raises:
        ValueError: if the name is empty, absolute, or could escape its container.
    """
    if not _NAME_RE.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise ValueError(f"invalid blob name: {name!r}")
    if name.startswith(_META_DIR) or len(name) > 1024:
        raise ValueError(f"invalid blob name: {name!r}")
    return name


class Storage(ABC):
    """Containers of blobs. Names are validated; containers are the module's ``CONTAINERS``."""

    @abstractmethod
    def put(
        self,
        container: str,
        name: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        overwrite: bool = True,
    ) -> bool:
        """Write a blob atomically; readers see the old blob or the new one, never a part.

        Returns:
            True if written; False if ``overwrite`` is False and the blob already existed.
        """

    @abstractmethod
    def get(self, container: str, name: str) -> bytes:
        """Read a whole blob.

        Raises:
            BlobNotFound: if it does not exist.
        """

    @abstractmethod
    def exists(self, container: str, name: str) -> bool:
        """Whether the blob exists."""

    @abstractmethod
    def list(self, container: str, prefix: str = "") -> Iterator[str]:
        """Blob names in a container starting with ``prefix``, in lexical order."""

    @abstractmethod
    def delete(self, container: str, name: str) -> bool:
        """Delete a blob and its metadata. Returns whether it existed."""

    @abstractmethod
    def get_metadata(self, container: str, name: str) -> dict[str, str]:
        """The blob's metadata.

        Raises:
            BlobNotFound: if the blob does not exist.
        """

    def upload_file(self, container: str, name: str, path: Path) -> None:
        """Copy a local file into a blob (streamed by implementations that can)."""
        self.put(container, name, Path(path).read_bytes())

    def download_file(self, container: str, name: str, dest: Path) -> Path:
        """Copy a blob to a local file, atomically, and return its path."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(dest, self.get(container, name))
        return dest

    def local_path(self, container: str, name: str) -> Path | None:
        """A path on this machine where the blob can be read in place, if there is one."""
        return None

    def get_json(self, container: str, name: str) -> dict[str, Any]:
        """Read a blob holding a JSON object."""
        value = json.loads(self.get(container, name))
        if not isinstance(value, dict):
            raise ValueError(f"{container}/{name} does not hold a JSON object")
        return value

    def put_json(self, container: str, name: str, value: dict[str, Any], *, overwrite: bool = True) -> bool:
        """Write a JSON object as a blob."""
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        return self.put(container, name, data, overwrite=overwrite)


def _atomic_write(path: Path, data: bytes, *, overwrite: bool = True) -> bool:
    """Write to a temp file beside ``path`` then rename (or hard-link when not overwriting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if path exists: an atomic create-if-absent
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class LocalStorage(Storage):
    """Containers as folders under ``root``; metadata as JSON files under ``root/.metadata``."""

    def __init__(self, root: Path, container_prefix: str = ""):
        self.root = Path(root)
        self.prefix = container_prefix
        for container in CONTAINERS:
            self._container_dir(container).mkdir(parents=True, exist_ok=True)

    def _container_dir(self, container: str) -> Path:
        if container not in CONTAINERS:
            raise ValueError(f"unknown container: {container!r}")
        return self.root / f"{self.prefix}{container}"

    def _path(self, container: str, name: str) -> Path:
        return self._container_dir(container) / check_blob_name(name)

    def _meta_path(self, container: str, name: str) -> Path:
        return self.root / _META_DIR / f"{self.prefix}{container}" / (check_blob_name(name) + ".json")

    def put(
        self,
        container: str,
        name: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        overwrite: bool = True,
    ) -> bool:
        path = self._path(container, name)
        if metadata is not None:
            # Metadata first: a blob that exists always has its metadata.
            _atomic_write(self._meta_path(container, name), json.dumps(metadata).encode())
        written = _atomic_write(path, data, overwrite=overwrite)
        return written

    def get(self, container: str, name: str) -> bytes:
        try:
            return self._path(container, name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise BlobNotFound(f"{container}/{name} not found") from None

    def exists(self, container: str, name: str) -> bool:
        return self._path(container, name).is_file()

    def list(self, container: str, prefix: str = "") -> Iterator[str]:
        base = self._container_dir(container)
        # Walk only the folder the prefix points into.
        start = base / prefix.rsplit("/", 1)[0] if "/" in prefix else base
        if not start.is_dir():
            return
        names = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, base)
            for fn in filenames:
                if fn.startswith(".tmp-"):
                    continue
                name = fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/")
                if name.startswith(prefix):
                    names.append(name)
        yield from sorted(names)

    def delete(self, container: str, name: str) -> bool:
        path = self._path(container, name)
        self._meta_path(container, name).unlink(missing_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def get_metadata(self, container: str, name: str) -> dict[str, str]:
        if not self.exists(container, name):
            raise BlobNotFound(f"{container}/{name} not found")
        try:
            value = json.loads(self._meta_path(container, name).read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in value.items()}

    def upload_file(self, container: str, name: str, path: Path) -> None:
        dest = self._path(container, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".part")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def local_path(self, container: str, name: str) -> Path | None:
        path = self._path(container, name)
        return path if path.is_file() else None


def open_storage(settings: Settings) -> Storage:
    """The storage backend the settings choose.

    Raises:
        ClusterlensError: for the ``azure`` backend until it lands.
    """
    if settings.storage_backend == "local":
        return LocalStorage(settings.data_dir, settings.container_prefix)
    raise ClusterlensError(
        "the Azure Blob storage backend is not built yet; set CLUSTERLENS_STORAGE_BACKEND=local",
        code="backend_unavailable",
        status=501,
    )
