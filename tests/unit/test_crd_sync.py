"""The CRD files are generated from the pydantic models, structural, and in sync."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_operator.api import crd
from dsi_operator.api import labels as L

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "run `python -m dsi_operator.api.crd --write`"


@pytest.mark.parametrize("rel", crd.CRD_PATHS, ids=str)
def test_committed_crd_equals_generated(rel: Path) -> None:
    path = ROOT / rel
    assert path.exists(), f"{rel} missing: {REGENERATE}"
    assert path.read_text() == crd.crd_yaml(), f"{rel} drifted from spec.py: {REGENERATE}"


def test_check_cli_passes_on_the_repo_and_fails_on_drift(tmp_path: Path) -> None:
    assert crd.main(["--check", "--root", str(ROOT)]) == 0
    assert crd.main(["--check", "--root", str(tmp_path)]) == 1  # files missing
    assert crd.main(["--write", "--root", str(tmp_path)]) == 0
    assert crd.main(["--check", "--root", str(tmp_path)]) == 0
    stale = tmp_path / crd.CRD_PATHS[1]
    stale.write_text(stale.read_text().replace("tensorParallelSize", "tpSize", 1))
    assert crd.main(["--check", "--root", str(tmp_path)]) == 1


def _crd() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / crd.CRD_PATHS[0]).read_text())
    assert isinstance(doc, dict)
    return doc


def test_names_scope_and_version() -> None:
    spec = _crd()["spec"]
    assert _crd()["metadata"]["name"] == "deepspeedinferences.deepspeed.ai"
    assert spec["group"] == "deepspeed.ai" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "DeepSpeedInference",
        "listKind": "DeepSpeedInferenceList",
        "plural": "deepspeedinferences",
        "singular": "deepspeedinference",
        "shortNames": ["dsi"],
        "categories": ["deepspeed", "inference"],
    }
    (version,) = spec["versions"]
    assert version["name"] == L.VERSION and version["served"] and version["storage"]


def test_status_and_scale_subresources() -> None:
    (version,) = _crd()["spec"]["versions"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.readyReplicas",
        "labelSelectorPath": ".status.selector",
    }


def test_printer_columns() -> None:
    (version,) = _crd()["spec"]["versions"]
    cols = {c["name"]: c for c in version["additionalPrinterColumns"]}
    for name in ("Phase", "Ready", "TP", "Replicas", "Restarts", "Endpoint", "Age"):
        assert name in cols
        assert cols[name].get("priority", 0) == 0, f"{name} must show without -o wide"
    assert cols["Phase"]["jsonPath"] == ".status.phase"
    assert cols["Ready"]["jsonPath"] == ".status.ready"
    assert cols["TP"]["jsonPath"] == ".spec.tensorParallelSize"
    assert cols["Restarts"]["jsonPath"] == ".status.restarts"
    assert cols["Endpoint"]["jsonPath"] == ".status.endpoint"
    assert cols["Age"]["type"] == "date"


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _schema() -> dict[str, Any]:
    (version,) = _crd()["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    missing = [
        path
        for path, node in _walk(_schema(), "")
        for name, sub in node.get("properties", {}).items()
        if path != "" or name != "metadata"  # the API server forbids anything but type there
        if not sub.get("description")
    ]
    assert missing == []


def test_schema_is_structural() -> None:
    for path, node in _walk(_schema(), ""):
        assert "$ref" not in node and "$defs" not in node, path
        assert "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:
            # the only anyOf allowed: int-or-string quantities
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
        else:
            assert "type" in node, f"{path} has no type"
        if node.get("type") == "null":
            pytest.fail(f"{path} is a null type")
    # The spec is fully structural: no preserve-unknown-fields except free-form EnvVar sources.
    spec = _schema()["properties"]["spec"]
    preserved = [p for p, n in _walk(spec, "spec") if n.get("x-kubernetes-preserve-unknown-fields")]
    assert preserved == ["spec.env[].valueFrom"]


def test_metadata_is_type_only() -> None:
    assert _schema()["properties"]["metadata"] == {"type": "object"}


def test_defaults_enums_bounds_and_rules_are_kept() -> None:
    spec = _schema()["properties"]["spec"]
    props = spec["properties"]
    assert spec["required"] == ["model"]
    assert props["tensorParallelSize"]["minimum"] == 1
    assert props["tensorParallelSize"]["maximum"] == 64
    assert props["replicas"]["default"] == 1 and props["replicas"]["minimum"] == 0
    assert props["model"]["properties"]["dtype"]["enum"] == ["float16", "bfloat16", "float32"]
    assert props["gpu"]["default"] == {}
    assert props["gpu"]["properties"]["resourceName"]["default"] == "nvidia.com/gpu"
    assert props["gpu"]["properties"]["nodeSelector"]["default"] == {
        "nvidia.com/gpu.present": "true"
    }
    assert "default" not in props["gpu"]["properties"]["runtimeClassName"]
    assert props["restartPolicy"]["properties"]["maxRestarts"]["default"] == 5
    assert props["resources"]["properties"]["cpu"]["x-kubernetes-int-or-string"] is True
    rules = [r["rule"] for r in props["model"]["x-kubernetes-validations"]]
    assert rules == ["has(self.name) != has(self.pvc)"]
    assert _schema()["x-kubernetes-validations"][0]["rule"].startswith("self.metadata.name")


def test_status_schema_accepts_controller_bookkeeping() -> None:
    status = _schema()["properties"]["status"]
    props = status["properties"]
    assert props["phase"]["enum"] == [
        "Pending",
        "Provisioning",
        "Forming",
        "Ready",
        "Degraded",
        "Restarting",
        "Failed",
    ]
    for field in (
        "observedGeneration",
        "restarts",
        "readyReplicas",
        "ready",
        "endpoint",
        "message",
        "conditions",
        "groups",
        "selector",
    ):
        assert field in props, field
    cond = props["conditions"]["items"]["properties"]
    assert set(cond) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    group = props["groups"]["items"]
    # Every field is declared: nothing the operator writes is pruned by the API server.
    assert "x-kubernetes-preserve-unknown-fields" not in group
    assert "x-kubernetes-preserve-unknown-fields" not in status
    for field in (
        "index",
        "readyRanks",
        "restarts",
        "lastRestartReason",
        "lastRestartTime",
        "restartingSince",
        "restartPods",
        "restartTimes",
        "backoffUntil",
    ):
        assert field in group["properties"], field
    assert group["properties"]["restartingSince"]["nullable"] is True


def test_generator_on_synthetic_models() -> None:
    from typing import Literal

    from dsi_operator.api.spec import Quantity
    from pydantic import BaseModel, ConfigDict, Field

    class Inner(BaseModel):
        """Inner doc."""

        x: int = Field(default=1, ge=0, description="An x.")

    class Outer(BaseModel):
        model_config = ConfigDict(extra="allow")

        inner: Inner | None = Field(default=None, description="Optional nested model.")
        kind: Literal["only"] = Field(default="only", description="A constant.")
        free: dict[str, Any] | None = Field(default=None, description="Free-form.")
        size: Quantity | None = Field(default=None, description="A quantity.")
        tags: dict[str, str] = Field(default_factory=dict, max_length=3, description="Tags.")

    spec = crd.model_schema(Outer, nullable=False)
    props = spec["properties"]
    assert spec["x-kubernetes-preserve-unknown-fields"] is True  # extra="allow"
    assert props["inner"] == {
        "description": "Optional nested model.",
        "type": "object",
        "properties": {
            "x": {"description": "An x.", "type": "integer", "default": 1, "minimum": 0}
        },
    }
    assert props["kind"]["enum"] == ["only"] and props["kind"]["type"] == "string"
    assert props["free"]["x-kubernetes-preserve-unknown-fields"] is True
    assert props["free"]["type"] == "object"
    assert props["size"]["x-kubernetes-int-or-string"] is True and "type" not in props["size"]
    assert props["tags"]["maxProperties"] == 3
    assert "nullable" not in props["inner"]
    assert crd.model_schema(Outer, nullable=True)["properties"]["inner"]["nullable"] is True
