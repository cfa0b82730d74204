"""spec.placement on the real control plane: the kwok GPU nodes are labelled into two racks,
the real scheduler places the pods, and every group ends up inside one rack with the two
groups in different racks; a rack label no node carries is reported by preflight."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dsi_localcluster.harness import dsi_manifest, formed_pods, get_dsi
from dsi_localcluster.manifests import GPU_NODE_PREFIX
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration

RACK = "test.deepspeed.ai/rack"


@pytest.fixture
def racks(kube: Any) -> Iterator[dict[str, str]]:
    """Label the kwok GPU nodes into racks a and b (half each); unlabel them afterwards."""
    nodes = sorted(
        n.metadata.name
        for n in kube.core.list_node().items
        if n.metadata.name.startswith(GPU_NODE_PREFIX)
    )
    assert len(nodes) >= 4, nodes
    rack_of = {n: "a" if i < len(nodes) // 2 else "b" for i, n in enumerate(nodes)}
    for n, rack in rack_of.items():
        kube.core.patch_node(n, {"metadata": {"labels": {RACK: rack}}})
    try:
        yield rack_of
    finally:
        for n in rack_of:
            kube.core.patch_node(n, {"metadata": {"labels": {RACK: None}}})


def test_each_group_stays_in_one_rack_and_groups_spread(
    kube: Any, namespace: str, operator: Any, racks: dict[str, str]
) -> None:
    name = "placed"
    placement = {"groupDomain": {"topologyKey": RACK}, "spreadGroups": {"topologyKey": RACK}}
    body = dsi_manifest(name, tp=4, replicas=2, placement=placement)
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    pods = wait_for(
        lambda: formed_pods(kube.custom, kube.core, namespace, name, 4, 2),
        180,
        "both groups formed",
        lambda: operator.log_tail(30),
    )
    rack_of_group: dict[int, set[str]] = {}
    for (g, _r), pod in pods.items():
        rack_of_group.setdefault(g, set()).add(racks[pod.spec.node_name])
    placed = {g: sorted(r) for g, r in rack_of_group.items()}
    print(f"racks per group: {placed}")
    assert all(len(r) == 1 for r in rack_of_group.values()), placed
    assert rack_of_group[0] != rack_of_group[1], placed
    cap = next(
        c
        for c in get_dsi(kube.custom, namespace, name)["status"]["conditions"]
        if c["type"] == "GPUCapacity"
    )
    assert cap["status"] == "True", cap


def test_a_domain_label_no_node_has_is_reported(kube: Any, namespace: str, operator: Any) -> None:
    name = "nodomain"
    placement = {"groupDomain": {"topologyKey": "example.com/no-such-label"}}
    body = dsi_manifest(name, tp=2, replicas=1, placement=placement)
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def reported() -> dict[str, Any] | None:
        for c in (get_dsi(kube.custom, namespace, name).get("status") or {}).get(
            "conditions"
        ) or []:
            if c["type"] == "GPUCapacity" and c["reason"] == "GroupDoesNotFitADomain":
                return dict(c)
        return None

    c = wait_for(reported, 60, "GPUCapacity GroupDoesNotFitADomain", lambda: operator.log_tail(30))
    assert c["status"] == "False"
    assert "no matching node carries the label example.com/no-such-label" in c["message"]
