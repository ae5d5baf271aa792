"""The HTTP API's request and error bodies as pydantic models, and the one way a JSON body is read.

The OpenAPI schema is generated from these models (:func:`json_body`, :func:`form_body`), and the
same models validate what arrives (:func:`parse_body`), so the schema a client (or a fuzzer) sees is
what the server holds it to. A JSON body is bounded in size by the caller and in nesting here,
before it is parsed: a body nested thousands of levels deep is a 400 ``invalid_json``, not a
recursion error.

Validation errors become ``BadRequest`` with a stable code per field (:attr:`Body.codes`), the
codes the API has always answered with (``invalid_kind``, ``invalid_params``, ``invalid_k``, ...).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Annotated, Any, ClassVar, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from shared.errors import BadRequest
from shared.filters import FIELDS, Filters, SearchFilters, as_int, empty_as_none, form_fields, parse_filters
from shared.labels import clean_label

JSON_MAX_DEPTH = 32  # no body of the API nests deeper than 4
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRANCH = re.compile(r"^(int|float|str|bool|bytes|none|[A-Z].*|.*[-\[].*)$")
IMAGE_ID_PATTERN = "^[0-9a-f]{64}$"
USER_PATTERN = "^[A-Za-z0-9@._ +-]{0,64}$"
M = TypeVar("M", bound=BaseModel)
Unset = SkipJsonSchema[None]  # optional, and null is not advertised in the schema


class Body(BaseModel):
    """A JSON request body. ``codes`` maps the first field of an error's location to the error code;
    anything else (wrong shape, unknown field) is ``invalid``."""

    model_config = ConfigDict(extra="forbid")
    codes: ClassVar[dict[str, str]] = {}
    invalid: ClassVar[str] = "invalid_body"
    not_object: ClassVar[str] = "invalid_json"  # the code for a body that is no JSON object


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error's body: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


def load_json(data: bytes) -> Any:
    """Parse a JSON body that is not empty and nests at most :data:`JSON_MAX_DEPTH` levels.

    Raises:
        BadRequest: ``empty_request`` or ``invalid_json``.
    """
    if not data:
        raise BadRequest("empty request body", code="empty_request")
    if data.count(b"[") + data.count(b"{") > JSON_MAX_DEPTH and _depth(data) > JSON_MAX_DEPTH:
        raise BadRequest(f"the JSON body nests deeper than {JSON_MAX_DEPTH} levels", code="invalid_json")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None


def _depth(data: bytes) -> int:
    """How deep arrays and objects nest in JSON text (brackets inside strings do not count)."""
    text = np.frombuffer(_STRINGS.sub(b'""', data), dtype=np.uint8)
    step = np.isin(text, np.frombuffer(b"[{", np.uint8)).astype(np.int64)
    step -= np.isin(text, np.frombuffer(b"]}", np.uint8))
    return int(np.cumsum(step).max(initial=0))


def load_object(data: bytes) -> dict[str, Any]:
    """A JSON body that must be an object (see :func:`load_json`).

    Raises:
        BadRequest: ``empty_request`` or ``invalid_json``.
    """
    payload = load_json(data)
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    return payload


def parse_body(data: bytes, model: type[M]) -> M:
    """Validate a JSON body against ``model`` (a :class:`Body`, or a root model with the same class vars).

    Raises:
        BadRequest: empty or invalid JSON, or a body the model refuses (the code its field maps to).
    """
    payload = load_json(data)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise _bad_request(model, exc) from None


def _bad_request(model: type[BaseModel], exc: ValidationError) -> BadRequest:
    codes: dict[str, str] = getattr(model, "codes", {})
    first = exc.errors()[0]
    # pydantic names the union member it tried (``constrained-int``, ``function-before[...]``): not a field
    loc = [str(p) for p in first["loc"] if not _BRANCH.match(str(p))]
    tags = getattr(model, "tags", ())
    if loc and loc[0] in tags:  # a tagged union's errors start with the tag
        loc = loc[1:]
    if not loc and first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return BadRequest("the body must be a JSON object", code=getattr(model, "not_object", "invalid_json"))
    if first["type"].startswith("union_tag"):
        return BadRequest(f'"kind" must be one of {", ".join(tags)}', code=codes.get("kind", "invalid_body"))
    if len(loc) > 1 or (loc and first["type"] != "extra_forbidden"):  # a field's own error, or inside it
        code = codes.get(loc[0], getattr(model, "invalid", "invalid_body"))
    else:
        code = getattr(model, "invalid", "invalid_body")
    where = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    return BadRequest(f"{where}: {message}" if where else message, code=code)


# -- OpenAPI request bodies ------------------------------------------------------------------------


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its definitions inlined (a request body stands alone)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items() if not _internal(k, v)}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return dict(inline(schema))


def _internal(key: str, value: Any) -> bool:
    """What a generated schema holds for Python's sake only: titles, the discriminator's internal
    mapping, null defaults, and class docstrings written for developers (with reST markup)."""
    if key in ("title", "discriminator") or (key == "default" and value is None):
        return True
    return key == "description" and isinstance(value, str) and ("``" in value or ":func:" in value)


def json_body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """An OpenAPI ``requestBody`` of JSON validated by ``model``."""
    return {"required": required, "content": {"application/json": {"schema": schema_of(model)}}}


def form_body(
    model: type[BaseModel],
    image_types: list[str],
    *,
    form: dict[str, Any] | None = None,
    json: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An OpenAPI ``requestBody`` of an image: a multipart form (``model``: the ``image`` file and text
    fields; or its ``form`` schema), the raw image bytes in one of ``image_types``, and optionally a
    JSON alternative (a :func:`json_body`)."""
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": form or schema_of(model)},
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in image_types},
    }
    if json is not None:
        content["application/json"] = json["content"]["application/json"]
    return {"required": True, "content": content}


