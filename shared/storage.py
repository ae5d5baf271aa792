"""Blob-style storage: named containers of named blobs with string metadata.

``LocalStorage`` keeps containers as folders under one root and is the default;
``AzureBlobStorage`` is the same interface over Azure Blob Storage (connection string, or account
URL with ``DefaultAzureCredential``). Both give atomic whole-blob writes, create-if-absent
(``overwrite=False``), lexical listing and string metadata; :func:`open_storage` picks one.

Besides the app's own containers (``CONTAINERS``, each behind the settings' prefix), a *source*
container holds a user's images that are registered in place (``clusterlens ingest --container``).
It is addressed by its real name (no prefix; on the local backend a folder under the storage root),
and only read: :meth:`Storage.check_source`, :meth:`Storage.list_source`, :meth:`Storage.get_source`.
There is no way to write or delete in one, so nothing the app does can remove a user's original.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from shared.errors import BadRequest, ClusterlensError, NotFound

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

UPLOADS = "uploads"
EMBEDDINGS = "embeddings"
INDEX = "index"
LABELS = "labels"
QUARANTINE = "quarantine"
REPORTS = "reports"
MODELS = "models"  # trained artefacts (projection heads), versioned
JOBS = "jobs"  # job records: status, progress, timings, errors
CONTAINERS = (UPLOADS, EMBEDDINGS, INDEX, LABELS, QUARANTINE, REPORTS, MODELS, JOBS)

_NAME_RE = re.compile(r"^[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*$")
_META_DIR = ".metadata"
# Azure's container rule: 3-63 of lowercase letters, digits and single hyphens, a letter or digit at each end.
_CONTAINER_RE = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_PLATFORM_CONTAINERS = ("azure-webjobs-", "app-package-")  # the Functions host's own containers


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


def check_source_blob_name(name: str) -> str:
    """Validate the name of a user's blob read in place: any name Blob Storage allows, as long as it
    stays inside its container as a path (no empty, ``.`` or ``..`` segment, no ``\\``, no control
    character, at most 1024 characters).

    Raises:
        ValueError: if it is not such a name.
    """
    if (
        not name
        or len(name) > 1024
        or "\\" in name
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise ValueError(f"blob name not readable in place: {name[:200]!r}")
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
    def sizes(self, container: str, prefix: str) -> dict[str, int]:
        """``{name: size in bytes}`` of the blobs starting with ``prefix``: one listing (Blob Storage returns
        sizes with names), where a size or existence check per blob would be one request each."""

    @abstractmethod
    def delete(self, container: str, name: str) -> bool:
        """Delete a blob and its metadata. Returns whether it existed."""

    def delete_many(self, container: str, names: Sequence[str]) -> int:
        """Delete blobs, as few requests as the store allows (Blob Storage: batches of 256); missing
        ones are skipped. Returns how many were deleted (where the store says)."""
        return sum(self.delete(container, name) for name in names)

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

    prefix: str = ""

    def check_source(self, container: str) -> str:
        """Validate a source container (a user's images, registered in place) and check that it exists.

        Its name is the real one (no prefix). The app's own containers (with or without the prefix,
        any name starting with a non-empty prefix, and the Functions host's) are refused.

        Raises:
            BadRequest: a name Blob Storage does not allow, or one of the app's own containers.
            NotFound: no such container.
        """
        if not isinstance(container, str) or not _CONTAINER_RE.match(container):
            raise BadRequest(
                f"invalid container name {str(container)[:80]!r}: 3-63 lowercase letters, digits and single hyphens",
                code="invalid_container",
            )
        own = container in CONTAINERS or any(container == f"{self.prefix}{c}" for c in CONTAINERS)
        if own or (self.prefix and container.startswith(self.prefix)) or container.startswith(_PLATFORM_CONTAINERS):
            raise BadRequest(
                f"{container!r} is one of clusterlens's own containers, not a source of images",
                code="own_container",
            )
        if not self._source_exists(container):
            raise NotFound(f"no container named {container!r}", code="container_not_found")
        return container

    @abstractmethod
    def _source_exists(self, container: str) -> bool:
        """Whether a source container exists (its name already checked)."""

    @abstractmethod
    def list_source(self, container: str, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(name, size in bytes) of every blob in a source container starting with ``prefix``, in lexical order.

        Names are as the container has them: check them (:func:`check_source_blob_name`) before reading.
        """

    @abstractmethod
    def get_source(self, container: str, name: str) -> bytes:
        """Read a whole blob of a source container.

        Raises:
            BlobNotFound: if it does not exist.
            ValueError: if the name cannot be read in place (:func:`check_source_blob_name`).
        """

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

    def sizes(self, container: str, prefix: str) -> dict[str, int]:
        base = self._container_dir(container)
        out = {}
        for name in self.list(container, prefix):
            try:
                out[name] = (base / name).stat().st_size
            except FileNotFoundError:  # deleted since it was listed
                continue
        return out

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

    def _source_dir(self, container: str) -> Path:
        if not _CONTAINER_RE.match(container):
            raise ValueError(f"invalid container name: {container!r}")
        return self.root / container

    def _source_exists(self, container: str) -> bool:
        return self._source_dir(container).is_dir()

    def list_source(self, container: str, prefix: str = "") -> Iterator[tuple[str, int]]:
        base = self._source_dir(container)
        start = base / prefix.rsplit("/", 1)[0] if "/" in prefix else base
        if prefix.startswith("/") or "\\" in prefix or ".." in prefix.split("/") or not start.is_dir():
            return  # nothing outside the container's folder
        found = []
        for dirpath, dirnames, filenames in os.walk(start):  # symlinked folders are not followed
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            for fn in filenames:
                name = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                if fn.startswith(".") or not name.startswith(prefix):
                    continue
                try:
                    found.append((name, os.stat(os.path.join(dirpath, fn)).st_size))
                except OSError:  # gone since the walk saw it
                    continue
        yield from sorted(found)

    def get_source(self, container: str, name: str) -> bytes:
        try:
            return (self._source_dir(container) / check_source_blob_name(name)).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"{container}/{name} not found") from None


