"""JSON schemas for kubeconform, generated offline (after openapi2jsonschema).

kubeconform fetches its schemas from GitHub by default; this machine, and CI, may not reach
it. The same schemas are made here from what the project already has: the Kubernetes
OpenAPI (v2) document in the k8s.io/kubernetes module (downloaded to build kube-apiserver)
and the CRD manifests (crds/ for DeepSpeedInference, the KubeRay CRDs copied at build time).

One file per kind and version, named the way kubeconform's default template names them,
``{{ .ResourceKind }}{{ .KindSuffix }}.json`` (``deployment-apps-v1.json``,
``service-v1.json``, ``rayservice-ray-v1.json``), so ``-schema-location
'<dir>/{{ .ResourceKind }}{{ .KindSuffix }}.json'`` finds them. The schemas are strict
(``additionalProperties: false`` wherever the API lists the properties), like kubeconform's
``-strict`` ones: a misspelt field is an error, as it is for ``kubectl --validate=strict``.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from . import config

JSON_SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"
_REF_PREFIX = "#/definitions/"
# Types the API accepts in two spellings; the OpenAPI document names only one of them.
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
_INT_OR_STRING: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
_NUMBER_OR_STRING: dict[str, Any] = {"anyOf": [{"type": "number"}, {"type": "string"}]}
# The keywords whose values are schemas: name -> schema maps, lists, and single schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "definitions"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf"})
_SCHEMA_VALUES = frozenset({"items", "additionalProperties", "not"})


def kubernetes_openapi_path(version: str = config.KUBERNETES_VERSION) -> Path:
    """swagger.json of k8s.io/kubernetes@version in the Go module cache (downloaded when
    missing; the kubernetes build has already fetched it)."""
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"go mod download k8s.io/kubernetes@{version} failed:\n{proc.stdout}")
    return Path(json.loads(proc.stdout)["Dir"]) / "api" / "openapi-spec" / "swagger.json"


def schema_filename(kind: str, group: str, version: str) -> str:
    """kubeconform's ``{{ .ResourceKind }}{{ .KindSuffix }}.json`` for one kind."""
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix.lower()}.json"


def _strict(node: Any) -> Any:
    """A copy of a schema with CRD/OpenAPI extensions turned into JSON Schema and objects
    closed (``additionalProperties: false``) unless they keep unknown fields."""
    if not isinstance(node, dict):
        return node
    # Only schema keywords are walked: a `properties` map's keys are field names (JSONSchemaProps
    # has fields called `nullable` and `format`), and `default`/`enum` values are data.
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: _strict(v) for k, v in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_strict(v) for v in value]
        elif key in _SCHEMA_VALUES:
            out[key] = [_strict(v) for v in value] if isinstance(value, list) else _strict(value)
        else:
            out[key] = copy.deepcopy(value)
    if out.pop("x-kubernetes-int-or-string", False) or out.get("format") == "int-or-string":
        out.pop("type", None)
        out.pop("format", None)
        out.update(copy.deepcopy(_INT_OR_STRING))
    # OpenAPI v3.0's exclusive bound is the plain bound plus a boolean; draft-07's is a number.
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(flag) is True and bound in out:
            out[flag] = out.pop(bound)
        elif out.get(flag) is False:
            del out[flag]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    open_ended = out.get("x-kubernetes-preserve-unknown-fields") or out.get(
        "x-kubernetes-embedded-resource"
    )
    if "properties" in out and "additionalProperties" not in out and not open_ended:
        out["additionalProperties"] = False
    return out


def _reachable(definitions: dict[str, Any], root: str) -> set[str]:
    """Names of the definitions that `root` refers to, directly or not (itself included)."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in definitions:
            continue
        seen.add(name)
        stack: list[Any] = [definitions[name]]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
                    todo.append(ref[len(_REF_PREFIX) :])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return seen


def kubernetes_schemas(swagger: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """File name -> schema for every kind of the Kubernetes OpenAPI document. Each file
    carries the definitions it refers to, so it stands alone."""
    definitions: dict[str, Any] = {name: _strict(d) for name, d in swagger["definitions"].items()}
    # Quantities are strings or numbers in manifests (cpu: 1); the document says string.
    definitions[_QUANTITY] = copy.deepcopy(_NUMBER_OR_STRING)
    out: dict[str, dict[str, Any]] = {}
    for name, definition in sorted(definitions.items()):
        gvks = definition.get("x-kubernetes-group-version-kind") or []
        # Shared types (DeleteOptions, WatchEvent) list many kinds and are never manifests.
        if len(gvks) != 1 or "properties" not in definition:
            continue
        gvk = gvks[0]
        schema = {"$schema": JSON_SCHEMA_DRAFT, **copy.deepcopy(definition)}
        schema["definitions"] = {
            n: definitions[n] for n in sorted(_reachable(definitions, name)) if n != name
        }
        out[schema_filename(gvk["kind"], gvk["group"], gvk["version"])] = schema
    return out


def crd_schemas(crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """File name -> schema for each served version of one CustomResourceDefinition."""
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    out: dict[str, dict[str, Any]] = {}
    for version in crd["spec"]["versions"]:
        schema = version.get("schema", {}).get("openAPIV3Schema")
        if schema is None:
            continue
        out[schema_filename(kind, group, version["name"])] = {
            "$schema": JSON_SCHEMA_DRAFT,
            **_strict(schema),
        }
    return out


def write_schemas(out_dir: Path, swagger_path: Path, crd_paths: Iterable[Path]) -> list[Path]:
    """Write the Kubernetes schemas and those of the CRDs in `crd_paths` (YAML files, one
    or more CRDs each) into out_dir; returns the files written. CRDs win over built-ins."""
    schemas = kubernetes_schemas(json.loads(swagger_path.read_text(encoding="utf-8")))
    for path in crd_paths:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                schemas.update(crd_schemas(doc))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in sorted(schemas.items()):
        path = out_dir / name
        path.write_text(json.dumps(schema, separators=(",", ":")), encoding="utf-8")
        written.append(path)
    return written


def location_template(out_dir: Path) -> str:
    """kubeconform's ``-schema-location`` for the files written by write_schemas."""
    return str(out_dir / "{{ .ResourceKind }}{{ .KindSuffix }}.json")
