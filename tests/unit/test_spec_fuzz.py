"""Property-based tests of the spec: generated from the shipped CRD's schema (issue 11 item 3).

The pure path, over 1200 generated specs: every spec the CRD's structure accepts either
parses and renders, or is refused by pydantic for one of the CRD's rules beyond structure
(CEL rules, keyed lists), which the API server enforces too; every spec with one leaf made
invalid is refused naming that field. tests/integration/test_spec_fuzz_api.py asks the real
API server the same questions.
"""

from __future__ import annotations

import json
from typing import Any

from dsi_localcluster.specfuzz import field_of, invalid_specs, rule_messages, valid_specs
from dsi_operator.api.spec import parse_spec
from dsi_operator.serving.render import render_children
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError
from sizes import fuzz_examples

FUZZ = settings(
    max_examples=fuzz_examples(600),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
UID = "00000000-0000-0000-0000-00000000f022"
Case = tuple[dict[str, Any], tuple[str, ...]]


@FUZZ
@given(valid_specs())
def test_structurally_valid_specs_render_or_break_a_rule_beyond_structure(
    spec: dict[str, Any],
) -> None:
    try:
        s = parse_spec(spec)
    except ValidationError as e:
        assert any(m in str(e) for m in rule_messages()), str(e)
        return
    children = render_children("fuzz", "ns", UID, s)
    kinds = [c["kind"] for c in children]
    policies = ["NetworkPolicy"] * s.replicas if s.network_policy.enabled else []
    assert kinds == ["RayService", *["Service"] * s.replicas, "Service", *policies]
    workers = children[0]["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])
    assert len(workers) == s.replicas * s.pods_per_group
    json.dumps(children)  # plain data all the way down


@FUZZ
@given(invalid_specs())
def test_an_invalid_leaf_is_refused_naming_the_field(
    case: tuple[dict[str, Any], tuple[str, ...]],
) -> None:
    spec, path = case
    try:
        parse_spec(spec)
    except ValidationError as e:
        assert field_of(path) in str(e), f"{path}: {e}"
        return
    raise AssertionError(f"accepted an invalid {'.'.join(path)}: {json.dumps(spec)[:500]}")