class StorageUnavailable(ClusterlensError):
    """The storage account cannot be reached, or refuses us."""

    code = "storage_unavailable"
    status = 503


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


_META_SAFE = " !#$&'()*+,-./:;=?@[]^_`{|}~"  # printable ASCII kept as is; the rest percent-encoded


def _encode_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata values as Azure takes them (ASCII header values): percent-encode everything else."""
    out = {}
    for key, value in metadata.items():
        if not key.isidentifier():
            raise ValueError(f"metadata keys must be identifiers: {key!r}")
        out[key] = quote(str(value), safe=_META_SAFE)
    return out


class AzureBlobStorage(Storage):
    """Containers in an Azure Storage account (or Azurite).

    Whole-blob writes are atomic in Blob Storage (a single put, or a block list committed at
    once); ``overwrite=False`` is a conditional put (``If-None-Match: *``), so create-if-absent
    holds between processes and machines. Files are streamed in blocks both ways.

    Args:
        connection_string: an account connection string (Azurite's, or one with a key or SAS).
        account_url: ``https://<account>.blob.core.windows.net``, used with ``credential``
            (``DefaultAzureCredential`` when None: managed identity in Azure, your login locally).
        container_prefix: prepended to every container name.
        create_containers: create missing containers (needs the right to; skipped when refused).
    """

    def __init__(
        self,
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
        container_prefix: str = "",
        create_containers: bool = True,
    ):
        from azure.storage.blob import BlobServiceClient

        # Beyond 8 MiB a blob goes up in 4 MiB blocks, committed at once (still atomic for readers).
        sizes: dict[str, Any] = {"max_single_put_size": 8 * 1024 * 1024, "max_block_size": 4 * 1024 * 1024}
        if connection_string:
            self.service = BlobServiceClient.from_connection_string(connection_string, **sizes)
        elif account_url:
            if credential is None:
                from azure.identity import DefaultAzureCredential

                credential = DefaultAzureCredential()
            self.service = BlobServiceClient(account_url, credential=credential, **sizes)
        else:
            raise ValueError("AzureBlobStorage needs a connection string or an account URL")
        self.prefix = container_prefix
        self._no_batch = False  # set once the store refuses a batch request (Azurite)
        self._clients = {c: self.service.get_container_client(f"{container_prefix}{c}") for c in CONTAINERS}
        if create_containers:
            self._create_containers()

    def _create_containers(self) -> None:
        """Create missing containers; also the first contact with the account, so it fails fast and clearly.

        Raises:
            StorageUnavailable: if the account cannot be reached or the credential is refused.
        """
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceExistsError,
            ServiceRequestError,
        )

        for client in self._clients.values():
            try:
                client.create_container(retry_total=0)  # fail fast at start; jobs and triggers are retried
            except ResourceExistsError:
                pass
            except ClientAuthenticationError as exc:
                raise StorageUnavailable(
                    f"Azure Storage at {self.service.url} refused the credential: {_first_line(exc)}"
                ) from None
            except HttpResponseError as exc:  # e.g. 403 with data-plane rights only: infra made them
                log.info("not creating container %s: %s", client.container_name, exc.reason)
            except ServiceRequestError as exc:
                raise StorageUnavailable(
                    f"cannot reach Azure Storage at {self.service.url}: {_first_line(exc)}"
                ) from None

    def _container(self, container: str) -> Any:
        try:
            return self._clients[container]
        except KeyError:
            raise ValueError(f"unknown container: {container!r}") from None

    def _blob(self, container: str, name: str) -> Any:
        return self._container(container).get_blob_client(check_blob_name(name))

    def put(
        self,
        container: str,
        name: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        overwrite: bool = True,
    ) -> bool:
        from azure.core.exceptions import ResourceExistsError

        blob = self._blob(container, name)
        try:
            blob.upload_blob(
                data, overwrite=overwrite, metadata=_encode_metadata(metadata) if metadata is not None else None
            )
        except ResourceExistsError:
            return False
        return True

    def get(self, container: str, name: str) -> bytes:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return bytes(self._blob(container, name).download_blob().readall())
        except ResourceNotFoundError:
            raise BlobNotFound(f"{container}/{name} not found") from None

    def exists(self, container: str, name: str) -> bool:
        return bool(self._blob(container, name).exists())

    def list(self, container: str, prefix: str = "") -> Iterator[str]:
        # Blob Storage lists in lexical (UTF-8 byte) order, page by page.
        yield from self._container(container).list_blob_names(name_starts_with=prefix or None)

    def sizes(self, container: str, prefix: str) -> dict[str, int]:
        blobs = self._container(container).list_blobs(name_starts_with=prefix or None)
        return {str(blob.name): int(blob.size) for blob in blobs}

    def delete(self, container: str, name: str) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self._blob(container, name).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError:
            return False
        return True

    def delete_many(self, container: str, names: Sequence[str]) -> int:
        """Blob batch deletes, 256 a request (one request where one delete each would be 256). A store
        that refuses batches (Azurite does not implement them, Azure/Azurite#2509) gets one delete each,
        from then on."""
        if self._no_batch or len(names) < 2:
            return super().delete_many(container, names)
        deleted = 0
        client = self._container(container)
        for start in range(0, len(names), 256):
            chunk = names[start : start + 256]
            try:
                responses = client.delete_blobs(*chunk, delete_snapshots="include", raise_on_any_failure=False)
                deleted += sum(1 for r in responses if r.status_code in (200, 202))
            except Exception as exc:  # noqa: BLE001 - any refusal of the batch itself: fall back, once
                log.info("blob batch delete refused (%s); deleting one blob a request", _first_line(exc))
                self._no_batch = True
                return deleted + super().delete_many(container, names[start:])
        return deleted

    def get_metadata(self, container: str, name: str) -> dict[str, str]:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            props = self._blob(container, name).get_blob_properties()
        except ResourceNotFoundError:
            raise BlobNotFound(f"{container}/{name} not found") from None
        return {str(k): unquote(str(v)) for k, v in (props.metadata or {}).items()}

    def upload_file(self, container: str, name: str, path: Path) -> None:
        with open(path, "rb") as fh:  # streamed in blocks, committed at once
            self._blob(container, name).upload_blob(fh, overwrite=True, max_concurrency=4)

    def download_file(self, container: str, name: str, dest: Path) -> Path:
        from azure.core.exceptions import ResourceNotFoundError

        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:  # streamed to disk, never whole in memory
                self._blob(container, name).download_blob(max_concurrency=4).readinto(fh)
            os.replace(tmp, dest)
        except ResourceNotFoundError:
            raise BlobNotFound(f"{container}/{name} not found") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def _source_exists(self, container: str) -> bool:
        return bool(self.service.get_container_client(container).exists())

    def list_source(self, container: str, prefix: str = "") -> Iterator[tuple[str, int]]:
        # One request per 5,000 names, sizes included: nothing is read to list.
        for blob in self.service.get_container_client(container).list_blobs(name_starts_with=prefix or None):
            yield str(blob.name), int(blob.size or 0)

    def get_source(self, container: str, name: str) -> bytes:
        from azure.core.exceptions import ResourceNotFoundError

        client = self.service.get_blob_client(container, check_source_blob_name(name))
        try:
            return bytes(client.download_blob().readall())
        except ResourceNotFoundError:
            raise BlobNotFound(f"{container}/{name} not found") from None


def open_storage(settings: Settings) -> Storage:
    """The storage backend the settings choose: a local folder, or an Azure Storage account."""
    if settings.storage_backend == "local":
        return LocalStorage(settings.data_dir, settings.container_prefix)
    return AzureBlobStorage(
        connection_string=settings.azure_storage_connection_string,
        account_url=settings.azure_storage_account_url,
        container_prefix=settings.container_prefix,
    )
