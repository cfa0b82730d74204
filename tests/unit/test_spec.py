"""The DeepSpeedInference spec/status models: defaults, validation, aliases, examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dsi_operator.api import crd
from dsi_operator.api.spec import (
    DEFAULT_WORKER_IMAGE,
    DeepSpeedInference,
    DeepSpeedInferenceSpec,
    DeepSpeedInferenceStatus,
    GroupStatus,
    Phase,
    parse_spec,
)
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(
    p
    for p in (ROOT / "examples").glob("*.yaml")
    if yaml.safe_load(p.read_text()).get("kind") == "DeepSpeedInference"
)
MINIMAL: dict[str, Any] = {
    "model": {"name": "facebook/opt-66b", "dtype": "float16"},
    "tensorParallelSize": 4,
    "replicas": 2,
}


def _dump(spec: DeepSpeedInferenceSpec) -> dict[str, Any]:
    out: dict[str, Any] = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return out


def test_minimal_spec_from_the_issue_gets_defaults() -> None:
    s = parse_spec(MINIMAL)
    assert s.tensor_parallel_size == 4 and s.replicas == 2
    assert s.image == DEFAULT_WORKER_IMAGE
    assert s.resources.gpus == 1
    assert s.gpu.resource_name == "nvidia.com/gpu"
    assert s.gpu.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [t.model_dump(exclude_none=True) for t in s.gpu.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert s.gpu.runtime_class_name is None
    assert s.gpu.shared_memory_size == "16Gi"
    assert s.gpu.require_gpu_operator is False
    assert s.serve.port == 8000 and s.serve.route_prefix == "/"
    assert s.restart_policy.max_restarts == 5
    assert s.restart_policy.window_seconds == 600
    assert s.restart_policy.backoff.initial_seconds == 10
    assert s.restart_policy.backoff.max_seconds == 300
    assert s.restart_policy.backoff.multiplier == 2.0
    assert s.restart_policy.formation_timeout_seconds == 900
    assert s.master_port == 29500
    assert s.served_model_name == "facebook/opt-66b"


def test_camel_case_aliases_and_python_names_both_parse() -> None:
    by_alias = parse_spec({**MINIMAL, "gpu": {"requireGPUOperator": True, "resourceName": "x/gpu"}})
    by_name = DeepSpeedInferenceSpec.model_validate(
        {
            "model": {"name": "facebook/opt-66b"},
            "tensor_parallel_size": 4,
            "gpu": {"require_gpu_operator": True, "resource_name": "x/gpu"},
        }
    )
    assert by_alias.gpu.require_gpu_operator and by_name.gpu.require_gpu_operator
    dumped = _dump(by_alias)
    assert dumped["gpu"]["requireGPUOperator"] is True
    assert "tensorParallelSize" in dumped and "restartPolicy" in dumped


def test_dump_round_trips() -> None:
    s = parse_spec(MINIMAL)
    assert parse_spec(_dump(s)) == s


def test_parse_spec_accepts_a_parsed_model_and_read_only_mappings() -> None:
    from types import MappingProxyType

    s = parse_spec(MINIMAL)
    assert parse_spec(s) is s
    proxied = MappingProxyType({**MINIMAL, "model": MappingProxyType(MINIMAL["model"])})
    assert parse_spec(proxied) == s


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"tensorParallelSize": 0}, "tensorParallelSize"),
        ({"tensorParallelSize": 65}, "tensorParallelSize"),
        ({"replicas": -1}, "replicas"),
        ({"model": {"name": "a/b", "dtype": "int8"}}, "dtype"),
        ({"model": {"dtype": "float16"}}, "model"),
        ({"model": {"name": "a/b", "pvc": {"claimName": "weights"}}}, "model"),
        ({"model": {"name": "not a hub id"}}, "name"),
        ({"resources": {"cpu": "lots"}}, "cpu"),
        ({"resources": {"gpus": 17}}, "gpus"),
        ({"gpu": {"tolerations": [{"operator": "Maybe"}]}}, "operator"),
        ({"gpu": {"resourceName": "Not A Resource"}}, "resourceName"),
        ({"serve": {"routePrefix": "no-slash"}}, "routePrefix"),
        ({"restartPolicy": {"backoff": {"multiplier": 0.5}}}, "multiplier"),
        ({"masterPort": 80}, "masterPort"),
        ({"unknownField": 1}, "unknownField"),
        ({"tensorParallelSize": 64, "replicas": 9}, "replicas * tensorParallelSize"),
        ({"podTemplate": {"labels": {"deepspeed.ai/rank": "0"}}}, "deepspeed.ai/"),
        ({"serve": {"apiKeySecret": {"name": "Not_A_Secret"}}}, "apiKeySecret.name"),
        ({"serve": {"apiKeySecret": {"name": "k", "key": "bad key"}}}, "apiKeySecret.key"),
        ({"serve": {"apiKeySecret": {"key": "token"}}}, "apiKeySecret.name"),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "env: duplicate"),
        ({"serve": {"maxModelLen": 512, "maxNewTokens": 512}}, "serve.maxModelLen"),
    ],
)
def test_invalid_specs_are_rejected_naming_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_spec({**MINIMAL, **patch})
    assert field in str(err.value)


def test_pvc_model_and_served_model_name() -> None:
    s = parse_spec({"model": {"pvc": {"claimName": "weights", "path": "llama/7b/"}}})
    assert s.model.name is None and s.model.pvc is not None
    assert s.served_model_name == "7b"
    s = parse_spec({"model": {"pvc": {"claimName": "weights"}, "servedModelName": "mine"}})
    assert s.served_model_name == "mine"
    assert parse_spec({"model": {"pvc": {"claimName": "weights"}}}).served_model_name == "weights"


def test_quantities_accept_yaml_numbers() -> None:
    s = parse_spec(
        {**MINIMAL, "resources": {"cpu": 4, "memory": "64Gi"}, "head": {"resources": {"cpu": 0.5}}}
    )
    assert s.resources.cpu == "4" and s.resources.memory == "64Gi"
    assert s.head.resources.cpu == "0.5"
    with pytest.raises(ValidationError):
        parse_spec({**MINIMAL, "resources": {"cpu": True}})


def test_status_model_parses_phase_and_rejects_undeclared_fields() -> None:
    st = DeepSpeedInferenceStatus.model_validate(
        {
            "phase": "Ready",
            "readyReplicas": 2,
            "restarts": 1,
            "groups": [{"index": 0, "readyRanks": 4, "restartPods": ["u1"], "rayCluster": "c"}],
        }
    )
    assert st.phase is Phase.Ready and st.ready_replicas == 2
    dumped = st.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["groups"][0]["restartPods"] == ["u1"]
    assert dumped["groups"][0]["rayCluster"] == "c"
    assert DeepSpeedInferenceStatus().phase is None
    # The CRD would prune these silently; the model names them instead.
    with pytest.raises(ValidationError, match="controllerNote"):
        DeepSpeedInferenceStatus.model_validate(
            {"groups": [{"index": 0, "controllerNote": {"a": 1}}]}
        )
    assert GroupStatus(index=1).restarts == 0


# --- The examples ------------------------------------------------------------------------------


def test_there_are_examples_for_the_simulated_and_a_real_cluster() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"tiny-cpu.yaml", "opt-66b.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_round_trip_through_the_model(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    obj = DeepSpeedInference.model_validate(doc)
    assert obj.api_version == "deepspeed.ai/v1alpha1" and obj.kind == "DeepSpeedInference"
    # Everything the example says survives a parse/dump (no field silently dropped/renamed).
    dumped = obj.spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert dumped == doc["spec"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_generated_crd_schema(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    schema = crd.openapi_schema()
    jsonschema.validate(doc, schema)


# --- Server-side defaulting equals pydantic defaulting -------------------------------------------


def apply_structural_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """What the API server does with `default`s: fill absent properties, recursively."""
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = apply_structural_defaults(sub, obj[name])
    elif isinstance(obj, list) and "items" in schema:
        obj = [apply_structural_defaults(schema["items"], item) for item in obj]
    return obj


@pytest.mark.parametrize(
    "spec",
    [
        MINIMAL,
        {"model": {"pvc": {"claimName": "w"}}},
        *[yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES],
    ],
)
def test_crd_defaults_match_model_defaults(spec: dict[str, Any]) -> None:
    schema = crd.openapi_schema()["properties"]["spec"]
    server_defaulted = apply_structural_defaults(schema, spec)
    # What the controller will see (API server defaults) parses to the same model as the
    # user's sparse spec defaulted by pydantic: the two default sources agree.
    assert parse_spec(server_defaulted) == parse_spec(spec)
    # And the server fills in every field that has a pydantic default (no gaps).
    model_defaults = parse_spec(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
    for key in ("gpu", "serve", "restartPolicy", "head"):
        for sub in model_defaults[key]:
            assert sub in server_defaulted[key], f"{key}.{sub} has no CRD default"
