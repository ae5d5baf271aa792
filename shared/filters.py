"""Search filters: label, labelled or not, predicted class, cluster, predicted ImageNet class, ingest time.

One pydantic model (:class:`Filters`) reads them from any mapping of strings or JSON values (a JSON
object, form fields, query parameters), so every way of calling the search API filters the same
way, and the API's schema (JSON and form) is generated from it. An empty value means no condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

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


def empty_as_none(value: Any) -> Any:
    return None if value == "" else value


def _bool(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if value is None or isinstance(value, bool):
        return value
    raise ValueError("must be true or false")


def as_int(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit() and len(value) < 10:
        return int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError("must be a non-negative integer")


def _time(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= 40:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())
    raise ValueError("must be an ISO 8601 time such as 2026-11-22T08:00:00Z")


Text = Annotated[Annotated[str, Field(max_length=200)] | None, BeforeValidator(empty_as_none)]
Flag = Annotated[bool | None, BeforeValidator(_bool), BeforeValidator(empty_as_none)]
Time = Annotated[
    int | None,
    BeforeValidator(_time),
    BeforeValidator(empty_as_none),
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}),
]


Cluster = Annotated[
    Annotated[int, Field(ge=0, le=1_000_000)] | None, BeforeValidator(as_int), BeforeValidator(empty_as_none)
]
ImagenetClass = Annotated[
    Annotated[int, Field(ge=0, le=999)] | None, BeforeValidator(as_int), BeforeValidator(empty_as_none)
]


class Filters(BaseModel):
    """Only results meeting every condition; an empty value (or null) means any."""

    model_config = ConfigDict(extra="forbid")
    label: Text = Field(default=None, description="the image's label")
    labelled: Flag = Field(default=None, description="true: labelled images only; false: unlabelled only")
    predicted: Text = Field(default=None, description="the label classifier's predicted class")
    cluster: Cluster = Field(default=None, description="the image's cluster")
    imagenet_class: ImagenetClass = Field(default=None, description="predicted top-1 ImageNet class")
    ingested_after: Time = Field(default=None, description="ingested at or after (ISO 8601)")
    ingested_before: Time = Field(default=None, description="ingested before (ISO 8601)")

    def to_filters(self) -> SearchFilters:
        return SearchFilters(**self.model_dump())


def parse_filters(raw: Mapping[str, Any] | None) -> SearchFilters:
    """Validate filters given as a mapping of JSON values or of strings (form fields, query parameters).

    Raises:
        BadRequest: (``invalid_filter``) for an unknown field or a value of the wrong kind.
    """
    if raw is None:
        return SearchFilters()
    if not isinstance(raw, Mapping):
        raise BadRequest('"filters" must be an object', code="invalid_filter")
    try:
        return Filters.model_validate(dict(raw)).to_filters()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown filter {name!r}; filters are {', '.join(FIELDS)}"
        else:
            message = f"{name}: {first['msg'].removeprefix('Value error, ')}"
        raise BadRequest(message, code="invalid_filter") from None


def form_fields() -> dict[str, dict[str, Any]]:
    """The filters as multipart form fields (text, as forms send them; empty means any), for the schema."""
    out: dict[str, dict[str, Any]] = {}
    for name, spec in Filters.model_json_schema()["properties"].items():
        options = [s for s in spec.get("anyOf", [spec]) if s.get("type") != "null"]
        kind = options[0]
        if kind.get("type") == "boolean":
            field: dict[str, Any] = {"type": "string", "enum": ["", "true", "false"]}
        elif kind.get("type") == "integer":
            field = {"type": "string", "pattern": _digits(int(kind["maximum"]))}
        elif kind.get("format") == "date-time":
            field = {"anyOf": [kind, {"type": "string", "maxLength": 0}]}
        else:
            field = {"type": "string", "maxLength": kind["maxLength"]}
        out[name] = {**field, "description": spec.get("description", "")}
    return out


def _digits(upper: int) -> str:
    """A pattern for the decimal numbers 0..``upper`` (or empty)."""
    width = len(str(upper))
    if str(upper) == "9" * width:
        return f"^[0-9]{{0,{width}}}$"
    return f"^([0-9]{{1,{width - 1}}}|{upper})?$" if upper == 10 ** (width - 1) else f"^[0-9]{{0,{width}}}$"
