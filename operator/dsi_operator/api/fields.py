"""Field types shared by the status models, and a lenient reader for stored status.

A status holds times and pod UIDs. In memory they are what the logic computes with
(``datetime``, tuples); on the wire they are what Kubernetes writes (RFC 3339 strings, JSON
lists). The types here do that conversion in the model itself, so that reading a status is
``Model.model_validate(raw)`` and writing it is ``model_dump(mode="json", by_alias=True)``,
with no hand-written key maps. The JSON schema of each type is the one the CRD has always
declared (a nullable string or a nullable list of strings).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, PlainSerializer, ValidationError, WithJsonSchema

from dsi_operator.util.timefmt import iso, iso_precise, parse_time

_NULLABLE_STRING: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
_NULLABLE_STRINGS: dict[str, Any] = {
    "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]
}


def _strings(value: Any) -> tuple[str, ...]:
    """A list (or tuple) of strings; anything else (null, a scalar) reads as empty."""
    return tuple(str(x) for x in value) if isinstance(value, list | tuple) else ()


def _times(value: Any) -> tuple[datetime, ...]:
    """A list of RFC 3339 times; entries that do not parse are left out."""
    parsed = (parse_time(x) for x in value) if isinstance(value, list | tuple) else ()
    return tuple(t for t in parsed if t is not None)


def _iso_list(ts: tuple[datetime, ...]) -> list[str | None]:
    return [iso_precise(t) for t in ts]


#: A time written with second precision, as Kubernetes writes times; unset (None) when the
#: stored value is missing or does not parse.
Time = Annotated[
    datetime | None,
    BeforeValidator(parse_time),
    PlainSerializer(iso, when_used="json"),
    WithJsonSchema(_NULLABLE_STRING),
]
#: A time written with microseconds: bookkeeping where a second matters (backoff, deadlines).
PreciseTime = Annotated[
    datetime | None,
    BeforeValidator(parse_time),
    PlainSerializer(iso_precise, when_used="json"),
    WithJsonSchema(_NULLABLE_STRING),
]
#: Times with microseconds, oldest first as recorded; written as a JSON list.
TimeList = Annotated[
    tuple[datetime, ...],
    BeforeValidator(_times),
    PlainSerializer(_iso_list, when_used="json"),
    WithJsonSchema(_NULLABLE_STRINGS),
]
#: Pod UIDs (or other strings), in order; written as a JSON list.
StringList = Annotated[
    tuple[str, ...], BeforeValidator(_strings), WithJsonSchema(_NULLABLE_STRINGS)
]


def no_default(schema: dict[str, Any]) -> None:
    """``json_schema_extra`` for a field whose Python default (an empty tuple) is not a CRD
    default: the API server must not fill it in."""
    schema.pop("default", None)


def omit_empty(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without the keys whose value is None or an empty list: unset fields are left out
    of a written status rather than written as null or []."""
    return {k: v for k, v in d.items() if v is not None and v != [] and v != ()}


M = TypeVar("M", bound=BaseModel)


def validate_leniently(model: type[M], raw: dict[str, Any]) -> M:
    """``model.model_validate(raw)``, reading fields that do not validate as unset.

    For what the operator reads back from a stored object (its own status, a ConfigMap the
    batch driver wrote): one bad field must not lose the rest. Required fields must be valid.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        bad = {e["loc"][0] for e in err.errors() if e["loc"]}
        return model.model_validate({k: v for k, v in raw.items() if k not in bad})
