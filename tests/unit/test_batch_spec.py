"""The DeepSpeedBatchInference spec: validation names the field, the CRD is generated from
the same models (and shares the cluster fields with DeepSpeedInference's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dsi_operator.api import crd
from dsi_operator.api.batch_spec import DeepSpeedBatchInferenceSpec, parse_batch_spec
from dsi_operator.api.spec import ClusterSpec
from dsi_operator.util.errors import describe_validation_error
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]
MIN: dict[str, Any] = {
    "model": {"name": "facebook/opt-125m"},
    "input": {"path": "/data/in.jsonl"},
    "output": {"path": "/data/out"},
}


def _error(**changes: Any) -> str:
    with pytest.raises(ValidationError) as info:
        parse_batch_spec({**MIN, **changes})
    return describe_validation_error(info.value, prefix="spec.", limit=5)


def test_defaults() -> None:
    s = parse_batch_spec(MIN)
    assert (s.replicas, s.tensor_parallel_size, s.batch_size, s.rows_per_shard) == (1, 1, 16, 1000)
    assert (s.generation.max_tokens, s.generation.temperature) == (64, 0.0)
    assert (s.restart_policy.max_group_restarts, s.restart_policy.max_job_retries) == (3, 2)
    assert (s.input.format, s.input.prompt_column, s.output.format) == ("jsonl", "prompt", "jsonl")


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"replicas": 0}, "spec.replicas"),
        ({"input": {"path": "rel/path"}}, "relative to the volume with claimName"),
        ({"input": {"claimName": "d", "path": "/abs"}}, "relative to the volume with claimName"),
        ({"output": {"claimName": "d", "path": "a/../.."}}, "'..'"),
        ({"input": {"path": "/x", "format": "csv"}}, "spec.input.format"),
        ({"generation": {"topP": 0}}, "spec.generation.topP"),
        ({"batchSize": 0}, "spec.batchSize"),
        ({"tensorParallelSize": 3, "ranksPerPod": 2}, "multiple of ranksPerPod"),
        ({"serve": {}}, "spec.serve"),  # serving-only fields are not batch fields
    ],
)
def test_bad_values_name_the_field(changes: dict[str, Any], names: str) -> None:
    assert names in _error(**changes)


def test_shares_the_cluster_fields_of_serving() -> None:
    assert set(ClusterSpec.model_fields) <= set(DeepSpeedBatchInferenceSpec.model_fields)
    batch = crd.batch_openapi_schema()["properties"]["spec"]["properties"]
    serving = crd.openapi_schema()["properties"]["spec"]["properties"]
    for key in ("model", "gpu", "resources", "head", "env", "podTemplate", "placement"):
        assert batch[key] == serving[key], key


def test_crd_is_generated_and_in_sync() -> None:
    for rel in crd.BATCH_CRD_PATHS:
        assert (ROOT / rel).read_text() == crd.batch_crd_yaml(), f"{rel}: run make generate"
    doc = crd.batch_crd()
    assert doc["metadata"]["name"] == "deepspeedbatchinferences.deepspeed.ai"
    assert doc["spec"]["names"]["shortNames"] == ["dsbi"]
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:4] == ["Phase", "Progress", "Rows/s", "Groups"]
    rules = [
        r["rule"]
        for r in version["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "x-kubernetes-validations"
        ]
    ]
    assert "self == oldSelf" in rules


def test_numeric_exclusive_bounds_become_openapi_v3() -> None:
    top_p = crd.batch_openapi_schema()["properties"]["spec"]["properties"]["generation"][
        "properties"
    ]["topP"]
    assert (top_p["minimum"], top_p["exclusiveMinimum"]) == (0.0, True)


BATCH_EXAMPLES = sorted(
    p
    for p in (ROOT / "examples").glob("*.yaml")
    if yaml.safe_load(p.read_text()).get("kind") == "DeepSpeedBatchInference"
)


def test_there_is_a_batch_example() -> None:
    assert [p.name for p in BATCH_EXAMPLES] == ["tiny-batch-local.yaml"]


@pytest.mark.parametrize("path", BATCH_EXAMPLES, ids=lambda p: p.name)
def test_batch_examples_parse_and_match_the_crd(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    spec = parse_batch_spec(doc["spec"])
    assert spec.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc["spec"]
    # OpenAPI v3.0 (boolean exclusiveMinimum) is JSON Schema draft 4 in this respect.
    jsonschema.Draft4Validator(crd.batch_openapi_schema()).validate(doc)
