"""The rendered pods pass PodSecurity admission at level restricted (issue 11 item 6).

A namespace labelled ``pod-security.kubernetes.io/enforce=restricted`` makes the API server
refuse any pod that misses one of the level's rules. KubeRay creates the head and worker pods
from the RayService the operator rendered, so pods appearing there proves the rendering;
``securityLevel: baseline`` in the same namespace is the control: its pods are refused.
"""

from __future__ import annotations

from typing import Any

import pytest
from dsi_localcluster.harness import all_running, dsi_manifest, worker_pods
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration


def _enforce_restricted(kube: Any, namespace: str) -> None:
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    kube.core.patch_namespace(namespace, {"metadata": {"labels": labels}})


def _head_pods(kube: Any, namespace: str, name: str) -> list[Any]:
    pods = kube.core.list_namespaced_pod(namespace, label_selector="ray.io/node-type=head").items
    return [p for p in pods if p.metadata.labels.get("deepspeed.ai/inference") == name]


def _refusals(kube: Any, namespace: str) -> list[str]:
    events = kube.core.list_namespaced_event(namespace).items
    return [e.message for e in events if "violates PodSecurity" in (e.message or "")]


def test_pods_are_admitted_at_restricted_and_baseline_ones_are_refused(
    kube: Any, namespace: str, operator: Any
) -> None:
    _enforce_restricted(kube, namespace)
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dsi_manifest("strict", tp=2, replicas=1)
    )
    pods = wait_for(
        lambda: (lambda p: p if all_running(p, 2, 1) else None)(
            worker_pods(kube.core, namespace, "strict")
        ),
        120,
        "2 worker pods admitted and Running in a restricted namespace",
        lambda: f"refusals: {_refusals(kube, namespace)[:3]}\n{operator.log_tail(20)}",
    )
    wait_for(lambda: _head_pods(kube, namespace, "strict"), 60, "the head pod admitted")
    for pod in [*pods.values(), *_head_pods(kube, namespace, "strict")]:
        assert pod.spec.security_context.run_as_non_root is True
        for c in [*pod.spec.containers, *(pod.spec.init_containers or [])]:
            assert c.security_context.allow_privilege_escalation is False, c.name
            assert c.security_context.capabilities.drop == ["ALL"], c.name
    assert _refusals(kube, namespace) == []

    # The control: the same resource rendered at baseline is refused by the API server.
    loose = dsi_manifest("loose", tp=2, replicas=1, podTemplate={"securityLevel": "baseline"})
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, loose)
    refusals = wait_for(
        lambda: _refusals(kube, namespace), 120, "KubeRay's pod creation refused by PodSecurity"
    )
    assert any("runAsNonRoot" in m or "allowPrivilegeEscalation" in m for m in refusals), refusals
    assert worker_pods(kube.core, namespace, "loose") == {}
