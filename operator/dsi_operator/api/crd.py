"""Generate the CRDs (DeepSpeedInference, DeepSpeedBatchInference) from the pydantic models in
:mod:`dsi_operator.api.spec` and :mod:`dsi_operator.api.batch_spec`.

The models are the single source; this module converts pydantic's JSON schema into a
*structural* OpenAPI v3 schema as the API server requires it: ``$ref``s inlined, ``anyOf``
with ``null`` removed (``nullable`` in status), no ``title``/``additionalProperties: false``,
open objects as ``x-kubernetes-preserve-unknown-fields``, descriptions, defaults, enums,
bounds and CEL rules kept.

CLI::

    python -m dsi_operator.api.crd            # print the DeepSpeedInference CRD YAML
    python -m dsi_operator.api.crd --write    # write both CRDs into crds/ and the chart's copy
    python -m dsi_operator.api.crd --check    # exit 1 if any file differs from the models
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from dsi_operator.api import labels as L
from dsi_operator.api.batch_spec import DeepSpeedBatchInferenceSpec, DeepSpeedBatchInferenceStatus
from dsi_operator.api.spec import DeepSpeedInferenceSpec, DeepSpeedInferenceStatus

#: Directories (relative to the repository root) that hold the generated CRDs.
CRD_DIRS = (Path("crds"), Path("charts/dsi-operator/crds"))
#: Files that hold the generated DeepSpeedInference CRD.
CRD_FILENAME = f"{L.CRD_NAME}.yaml"
CRD_PATHS = tuple(d / CRD_FILENAME for d in CRD_DIRS)
#: Files that hold the generated DeepSpeedBatchInference CRD.
BATCH_CRD_FILENAME = f"{L.BATCH_CRD_NAME}.yaml"
BATCH_CRD_PATHS = tuple(d / BATCH_CRD_FILENAME for d in CRD_DIRS)

# Keys of pydantic's JSON schema that OpenAPI v3 in a CRD does not accept or need.
_DROP_KEYS = {"title", "$defs", "examples", "discriminator"}

# Order of keys in the emitted YAML, for readable diffs; others follow alphabetically.
_KEY_ORDER = [
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "pattern",
    "nullable",
    "anyOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
    "required",
    "additionalProperties",
    "items",
    "properties",
]


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline one ``$ref`` (siblings of the ref, like description/default, win)."""
    if "$ref" not in schema:
        return schema
    name = schema["$ref"].rsplit("/", 1)[-1]
    target = _resolve(copy.deepcopy(defs[name]), defs)
    merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return merged


