"""Generate docs/reference.md (DeepSpeedInference) and docs/reference-batch.md
(DeepSpeedBatchInference) from the CRDs' OpenAPI schemas.

The CRDs (crds/*.yaml) are themselves generated from the operator's pydantic models, so
these pages, `kubectl explain` and the API server's validation all come from one source.
tests/unit/test_docs_reference.py fails when a page is stale.

Usage:
    python docs/gen_reference.py            # rewrite both pages
    python docs/gen_reference.py --check    # exit 1 when a page is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = ROOT / "crds" / "deepspeedinferences.deepspeed.ai.yaml"
OUT_PATH = ROOT / "docs" / "reference.md"
BATCH_CRD_PATH = ROOT / "crds" / "deepspeedbatchinferences.deepspeed.ai.yaml"
BATCH_OUT_PATH = ROOT / "docs" / "reference-batch.md"
PAGES = ((CRD_PATH, OUT_PATH), (BATCH_CRD_PATH, BATCH_OUT_PATH))

# Schema keywords that constrain a value; rendered in the "Validation" column.
_CONSTRAINTS = (
    ("minimum", ">= {}"),
    ("exclusiveMinimum", "> {}"),
    ("maximum", "<= {}"),
    ("exclusiveMaximum", "< {}"),
    ("minLength", "min length {}"),
    ("maxLength", "max length {}"),
    ("pattern", "pattern `{}`"),
    ("minItems", "min items {}"),
    ("maxItems", "max items {}"),
    ("format", "format {}"),
)


def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    """Return the CRD document at ``path`` (the first YAML document that is a CRD)."""
    with path.open(encoding="utf-8") as fh:
        for doc in yaml.safe_load_all(fh):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                return dict(doc)
    raise ValueError(f"{path}: no CustomResourceDefinition found")


def _type_of(schema: dict[str, Any]) -> str:
    """A short human type: string, integer, []object, map[string]string, int-or-string..."""
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    if schema.get("x-kubernetes-preserve-unknown-fields") and "type" not in schema:
        return "any"
    typ = schema.get("type")
    if typ == "array":
        return "[]" + _type_of(schema.get("items", {}))
    if typ == "object" and "properties" not in schema:
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return f"map[string]{_type_of(extra)}"
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return "object (free-form)"
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf") or []
        return " or ".join(sorted({_type_of(o) for o in options}))
    return str(typ or "any")


def _named_patterns() -> dict[str, str]:
    """Long regexes of well-known formats, shown by name instead of in full."""
    try:
        from dsi_operator.api import spec
    except ImportError:  # the page can still be rendered, with the raw patterns
        return {}
    names = {
        "QUANTITY_PATTERN": "a Kubernetes quantity (e.g. `4`, `500m`, `16Gi`)",
        "QUALIFIED_NAME_PATTERN": "a qualified name (`prefix/name`)",
        "DNS1123_SUBDOMAIN_PATTERN": "a DNS-1123 subdomain (object name)",
    }
    return {getattr(spec, k): v for k, v in names.items() if hasattr(spec, k)}


_PATTERN_NAMES = _named_patterns()


def _validation(schema: dict[str, Any]) -> str:
    parts = []
    for key, fmt in _CONSTRAINTS:
        if key not in schema:
            continue
        # OpenAPI v3.0: an exclusive bound is the plain bound plus a boolean flag.
        if key in ("minimum", "maximum") and schema.get(f"exclusive{key.title()}") is True:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and schema[key] is True:
            parts.append(fmt.format(schema["minimum" if "Min" in key else "maximum"]))
            continue
        if key == "pattern" and schema[key] in _PATTERN_NAMES:
            parts.append(_PATTERN_NAMES[schema[key]])
        else:
            parts.append(fmt.format(schema[key]))
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for rule in schema.get("x-kubernetes-validations", []):
        parts.append(f"rule: {rule.get('message') or rule.get('rule')}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    """Make ``text`` safe for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(schema: dict[str, Any]) -> str:
    if "default" not in schema:
        return ""
    return f"`{json.dumps(schema['default'], sort_keys=True)}`"


