"""GPU Operator preflight with and without a ClusterPolicy (nvidia.com/v1), and
spec.gpu.requireGPUOperator blocking creation until the policy is ready.

The ClusterPolicy CRD here is a minimal stand-in for the GPU Operator's (same group, version,
kind and status subresource); it is cluster-scoped, so the test removes it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dsi_localcluster.harness import dsi_manifest, get_dsi
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.integration


CP_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "clusterpolicies.nvidia.com"},
    "spec": {
        "group": "nvidia.com",
        "names": {
            "kind": "ClusterPolicy",
            "listKind": "ClusterPolicyList",
            "plural": "clusterpolicies",
            "singular": "clusterpolicy",
        },
        "scope": "Cluster",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def _delete_cp_crd(kube: Any, kubectl: Any) -> None:
    try:
        kube.apiext.delete_custom_resource_definition("clusterpolicies.nvidia.com")
    except ApiException as e:
        if e.status != 404:
            raise
    kubectl("wait", "--for=delete", "crd/clusterpolicies.nvidia.com", "--timeout=60s", check=False)


@pytest.fixture
def no_gpu_operator(kube: Any, kubectl: Any) -> Iterator[None]:
    """No ClusterPolicy CRD during the test (restored to absent afterwards)."""
    _delete_cp_crd(kube, kubectl)
    yield
    _delete_cp_crd(kube, kubectl)


def cond(kube: Any, namespace: str, name: str, ctype: str) -> dict[str, Any] | None:
    st = get_dsi(kube.custom, namespace, name).get("status") or {}
    for c in st.get("conditions") or []:
        if c["type"] == ctype:
            return dict(c)
    return None


def phase(kube: Any, namespace: str, name: str) -> tuple[str | None, str]:
    st = get_dsi(kube.custom, namespace, name).get("status") or {}
    return st.get("phase"), st.get("message", "")


def _required_and_absent_blocks(kube: Any, namespace: str, d: Callable[[], str]) -> None:
    """Required and absent: Pending with a message, nothing created, a Preflight Event."""
    kube.custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        dsi_manifest("req", tp=1, replicas=1, gpu={"requireGPUOperator": True}),
    )
    ph, msg = wait_for(
        lambda: (lambda p: p if p[0] == "Pending" else None)(phase(kube, namespace, "req")),
        60,
        "Pending",
        d,
    )
    assert "requireGPUOperator" in msg and "not installed" in msg
    with pytest.raises(ApiException) as err:
        kube.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", "req")
    assert err.value.status == 404

    # The operator patches status before it posts Events, so the Event may come a bit later.
    def preflight_event() -> bool:
        evs = kube.core.list_namespaced_event(namespace).items
        return any(e.reason == "Preflight" and "GPUOperatorReady=False" in e.message for e in evs)

    assert wait_for(preflight_event, 30, "Preflight Event naming GPUOperatorReady=False", d)


def _cluster_policy_not_ready_still_blocks(
    kube: Any, kubectl: Any, namespace: str, d: Callable[[], str]
) -> None:
    """A ClusterPolicy present but not ready: still blocked, the reason says so."""
    kube.apiext.create_custom_resource_definition(CP_CRD)
    kubectl(
        "wait", "--for=condition=Established", "crd/clusterpolicies.nvidia.com", "--timeout=60s"
    )
    kube.custom.create_cluster_custom_object(
        "nvidia.com",
        "v1",
        "clusterpolicies",
        {
            "apiVersion": "nvidia.com/v1",
            "kind": "ClusterPolicy",
            "metadata": {"name": "cluster-policy"},
            "spec": {},
        },
    )
    kube.custom.patch_cluster_custom_object_status(
        "nvidia.com", "v1", "clusterpolicies", "cluster-policy", {"status": {"state": "notReady"}}
    )
    c = wait_for(
        lambda: (lambda c: c if c and c["reason"] == "ClusterPolicyNotReady" else None)(
            cond(kube, namespace, "req", "GPUOperatorReady")
        ),
        60,
        "ClusterPolicyNotReady",
        d,
    )
    assert "notReady" in c["message"]
    assert phase(kube, namespace, "req")[0] == "Pending"


def test_gpu_operator_conditions_and_requirement(
    kube: Any, kubectl: Any, namespace: str, no_gpu_operator: None, operator: Any
) -> None:
    def d() -> str:
        st = get_dsi(kube.custom, namespace, "req").get("status")
        return f"{json.dumps(st, indent=1)[:3000]}\n{operator.log_tail(40)}"

    # 1. No GPU Operator, not required: reported, not blocking.
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dsi_manifest("opt", tp=1, replicas=1)
    )
    c = wait_for(lambda: cond(kube, namespace, "opt", "GPUOperatorReady"), 60, "condition")
    assert c["status"] == "False" and c["reason"] == "NotInstalled"
    wait_for(
        lambda: phase(kube, namespace, "opt")[0] in ("Provisioning", "Forming"), 60, "not blocked"
    )
    # 2. Required and absent; 3. a ClusterPolicy present but not ready.
    _required_and_absent_blocks(kube, namespace, d)
    _cluster_policy_not_ready_still_blocks(kube, kubectl, namespace, d)

    # 4. Ready: the condition turns True and the resource provisions.
    kube.custom.patch_cluster_custom_object_status(
        "nvidia.com", "v1", "clusterpolicies", "cluster-policy", {"status": {"state": "ready"}}
    )
    wait_for(
        lambda: (cond(kube, namespace, "req", "GPUOperatorReady") or {}).get("status") == "True",
        60,
        "GPUOperatorReady True",
        d,
    )
    wait_for(
        lambda: phase(kube, namespace, "req")[0] in ("Provisioning", "Forming"),
        90,
        "provisioning once the GPU Operator is ready",
        d,
    )
    kube.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", "req")
