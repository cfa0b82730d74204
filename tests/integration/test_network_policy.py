"""spec.networkPolicy on the real API server: one NetworkPolicy per group, owned by the
resource; one deleted by hand comes back; scaling down removes its group's; turning the
setting off removes them all. (The local cluster's networking does not enforce policies:
what they let in is proven on the rendered objects in tests/unit/test_render.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from dsi_localcluster.harness import dsi_manifest
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration


def _policies(kube: Any, ns: str) -> dict[str, Any]:
    from kubernetes import client

    items = client.NetworkingV1Api(kube.api).list_namespaced_network_policy(ns).items
    return {p.metadata.name: p for p in items if p.metadata.deletion_timestamp is None}


def _wait_names(kube: Any, ns: str, want: set[str], what: str, op: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def done() -> bool:
        found.clear()
        found.update(_policies(kube, ns))
        return set(found) == want

    wait_for(done, 60, what, lambda: f"policies: {sorted(_policies(kube, ns))}\n{op.log_tail(30)}")
    return found


def _patch(kube: Any, ns: str, name: str, spec: dict[str, Any]) -> None:
    kube.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": spec})


def test_network_policies_follow_the_groups(kube: Any, namespace: str, operator: Any) -> None:
    from kubernetes import client

    name = "fenced"
    body = dsi_manifest(name, tp=2, replicas=2, networkPolicy={"enabled": True})
    created = kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    both = {f"{name}-g0-ranks", f"{name}-g1-ranks"}
    pols = _wait_names(kube, namespace, both, "a policy per group", operator)
    for pol in pols.values():
        (owner,) = pol.metadata.owner_references
        assert (owner.kind, owner.uid, owner.controller) == (
            "DeepSpeedInference",
            created["metadata"]["uid"],
            True,
        )
        assert pol.spec.policy_types == ["Ingress"]

    # Deleted by hand: applied again.
    old_uid = pols[f"{name}-g1-ranks"].metadata.uid
    client.NetworkingV1Api(kube.api).delete_namespaced_network_policy(f"{name}-g1-ranks", namespace)
    back = wait_for(
        lambda: (
            (lambda p: p if p.metadata.uid != old_uid else None)(
                _policies(kube, namespace).get(f"{name}-g1-ranks")
            )
            if f"{name}-g1-ranks" in _policies(kube, namespace)
            else None
        ),
        60,
        "the deleted policy re-created",
        lambda: operator.log_tail(30),
    )
    assert back.spec.pod_selector.match_labels["deepspeed.ai/group"] == "1"

    _patch(kube, namespace, name, {"replicas": 1})
    _wait_names(kube, namespace, {f"{name}-g0-ranks"}, "group 1's policy removed", operator)

    _patch(kube, namespace, name, {"networkPolicy": {"enabled": False}})
    _wait_names(kube, namespace, set(), "every policy removed", operator)