def _is_null(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null"


def structural(schema: dict[str, Any], defs: dict[str, Any], *, nullable: bool) -> dict[str, Any]:
    """Convert a pydantic JSON schema node to a structural OpenAPI v3 schema node.

    ``nullable`` controls whether ``Optional`` fields become ``nullable: true`` (status, which
    the controller may patch with nulls inside lists) or simply optional (spec).
    """
    node = _resolve(dict(schema), defs)

    # Optional[X]: pydantic writes anyOf [X, {type: null}] (+ default: null).
    if "anyOf" in node and any(_is_null(s) for s in node["anyOf"]):
        branches = [s for s in node["anyOf"] if not _is_null(s)]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(branches) == 1:
            inner = _resolve(dict(branches[0]), defs)
            node = {**inner, **rest}
        else:
            node = {**rest, "anyOf": branches}
        if node.get("default", 0) is None:
            del node["default"]
        # An enum would also have to list null; such fields are simply optional.
        if nullable and "enum" not in node:
            node["nullable"] = True

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out["properties"] = {
                name: structural(sub, defs, nullable=nullable) for name, sub in value.items()
            }
        elif key == "items":
            out["items"] = structural(value, defs, nullable=nullable)
        elif key == "anyOf":
            out["anyOf"] = [structural(s, defs, nullable=nullable) for s in value]
        elif key == "const":
            out["enum"] = [value]  # OpenAPI v3.0 has no const
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020's numeric bound is OpenAPI v3.0's bound plus a boolean flag.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "additionalProperties":
            if value is False:
                continue  # structural schemas prune unknown fields anyway
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out["additionalProperties"] = structural(value, defs, nullable=nullable)
        else:
            out[key] = value

    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "properties" in out or "additionalProperties" in out:
        out.setdefault("type", "object")
    if out.get("type") == "object" and "properties" not in out:
        if "additionalProperties" not in out:
            out["x-kubernetes-preserve-unknown-fields"] = True
    # int-or-string: structural schemas forbid a type next to that anyOf.
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    rank = {k: i for i, k in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def model_schema(model: type[BaseModel], *, nullable: bool) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return structural(raw, defs, nullable=nullable)


#: Child names (<name>-g<g>-master Services, KubeRay's <name>-serve-svc and generated
#: RayCluster/pod names) must stay valid DNS-1035 labels.
_NAME_RULE = {
    "rule": "self.metadata.name.size() <= 40 && "
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "message": "metadata.name must be a DNS-1035 label (lowercase letters, "
    "digits, '-', starting with a letter) of at most 40 characters",
}


def _object_schema(
    description: str, spec_model: type[BaseModel], status_model: type[BaseModel]
) -> dict[str, Any]:
    return _ordered(
        {
            "description": description,
            "type": "object",
            "required": ["spec"],
            "x-kubernetes-validations": [dict(_NAME_RULE)],
            "properties": {
                "apiVersion": {
                    "description": "APIVersion defines the versioned schema of this "
                    "representation of an object.",
                    "type": "string",
                },
                "kind": {
                    "description": "Kind is a string value representing the REST resource "
                    "this object represents.",
                    "type": "string",
                },
                # The API server forbids anything but the type on metadata.
                "metadata": {"type": "object"},
                "spec": model_schema(spec_model, nullable=False),
                "status": model_schema(status_model, nullable=True),
            },
        }
    )


def openapi_schema() -> dict[str, Any]:
    """The whole ``openAPIV3Schema`` of the DeepSpeedInference CRD."""
    return _object_schema(
        "DeepSpeedInference serves a model with DeepSpeed tensor "
        "parallelism on KubeRay: spec.replicas independent groups of "
        "spec.tensorParallelSize GPU pods behind one Ray Serve endpoint. A failure of "
        "any pod of a group restarts that whole group.",
        DeepSpeedInferenceSpec,
        DeepSpeedInferenceStatus,
    )


def batch_openapi_schema() -> dict[str, Any]:
    """The whole ``openAPIV3Schema`` of the DeepSpeedBatchInference CRD."""
    return _object_schema(
        "DeepSpeedBatchInference runs a model with DeepSpeed tensor parallelism over a "
        "dataset once, as a KubeRay RayJob: spec.replicas TP groups of "
        "spec.tensorParallelSize GPU ranks share the input rows, and every row is written to "
        "the output exactly once, also across rank failures and job retries.",
        DeepSpeedBatchInferenceSpec,
        DeepSpeedBatchInferenceStatus,
    )


#: The columns every kind ends with: the status message (-o wide) and the age.
_LAST_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Message",
        "type": "string",
        "jsonPath": ".status.message",
        "description": "Status message",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Lifecycle phase",
    },
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": ".status.ready",
        "description": "Groups ready / groups desired",
    },
    {
        "name": "Updated",
        "type": "string",
        "jsonPath": ".status.rollout.updated",
        "description": "Ready groups running the current spec / groups desired",
    },
    {
        "name": "TP",
        "type": "integer",
        "jsonPath": ".spec.tensorParallelSize",
        "description": "Ranks per group",
    },
    {
        "name": "Ranks/Pod",
        "type": "integer",
        "jsonPath": ".spec.ranksPerPod",
        "description": "Ranks (GPU processes) in one pod",
        # -o wide only: the default columns stay as they were.
        "priority": 1,
    },
    {
        "name": "Replicas",
        "type": "integer",
        "jsonPath": ".spec.replicas",
        "description": "Groups desired",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restarts",
        "description": "Group restarts so far",
    },
    {
        "name": "Reforms",
        "type": "integer",
        "jsonPath": ".status.reforms",
        "description": "In-place group re-forms so far (same pods)",
        "priority": 1,
    },
    {
        "name": "Endpoint",
        "type": "string",
        "jsonPath": ".status.endpoint",
        "description": "In-cluster URL of the model endpoint",
    },
    {
        "name": "Model",
        "type": "string",
        "jsonPath": ".spec.model.name",
        "description": "Hub id of the model",
        "priority": 1,
    },
    *_LAST_COLUMNS,
]


