"""Search filters: label, labelled or not, predicted class, cluster, predicted ImageNet class, ingest time.

Parsed from any mapping of strings or JSON values (a JSON object, form fields, query parameters),
so every way of calling the search API filters the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.errors import BadRequest

FIELDS = ("label", "labelled", "predicted", "cluster", "imagenet_class", "ingested_after", "ingested_before")


@dataclass(frozen=True)
class SearchFilters:
    """Conditions every result must meet; None means no condition. Times are UTC epoch seconds."""

    label: str | None = None
    labelled: bool | None = None  # True: labelled images only; False: unlabelled only
    predicted: str | None = None  # the label classifier's predicted class
    cluster: int | None = None
    imagenet_class: int | None = None
    ingested_after: int | None = None
    ingested_before: int | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in FIELDS)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None and name.startswith("ingested_"):
                value = datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
            if value is not None:
                out[name] = value
        return out


def parse_filters(raw: Mapping[str, Any] | None) -> SearchFilters:
    """Validate filters.

    Raises:
        BadRequest: (``invalid_filter``) for an unknown field or a value of the wrong kind.
    """
    if raw is None:
        return SearchFilters()
    if not isinstance(raw, Mapping):
        raise BadRequest('"filters" must be an object', code="invalid_filter")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown filter {unknown[0]!r}; filters are {', '.join(FIELDS)}", code="invalid_filter")
    values: dict[str, Any] = {}
    for name in ("label", "predicted"):
        label = raw.get(name)
        if label not in (None, ""):
            if not isinstance(label, str) or len(label) > 200:
                raise BadRequest(f"{name} must be a string of at most 200 characters", code="invalid_filter")
            values[name] = label
    values["labelled"] = _bool(raw.get("labelled"), "labelled")
    for name, upper in (("cluster", 1_000_000), ("imagenet_class", 999)):
        value = _int(raw.get(name), name)
        if value is not None and not 0 <= value <= upper:
            raise BadRequest(f"{name} must be from 0 to {upper}", code="invalid_filter")
        values[name] = value
    for name in ("ingested_after", "ingested_before"):
        values[name] = _time(raw.get(name), name)
    return SearchFilters(**values)


def _bool(value: Any, name: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise BadRequest(f"{name} must be true or false", code="invalid_filter")


def _int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit() and len(value) < 10:
        return int(value)
    raise BadRequest(f"{name} must be a non-negative integer", code="invalid_filter")


def _time(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and len(value) <= 40:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return int(when.timestamp())
    raise BadRequest(f"{name} must be an ISO 8601 time such as 2026-11-22T08:00:00Z", code="invalid_filter")
