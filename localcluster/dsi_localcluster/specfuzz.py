"""Hypothesis strategies for DeepSpeedInference specs, derived from the shipped CRD schema.

Written here rather than taken from hypothesis-jsonschema: its last release (0.23.1) fails
against current hypothesis ("'many' object has no attribute 'more'"), and the CRD uses a
small subset of JSON schema (objects, strings with patterns, bounded numbers, enums, short
arrays and maps, int-or-string quantities) that a few functions cover.

* :func:`valid_specs`: specs the CRD's structural schema accepts (its CEL rules, the
  ``x-kubernetes-validations``, and keyed lists may still reject some: both sides must
  agree on those, see :func:`rule_messages`);
* :func:`invalid_specs`: one of those with one leaf replaced by a value its schema forbids,
  returned with the path of that leaf.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml
from dsi_operator.api.labels import CRD_NAME
from hypothesis import strategies as st

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / f"{CRD_NAME}.yaml"
Schema = dict[str, Any]
# Keys of free-form maps (labels, selectors): short, label-like, sometimes reserved.
_MAP_KEYS = st.from_regex(r"[a-z][a-z0-9.-]{0,8}(/[a-z0-9]{1,6})?", fullmatch=True)
_BAD_STRINGS = ("Not Valid!", "", "-x-", "a" * 300, "/abs", "UPPER_case", " ")


@functools.cache
def spec_schema() -> Schema:
    """The ``spec`` schema of the shipped CRD (the one the API server enforces)."""
    doc = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    schema: Schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def rule_messages(schema: Schema | None = None) -> list[str]:
    """What the model says for each rule beyond the structural schema that the API server
    also enforces: the message of every CEL rule, and "duplicate" for lists keyed by a
    field (``x-kubernetes-list-type: map``)."""
    out: list[str] = []
    node = schema if schema is not None else spec_schema()
    for rule in node.get("x-kubernetes-validations", []):
        out.append(rule["message"])
    if node.get("x-kubernetes-list-type") == "map":
        out.append("duplicate")
    for child in _children(node).values():
        out += rule_messages(child)
    return out


def _children(node: Schema) -> dict[str, Schema]:
    kids = dict(node.get("properties", {}))
    if isinstance(node.get("items"), dict):
        kids["[]"] = node["items"]
    if isinstance(node.get("additionalProperties"), dict):
        kids["{}"] = node["additionalProperties"]
    return kids


def _string(node: Schema) -> st.SearchStrategy[str]:
    lo, hi = node.get("minLength", 0), min(node.get("maxLength", 24), 24)
    if "pattern" in node:
        pattern: str = node["pattern"]
        longest = node.get("maxLength", 10**6)
        gen = st.from_regex(pattern, fullmatch=True)
        return gen.filter(lambda s: node.get("minLength", 0) <= len(s) <= longest)
    return st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=lo, max_size=hi)


def _number(node: Schema, integer: bool) -> st.SearchStrategy[Any]:
    lo, hi = node.get("minimum", -1000), node.get("maximum", 10**6)
    if integer:
        return st.integers(int(lo), int(hi))
    return st.floats(float(lo), float(hi), allow_nan=False, allow_infinity=False)


def _object(node: Schema) -> st.SearchStrategy[dict[str, Any]]:
    props = node.get("properties", {})
    required = set(node.get("required", []))
    if not props and isinstance(node.get("additionalProperties"), dict):
        limit = min(node.get("maxProperties", 3), 3)
        values = strategy(node["additionalProperties"])
        return st.dictionaries(_MAP_KEYS, values, max_size=limit)
    if not props:  # x-kubernetes-preserve-unknown-fields: a free object
        return st.just({})
    return st.fixed_dictionaries(
        {k: strategy(v) for k, v in props.items() if k in required},
        optional={k: strategy(v) for k, v in props.items() if k not in required},
    )


def strategy(node: Schema) -> st.SearchStrategy[Any]:
    """Values that satisfy ``node``'s structural schema."""
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if node.get("x-kubernetes-int-or-string"):
        return st.one_of(st.integers(0, 64), _string(node))
    kind = node.get("type")
    if kind == "string":
        return _string(node)
    if kind in ("integer", "number"):
        return _number(node, integer=kind == "integer")
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(strategy(node["items"]), max_size=min(node.get("maxItems", 3), 3))
    return _object(node)


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Specs the CRD's structure accepts (CEL rules not applied).

    Most get exactly one model source (the CEL rule on ``model``), so that most examples
    reach rendering; the rest keep what was drawn and exercise that rule.
    """
    spec: dict[str, Any] = draw(strategy(spec_schema()))
    model = spec["model"]
    if draw(st.integers(0, 9)) < 9:  # hypothesis favours small draws: 0 must mean "repair"
        props = spec_schema()["properties"]["model"]["properties"]
        keep = draw(st.sampled_from(["name", "pvc"]))
        model.pop("pvc" if keep == "name" else "name", None)
        if keep not in model:
            model[keep] = draw(strategy(props[keep]))
    return spec


Leaf = tuple[tuple[str, ...], Schema]


def _leaves(value: Any, node: Schema, path: tuple[str, ...]) -> list[Leaf]:
    """(path, schema) of every constrained scalar present in ``value``."""
    if isinstance(value, dict) and "properties" in node:
        out: list[Leaf] = []
        for k, v in value.items():
            out += _leaves(v, node["properties"][k], (*path, k))
        return out
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        out = []
        for i, v in enumerate(value):
            out += _leaves(v, node["items"], (*path, str(i)))
        return out
    constrained = {"enum", "pattern", "minimum", "maximum", "maxLength", "minLength", "type"}
    if not isinstance(value, dict | list) and constrained & set(node):
        return [(path, node)]
    return []


def _bad_value(node: Schema) -> Any:
    """A value ``node`` forbids (deterministic per schema, so failures reproduce)."""
    kind = node.get("type")
    if "enum" in node:
        return "not-" + str(node["enum"][0])
    if "maximum" in node:
        return node["maximum"] + 1
    if "minimum" in node:
        return node["minimum"] - 1
    if kind in ("integer", "number"):
        return "seven"
    if kind == "boolean":
        return {"not": "a bool"}
    pattern = node.get("pattern")
    for candidate in _BAD_STRINGS:
        too_long = len(candidate) > node.get("maxLength", 10**6)
        too_short = len(candidate) < node.get("minLength", 0)
        if too_long or too_short or (pattern and not re.fullmatch(pattern, candidate)):
            return candidate
    return 12345  # a number where a string is required


def field_of(path: tuple[str, ...]) -> str:
    """The innermost named key of a leaf's path (list indexes are not field names): what an
    error about that leaf must name."""
    return next(p for p in reversed(path) if not p.isdigit())


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target: Any = obj
    for key in path[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = path[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


@st.composite
def invalid_specs(draw: st.DrawFn) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A structurally valid spec with one constrained leaf made invalid, and that leaf's path."""
    spec = draw(valid_specs())
    # Always one constrained leaf to break: tensorParallelSize is set if nothing else is.
    spec.setdefault("tensorParallelSize", 1)
    leaves = _leaves(spec, spec_schema(), ())
    path, node = draw(st.sampled_from(leaves))
    _set(spec, path, _bad_value(node))
    return spec, path