BATCH_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Pending, Running, Succeeded or Failed",
    },
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Rows done / rows in all",
    },
    {
        "name": "Rows/s",
        "type": "string",
        "jsonPath": ".status.rowsPerSecond",
        "description": "Rows finished per second",
    },
    {
        "name": "Groups",
        "type": "integer",
        "jsonPath": ".status.groupsAlive",
        "description": "TP groups working now",
    },
    {
        "name": "TP",
        "type": "integer",
        "jsonPath": ".spec.tensorParallelSize",
        "description": "Ranks per group",
    },
    {
        "name": "Group-Restarts",
        "type": "integer",
        "jsonPath": ".status.groupRestarts",
        "description": "TP groups replaced after a rank failed",
        "priority": 1,
    },
    {
        "name": "Retries",
        "type": "integer",
        "jsonPath": ".status.failedAttempts",
        "description": "Whole-job runs that failed",
        "priority": 1,
    },
    *_LAST_COLUMNS,
]


def _crd_doc(
    names: dict[str, Any],
    schema: dict[str, Any],
    subresources: dict[str, Any],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{names['plural']}.{L.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "dsi-operator",
                "app.kubernetes.io/part-of": "dsi-operator",
            },
        },
        "spec": {
            "group": L.GROUP,
            "scope": "Namespaced",
            "names": names,
            "versions": [
                {
                    "name": L.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    """The DeepSpeedInference CustomResourceDefinition as a dict."""
    names = {
        "kind": L.KIND,
        "listKind": f"{L.KIND}List",
        "plural": L.PLURAL,
        "singular": L.SINGULAR,
        "shortNames": list(L.SHORT_NAMES),
        "categories": list(L.CATEGORIES),
    }
    subresources = {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.readyReplicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    return _crd_doc(names, openapi_schema(), subresources, PRINTER_COLUMNS)


def batch_crd() -> dict[str, Any]:
    """The DeepSpeedBatchInference CustomResourceDefinition as a dict (no scale
    subresource: a run's spec is immutable)."""
    names = {
        "kind": L.BATCH_KIND,
        "listKind": f"{L.BATCH_KIND}List",
        "plural": L.BATCH_PLURAL,
        "singular": L.BATCH_SINGULAR,
        "shortNames": list(L.BATCH_SHORT_NAMES),
        "categories": list(L.BATCH_CATEGORIES),
    }
    return _crd_doc(names, batch_openapi_schema(), {"status": {}}, BATCH_PRINTER_COLUMNS)


HEADER = (
    "# GENERATED by `python -m dsi_operator.api.crd --write` from\n"
    "# operator/dsi_operator/api/spec.py and batch_spec.py.\n"
    "# Do not edit by hand: change the pydantic models and regenerate.\n"
)


class _Dumper(yaml.SafeDumper):
    """Block-style YAML; multi-line strings as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(obj: Any) -> str:
    """YAML text the way every generated file in the repo is written."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def crd_yaml() -> str:
    """The DeepSpeedInference CRD as the YAML text stored in crds/ and the chart."""
    return HEADER + dump_yaml(crd())


def batch_crd_yaml() -> str:
    """The DeepSpeedBatchInference CRD as the YAML text stored in crds/ and the chart."""
    return HEADER + dump_yaml(batch_crd())


def generated_files() -> dict[Path, str]:
    """Every generated CRD file (relative to the repository root) and its text."""
    texts = {CRD_FILENAME: crd_yaml(), BATCH_CRD_FILENAME: batch_crd_yaml()}
    return {d / f: text for d in CRD_DIRS for f, text in texts.items()}


def repo_root() -> Path:
    """The repository root (the directory holding pyproject.toml and operator/; operator/
    holds its own pyproject.toml, the operator image's)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "operator").is_dir():
            return parent
    return Path.cwd()


def check(root: Path) -> list[Path]:
    """Paths under ``root`` whose CRD differs from the generated one."""
    stale = []
    for rel, want in generated_files().items():
        path = root / rel
        if not path.exists() or path.read_text() != want:
            stale.append(path)
    return stale


def write(root: Path) -> list[Path]:
    """Write every CRD under ``root``; returns the paths written."""
    written = []
    for rel, text in generated_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m dsi_operator.api.crd", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write crds/ and the chart copy")
    mode.add_argument("--check", action="store_true", help="exit 1 when the files drifted")
    parser.add_argument("--root", type=Path, default=None, help="repository root")
    args = parser.parse_args(argv)
    root = args.root or repo_root()
    if args.write:
        for path in write(root):
            print(f"wrote {path}")
        return 0
    if args.check:
        stale = check(root)
        for path in stale:
            print(
                f"{path} is out of date: run `python -m dsi_operator.api.crd --write`",
                file=sys.stderr,
            )
        return 1 if stale else 0
    sys.stdout.write(crd_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
