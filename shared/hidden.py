"""Images hidden from search by a resolved near-duplicate group (:mod:`shared.duplicates`): one marker
per image, ``labels/hidden/<id>.json``, listed by every search server with the deletions."""

from __future__ import annotations

from shared.storage import LABELS, Storage

HIDDEN_PREFIX = "hidden/"


def hidden_ids(storage: Storage) -> set[str]:
    """Ids hidden by resolved groups (one listing, no reads)."""
    return {
        name[len(HIDDEN_PREFIX) : -len(".json")]
        for name in storage.list(LABELS, HIDDEN_PREFIX)
        if name.endswith(".json")
    }
