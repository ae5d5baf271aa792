"""Versioned artefacts in storage: numbered folders that never change, and a pointer swapped last.

Used by the index (``index/v000007/...``, ``index/CURRENT.json``) and the projection heads
(``models/heads/v000002/...``, ``models/heads/CURRENT.json``). A version is complete once its
``manifest.json`` is written; readers follow the pointer, so they see the old version or the new
one, never half of one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from shared.storage import Storage

POINTER = "CURRENT.json"
MANIFEST = "manifest.json"
CLAIM = "claim.json"
# A version claimed this long ago and still without a manifest was left by a builder that died: no
# job runs this long (the Container Apps job's replica timeout is 2 hours).
ABANDONED_AFTER = timedelta(hours=6)
_VERSION_RE = re.compile(r"^v(\d{6})/manifest\.json$")
_FOLDER_RE = re.compile(r"^(v\d{6})/(.+)$")


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


def prune(
    storage: Storage,
    container: str,
    keep: int,
    current: str,
    prefix: str = "",
    *,
    now: datetime | None = None,
    referenced: Callable[[Storage, list[str]], set[str]] | None = None,
    on_delete: Callable[[str], None] | None = None,
) -> None:
    """Delete the oldest complete versions beyond ``keep``, never the current one, and what a builder
    that died left: a version without a manifest whose claim is ``ABANDONED_AFTER`` old, or that has
    no claim (a prune cut short).

    A version's manifest is deleted first, so a prune cut short (the worker killed) leaves files
    that are no longer listed as a complete version, never a listed version that lacks files; its
    claim goes next, so the next prune clears what is left.

    ``on_delete`` is called with each version deleted (the index's copies on the Azure Files share go
    with their blobs, by the same rule: never the current version, never one a kept version is made of).
    """
    versions = list_versions(storage, container, prefix)
    kept = [v for v in versions[max(0, len(versions) - keep) :]] + [current]
    # folders a kept version is made of (an index's segments): ``referenced`` names them
    needed = referenced(storage, kept) if referenced else set()
    for old in versions[: max(0, len(versions) - keep)]:
        if old != current and old not in needed:
            _delete_version(storage, container, f"{prefix}{old}/")
            if on_delete is not None:
                on_delete(old)
    pointed = read_pointer(storage, container, prefix)
    for old in _abandoned(storage, container, prefix, (now or datetime.now(UTC)) - ABANDONED_AFTER):
        if old not in (current, pointed):
            _delete_version(storage, container, f"{prefix}{old}/")
            if on_delete is not None:
                on_delete(old)


def _delete_version(storage: Storage, container: str, folder: str) -> None:
    storage.delete(container, folder + MANIFEST)  # first: from here on the version is not complete
    storage.delete(container, folder + CLAIM)  # then: what is left is swept by the next prune
    for name in list(storage.list(container, folder)):
        storage.delete(container, name)


def _abandoned(storage: Storage, container: str, prefix: str, claimed_before: datetime) -> list[str]:
    """Version folders without a manifest that no live builder can be writing: claimed before
    ``claimed_before``, or without a claim (a builder claims before writing anything else)."""
    files: dict[str, set[str]] = {}
    for name in storage.list(container, prefix + "v"):
        match = _FOLDER_RE.match(name[len(prefix) :])
        if match:
            files.setdefault(match.group(1), set()).add(match.group(2))
    out = []
    for version, names in sorted(files.items()):
        if MANIFEST in names:
            continue
        if CLAIM in names:
            try:
                at = datetime.fromisoformat(str(storage.get_json(container, f"{prefix}{version}/{CLAIM}")["at"]))
            except Exception:  # noqa: BLE001 - an unreadable claim tells nothing: keep the folder
                continue
            if (at if at.tzinfo else at.replace(tzinfo=UTC)) >= claimed_before:
                continue
        out.append(version)
    return out