def walk(
    schema: dict[str, Any], path: str, required: bool
) -> Iterator[tuple[str, str, bool, str, str, str]]:
    """Yield (path, type, required, default, validation, description) depth first."""
    yield (
        path,
        _type_of(schema),
        required,
        _default(schema),
        _validation(schema),
        schema.get("description", ""),
    )
    target = schema
    suffix = ""
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        target = schema["items"]
        suffix = "[]"
    elif schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        if "properties" in schema["additionalProperties"]:
            target = schema["additionalProperties"]
            suffix = ".<key>"
    props = target.get("properties", {})
    req = set(target.get("required", []))
    for name in sorted(props):
        yield from walk(props[name], f"{path}{suffix}.{name}", name in req)


def _table(schema: dict[str, Any], root: str) -> list[str]:
    lines = [
        "| Field | Type | Required | Default | Validation | Description |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    props = schema.get("properties", {})
    req = set(schema.get("required", []))
    for name in sorted(props):
        for path, typ, required, default, validation, desc in walk(
            props[name], f"{root}.{name}", name in req
        ):
            lines.append(
                f"| `{path}` | {_cell(typ)} | {'yes' if required else ''} | "
                f"{_cell(default)} | {_cell(validation)} | {_cell(desc)} |"
            )
    return lines


def render(crd: dict[str, Any]) -> str:
    """Render the whole reference page for ``crd`` as Markdown."""
    spec = crd["spec"]
    names = spec["names"]
    group = spec["group"]
    short = names.get("shortNames", [names["plural"]])[0]
    out = [
        "<!-- GENERATED by `python docs/gen_reference.py` from "
        f"crds/{names['plural']}.{group}.yaml. Do not edit by hand. -->",
        "",
        f"# {names['kind']} reference",
        "",
        f"- API group: `{group}`",
        f"- Kind: `{names['kind']}` (plural `{names['plural']}`, singular "
        f"`{names.get('singular', '')}`)",
        f"- Short names: {', '.join(f'`{n}`' for n in names.get('shortNames', [])) or 'none'}",
        f"- Categories: {', '.join(f'`{n}`' for n in names.get('categories', [])) or 'none'}",
        f"- Scope: {spec.get('scope', 'Namespaced')}",
        "",
        "Every field below is also documented in the cluster: "
        f"`kubectl explain {short}.spec.<field>`.",
        "",
    ]
    for version in spec["versions"]:
        name = version["name"]
        flags = []
        if version.get("served"):
            flags.append("served")
        if version.get("storage"):
            flags.append("storage")
        out += [f"## Version `{group}/{name}` ({', '.join(flags)})", ""]
        subresources = version.get("subresources", {})
        if subresources:
            out.append("Subresources:")
            out.append("")
            if "status" in subresources:
                out.append("- `status`: the operator writes `.status` through `/status` only.")
            if "scale" in subresources:
                scale = subresources["scale"]
                out.append(
                    f"- `scale`: `kubectl scale {short}/<name> --replicas=N` sets "
                    f"`{scale.get('specReplicasPath')}` (status: "
                    f"`{scale.get('statusReplicasPath')}`)."
                )
            out.append("")
        columns = version.get("additionalPrinterColumns", [])
        if columns:
            out += [
                f"Columns of `kubectl get {short}`:",
                "",
                "| Column | Type | JSONPath | Description |",
                "| --- | --- | --- | --- |",
            ]
            for col in columns:
                out.append(
                    f"| {_cell(col['name'])} | {col.get('type', '')} | "
                    f"`{col.get('jsonPath', '')}` | {_cell(col.get('description', ''))} |"
                )
            out.append("")
        schema = version["schema"]["openAPIV3Schema"]
        for part in ("spec", "status"):
            sub = schema.get("properties", {}).get(part)
            if sub is None:
                continue
            out += [f"### `{part}`", ""]
            if sub.get("description"):
                out += [_cell(sub["description"]), ""]
            out += _table(sub, part)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page is stale")
    args = parser.parse_args(argv)
    stale = 0
    for crd_path, out_path in PAGES:
        text = render(load_crd(crd_path))
        if args.check:
            current = out_path.read_text(encoding="utf-8") if out_path.exists() else ""
            if current != text:
                print(f"{out_path} is stale: run `python docs/gen_reference.py`", file=sys.stderr)
                stale = 1
            continue
        out_path.write_text(text, encoding="utf-8")
        print(f"wrote {out_path}")
    return stale


if __name__ == "__main__":
    sys.exit(main())
