"""Versioned artefacts in storage: numbered folders that never change, and a pointer swapped last.

Used by the index (``index/v000007/...``, ``index/CURRENT.json``) and the projection heads
(``models/heads/v000002/...``, ``models/heads/CURRENT.json``). A version is complete once its
``manifest.json`` is written; readers follow the pointer, so they see the old version or the new
one, never half of one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from shared.storage import Storage

POINTER = "CURRENT.json"
_VERSION_RE = re.compile(r"^v(\d{6})/manifest\.json$")


def list_versions(storage: Storage, container: str, prefix: str = "") -> list[str]:
    """Complete (manifest written) versions under ``prefix``, oldest first."""
    found = []
    for name in storage.list(container, prefix + "v"):
        if _VERSION_RE.match(name[len(prefix) :]):
            found.append(name[len(prefix) :].split("/")[0])
    return sorted(found)


def claim_next(storage: Storage, container: str, prefix: str = "") -> str:
    """Reserve the next version number (create-if-absent, so two builders never share one)."""
    existing = [int(v[1:]) for v in list_versions(storage, container, prefix)]
    number = max(existing, default=0) + 1
    while not storage.put_json(
        container, f"{prefix}v{number:06d}/claim.json", {"at": datetime.now(UTC).isoformat()}, overwrite=False
    ):
        number += 1  # another builder took this number
    return f"v{number:06d}"


def read_pointer(storage: Storage, container: str, prefix: str = "") -> str | None:
    """The published version, or None before the first publish."""
    if not storage.exists(container, prefix + POINTER):
        return None
    return str(storage.get_json(container, prefix + POINTER)["version"])


def swap_pointer(storage: Storage, container: str, version: str, prefix: str = "") -> None:
    """Point readers at ``version`` (an atomic replace of one small blob)."""
    storage.put_json(
        container, prefix + POINTER, {"version": version, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    )


def prune(storage: Storage, container: str, keep: int, current: str, prefix: str = "") -> None:
    """Delete the oldest complete versions beyond ``keep``, never the current one."""
    versions = list_versions(storage, container, prefix)
    for old in versions[: max(0, len(versions) - keep)]:
        if old != current:
            for name in list(storage.list(container, f"{prefix}{old}/")):
                storage.delete(container, name)
