"""Labels: an append-only log in the labels container, and the label set (the user's class list).

Layout in the ``labels`` container::

    log/20261122T081502123456Z-3f9c2a1b.json   one submitted batch: who, when, label set, entries
    sets/v000002.json                           the class list; the highest version is current

A batch is written once under a new name (create-if-absent) and never changed, so nothing a later
writer does can lose it; the current label of an image is its latest entry (batches in name order,
which is time order, then entry order). A label given at ingest (folder name, blob metadata,
dataset) counts as the image's first entry: the jobs read those from the embedding shards' ``label``
column as they stream them (``job.passes``), not one catalogue record per image. Label sets are
immutable numbered blobs too: a change writes the next number, so two concurrent changes cannot
overwrite each other.

The class list is defined by the user: configured (``CLUSTERLENS_LABEL_CLASSES``), set over HTTP
(``PUT /api/label-set``), or, when none exists, created from the first labels: those given at
ingest, or with none of those, the first submitted batch.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from shared.errors import BadRequest, Conflict
from shared.storage import LABELS, Storage

log = logging.getLogger(__name__)

LOG_PREFIX = "log/"
SETS_PREFIX = "sets/"
_SET_RE = re.compile(r"^sets/v(\d{6})\.json$")
_USER_RE = re.compile(r"^[A-Za-z0-9@._ +-]{1,64}$")
MAX_CLASSES = 1000
# How the labelling queue can be ordered: random, or most uncertain first (see job.active_learning).
Strategy = Literal["random", "least_confidence", "margin", "entropy"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def check_user(user: str | None) -> str:
    """Who labels: 1-64 characters of letters, digits, ``@._ +-``; default ``anonymous``.

    Raises:
        BadRequest: for anything else.
    """
    if user is None or user == "":
        return "anonymous"
    if not isinstance(user, str) or not _USER_RE.match(user):
        raise BadRequest("user is 1-64 letters, digits or @._ +-", code="invalid_user")
    return user


def clean_label(label: str | None) -> str | None:
    """A label as stored: trimmed, printable, at most 100 characters; empty means none.

    Raises:
        BadRequest: if it is longer or holds control characters.
    """
    if label is None:
        return None
    text = label.strip()
    if len(text) > 100 or not text.isprintable():
        raise BadRequest("a label is at most 100 printable characters", code="invalid_label")
    return text or None


def check_class_name(name: Any) -> str:
    """A class name: trimmed, 1-100 printable characters.

    Raises:
        BadRequest: otherwise.
    """
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 100 or not name.strip().isprintable():
        raise BadRequest("a label is 1-100 printable characters", code="invalid_label")
    return name.strip()


@dataclass(frozen=True)
class LabelEntry:
    """One label given to one image."""

    id: str
    label: str
    user: str
    at: str  # ISO 8601 UTC
    label_set: int  # the label set version it was given under (0: at ingest, before any set)
    batch: str  # the log blob it came from ("ingest" for ingest labels)


@dataclass(frozen=True)
class LabelSet:
    """The class list images may be labelled with."""

    version: int
    classes: list[str]
    created_at: str
    created_by: str
    source: str  # "configured", "labels" (created from the first labels) or "user" (changed by a user)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "classes": self.classes,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "source": self.source,
        }


def _now() -> datetime:
    return datetime.now(UTC)


class LabelLog:
    """Reads and appends the label log. Batches already read are cached (they never change), so a
    long-lived reader pays only for new ones.
    """

    def __init__(self, storage: Storage):
        self.storage = storage
        self._batches: dict[str, list[LabelEntry]] = {}
        self._lock = threading.Lock()

    # -- label sets ---------------------------------------------------------------------------

    def label_set(self) -> LabelSet | None:
        """The current label set, or None before one is defined."""
        versions = [int(m.group(1)) for n in self.storage.list(LABELS, SETS_PREFIX) if (m := _SET_RE.match(n))]
        if not versions:
            return None
        raw = self.storage.get_json(LABELS, f"{SETS_PREFIX}v{max(versions):06d}.json")
        return LabelSet(**{k: raw[k] for k in LabelSet.__dataclass_fields__})

    def define(self, classes: Sequence[str], *, user: str = "anonymous", source: str = "user") -> LabelSet:
        """Write a new label set version with these classes (order kept, duplicates dropped).

        Labels of classes left out stay in the log but are not used for training.

        Raises:
            BadRequest: no classes, too many, or a bad name.
        """
        names = list(dict.fromkeys(check_class_name(c) for c in classes))
        if not names:
            raise BadRequest("a label set needs at least one class", code="invalid_label_set")
        if len(names) > MAX_CLASSES:
            raise BadRequest(f"a label set has at most {MAX_CLASSES} classes", code="invalid_label_set")
        current = self.label_set()
        number = (current.version if current else 0) + 1
        while True:
            made = LabelSet(number, names, _now().isoformat(timespec="seconds"), check_user(user), source)
            if self.storage.put_json(LABELS, f"{SETS_PREFIX}v{number:06d}.json", made.to_json(), overwrite=False):
                log.info("label set v%d: %d classes (%s)", number, len(names), source)
                return made
            number += 1  # someone else wrote this number first

    def ensure_label_set(
        self, configured: Sequence[str], first_labels: Iterable[str], *, user: str = "anonymous"
    ) -> LabelSet:
        """The current label set, creating it if there is none: from ``configured`` when given,
        else from ``first_labels`` (the labels given at ingest, or the first submitted batch).

        Raises:
            Conflict: no label set, none configured and no labels to create one from.
        """
        current = self.label_set()
        if current is not None:
            return current
        if configured:
            return self.define(configured, user=user, source="configured")
        names = sorted({n for n in first_labels if n})
        if not names:
            raise Conflict(
                "there is no label set yet: define the classes (PUT /api/label-set) or submit labels",
                code="no_label_set",
            )
        return self.define(names, user=user, source="labels")

    # -- the log ------------------------------------------------------------------------------

    def append(self, entries: Sequence[tuple[str, str]], *, user: str, label_set: int) -> str:
        """Write one batch of (image id, label) entries; returns its blob name. Callers validate."""
        at = _now()
        name = f"{LOG_PREFIX}{at.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.json"
        body = {
            "at": at.isoformat(timespec="microseconds"),
            "user": user,
            "label_set": label_set,
            "entries": [{"id": i, "label": lab} for i, lab in entries],
        }
        self.storage.put_json(LABELS, name, body, overwrite=False)
        with self._lock:
            self._batches[name] = self._parse(name, body)
        return name

    @staticmethod
    def _parse(name: str, body: dict[str, Any]) -> list[LabelEntry]:
        return [
            LabelEntry(
                id=str(e["id"]),
                label=str(e["label"]),
                user=str(body.get("user", "anonymous")),
                at=str(body["at"]),
                label_set=int(body.get("label_set", 0)),
                batch=name,
            )
            for e in body.get("entries", [])
        ]

    def refresh(self) -> int:
        """Read batches written since the last call (by anyone). Returns how many were new."""
        names = [n for n in self.storage.list(LABELS, LOG_PREFIX) if n.endswith(".json")]
        new = [n for n in names if n not in self._batches]
        read = {n: self._parse(n, self.storage.get_json(LABELS, n)) for n in new}
        with self._lock:
            self._batches.update(read)
        return len(new)

    def entries(self) -> list[LabelEntry]:
        """Every entry read so far, oldest first."""
        with self._lock:
            names = sorted(self._batches)
            return [e for n in names for e in self._batches[n]]

    def batches(self) -> int:
        """Number of batches read so far."""
        return len(self._batches)

    def current(self, ingest: dict[str, str] | None = None) -> dict[str, LabelEntry]:
        """Each labelled image's latest entry.

        Args:
            ingest: optional image id -> label given at ingest, taken as each image's first entry.
        """
        out: dict[str, LabelEntry] = {}
        for image_id, label in (ingest or {}).items():
            out[image_id] = LabelEntry(image_id, label, "ingest", "", 0, "ingest")
        for entry in self.entries():
            out[entry.id] = entry
        return out
