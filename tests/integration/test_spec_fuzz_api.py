"""Generated specs against the real API server (issue 11 item 3), all as server-side dry runs.

* A structurally valid spec: the API server accepts it exactly when the operator's model
  does (they disagree only if the CRD and spec.py drift, CEL rules included), and what the
  operator renders from an accepted one (RayService, Services) is accepted too.
* A spec with one leaf made invalid: refused, and the message names that field.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from dsi_localcluster.specfuzz import field_of, invalid_specs, valid_specs
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from dsi_operator.api.spec import parse_spec
from dsi_operator.serving.render import render_children
from hypothesis import HealthCheck, given, settings
from kubernetes.client.rest import ApiException
from pydantic import ValidationError
from sizes import fuzz_examples

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=fuzz_examples(150),
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,  # one namespace for all examples: dry runs only
    ],
)
NAME = "fuzz"


def _dry_run_dsi(kube: Any, namespace: str, spec: dict[str, Any]) -> str | None:
    """None when the API server accepts the DSI, else its message."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSpeedInference",
            "metadata": {"name": NAME}, "spec": spec}  # fmt: skip
    try:
        kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All"
        )
    except ApiException as e:
        assert e.status == 422, (e.status, e.body)
        return str(json.loads(e.body).get("message", e.body))
    return None


def _dry_run_child(kube: Any, namespace: str, obj: dict[str, Any]) -> None:
    if obj["kind"] == "Service":
        kube.core.create_namespaced_service(namespace, obj, dry_run="All")
    elif obj["kind"] == "NetworkPolicy":
        from kubernetes import client

        client.NetworkingV1Api(kube.api).create_namespaced_network_policy(
            namespace, obj, dry_run="All"
        )
    else:
        group, version = obj["apiVersion"].split("/")
        kube.custom.create_namespaced_custom_object(
            group, version, namespace, "rayservices", obj, dry_run="All"
        )


@FUZZ
@given(spec=valid_specs())
def test_api_server_and_model_agree_and_rendered_children_are_accepted(
    kube: Any, namespace: str, dsi_crd: None, spec: dict[str, Any]
) -> None:
    refused = _dry_run_dsi(kube, namespace, spec)
    try:
        parsed = parse_spec(spec)
    except ValidationError as e:
        assert refused is not None, f"API server accepted what the model refuses: {e}"
        return
    assert refused is None, f"API server refused what the model accepts: {refused}"
    for child in render_children(NAME, namespace, "00000000-0000-0000-0000-00000000f022", parsed):
        child["metadata"].pop("ownerReferences")  # the owner does not exist (dry run)
        _dry_run_child(kube, namespace, child)


@FUZZ
@given(case=invalid_specs())
def test_api_server_refuses_an_invalid_leaf_naming_the_field(
    kube: Any, namespace: str, dsi_crd: None, case: tuple[dict[str, Any], tuple[str, ...]]
) -> None:
    spec, path = case
    refused = _dry_run_dsi(kube, namespace, spec)
    assert refused is not None, f"accepted an invalid {'.'.join(path)}"
    assert field_of(path) in refused, refused