class ImageForm(BaseModel):
    """A multipart form with an image (``POST /api/classify``)."""

    image: bytes = Field(json_schema_extra={"format": "binary"}, description="the image")


class RollbackRequest(Body):
    """``POST /api/index/rollback``: the version to point queries at (default: the one before)."""

    model_config = ConfigDict(extra="ignore")
    to: Annotated[str, Field(pattern="^v[0-9]{6}$")] | Unset = Field(default=None, description="default: previous")
    codes: ClassVar[dict[str, str]] = {"to": "invalid_version"}


class LabelItem(BaseModel):
    id: str = Field(pattern=IMAGE_ID_PATTERN)
    label: str = Field(max_length=100)


class LabelsRequest(Body):
    """``POST /api/labels``. Each item is checked on its own: the valid ones are kept, the others
    reported with their position (see :func:`shared.labelling.submit_labels`)."""

    model_config = ConfigDict(extra="ignore")
    labels: list[LabelItem] = Field(min_length=1)
    user: str | None = Field(default=None, pattern=USER_PATTERN, description="who labels (default anonymous)")


class LabelSetRequest(Body):
    """``PUT /api/label-set``: the classes images may be labelled with."""

    model_config = ConfigDict(extra="ignore")
    classes: list[Annotated[str, Field(min_length=1, max_length=100, pattern=r"\S")]] = Field(min_length=1)
    user: str | None = Field(default=None, pattern=USER_PATTERN, description="who labels (default anonymous)")
    codes: ClassVar[dict[str, str]] = {"classes": "invalid_label_set", "user": "invalid_user"}
    invalid: ClassVar[str] = "invalid_label_set"


class ResolveRequest(Body):
    """``POST /api/duplicates/{group}/resolve``: the image to keep (default: the group's suggested keeper)."""

    keep: Annotated[str, Field(pattern=IMAGE_ID_PATTERN)] | Unset = Field(
        default=None, description="the image kept in search; the group's others are hidden"
    )
    user: str | None = Field(default=None, pattern=USER_PATTERN, description="who resolves (default anonymous)")
    codes: ClassVar[dict[str, str]] = {"keep": "invalid_id", "user": "invalid_user"}


class SearchQuery(Body):
    """``POST /api/search`` as JSON: exactly one of ``id`` (similar images) or ``text`` (text-to-image)."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"oneOf": [{"required": ["id"]}, {"required": ["text"]}]}
    )
    id: Annotated[str, Field(pattern=IMAGE_ID_PATTERN)] | Unset = Field(default=None, description="a stored image id")
    text: Annotated[str, Field(min_length=1)] | Unset = Field(default=None, description="a text query")
    k: Annotated[int, Field(strict=True, ge=1)] | Unset = Field(default=None, description="number of results")
    filters: Filters | Unset = Field(default=None)
    codes: ClassVar[dict[str, str]] = {
        "id": "invalid_id",
        "text": "invalid_text",
        "k": "invalid_k",
        "filters": "invalid_filter",
    }
    invalid: ClassVar[str] = "missing_id"
    not_object: ClassVar[str] = "missing_id"

    @model_validator(mode="after")
    def _one_of(self) -> SearchQuery:
        if (self.id is None) == (self.text is None):
            raise ValueError('the JSON body needs one of "id" (a stored image id) or "text"')
        return self

    @property
    def search_filters(self) -> SearchFilters:
        return self.filters.to_filters() if self.filters is not None else SearchFilters()


@lru_cache(maxsize=8)
def search_query(max_k: int, max_text: int) -> type[SearchQuery]:
    """:class:`SearchQuery` with the settings' bounds on ``k`` and the text's length."""

    class Query(SearchQuery):
        text: Annotated[str, Field(min_length=1, max_length=max_text)] | Unset = Field(
            default=None, description="a text query"
        )
        k: Annotated[int, Field(strict=True, ge=1, le=max_k)] | Unset = Field(
            default=None, description="number of results"
        )

    return Query


class SearchForm(BaseModel):
    """``POST /api/search`` with an image: ``k`` and the filters as form fields or query parameters."""

    model_config = ConfigDict(extra="ignore")
    k: Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(as_int), BeforeValidator(empty_as_none)] = None
    codes: ClassVar[dict[str, str]] = {"k": "invalid_k"}

    @classmethod
    def read(cls, fields: dict[str, Any]) -> tuple[int | None, SearchFilters]:
        """(k, filters) from text fields (unknown names ignored).

        Raises:
            BadRequest: ``invalid_k`` or ``invalid_filter``.
        """
        k = parse_fields({"k": fields.get("k")}, cls).k
        return k, parse_filters({n: v for n, v in fields.items() if n in FIELDS})

    @classmethod
    def form_schema(cls) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["image"],
            "properties": {
                "image": {"type": "string", "format": "binary", "description": "the image"},
                "k": {"type": "string", "pattern": "^[0-9]{1,4}$", "description": "number of results"},
                **form_fields(),
            },
        }


class UploadForm(Body):
    """``POST /api/images`` as a multipart form: the image, an optional label and caption."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"required": ["image"]})
    image: bytes | Unset = Field(default=None, json_schema_extra={"format": "binary"}, description="the image")
    label: Annotated[str, Field(max_length=100)] | Unset = Field(default=None, description="its label (optional)")
    caption: str | Unset = Field(default=None, description="a caption (optional)")
    codes: ClassVar[dict[str, str]] = {"label": "invalid_label", "caption": "invalid_caption"}

    @field_validator("label")
    @classmethod
    def _clean_label(cls, label: str | None) -> str | None:
        return clean_label(label)  # trimmed, printable; empty means none


@lru_cache(maxsize=8)
def upload_form(max_caption: int) -> type[UploadForm]:
    """:class:`UploadForm` with the settings' bound on the caption."""

    class Upload(UploadForm):
        caption: Annotated[str, Field(max_length=max_caption)] | Unset = Field(
            default=None, description="a caption (optional)"
        )

    return Upload


def parse_fields(fields: dict[str, Any], model: type[M]) -> M:
    """Validate text fields (a form's, or query parameters) against ``model``.

    Raises:
        BadRequest: with the code of the field at fault.
    """
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise _bad_request(model, exc) from None
