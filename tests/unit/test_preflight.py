"""Preflight evaluation from listed objects: KubeRay CRD, GPU Operator, GPU capacity."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from dsi_operator.serving.preflight import (
    ClusterFacts,
    GPUNeeds,
    capacity_condition,
    evaluate,
    kuberay_condition,
    node_fits,
    toleration_matches,
)

TOL = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
SEL = {"nvidia.com/gpu.present": "true"}


def node(
    name: str,
    gpus: int | str = 8,
    *,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    ready: bool = True,
    unschedulable: bool = False,
    resource: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": SEL if labels is None else labels},
        "spec": {
            "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
            if taints is None
            else taints,
            "unschedulable": unschedulable,
        },
        "status": {
            "allocatable": {resource: str(gpus), "cpu": "32"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def needs(tp: int, per: int = 1, **kw: Any) -> GPUNeeds:
    return GPUNeeds(tp=tp, gpus_per_rank=per, node_selector=SEL, tolerations=TOL, **kw)


def conds(result: Any) -> dict[str, Any]:
    return {c.type: c for c in result.conditions}


def test_all_good() -> None:
    r = evaluate(
        True, [{"metadata": {"name": "cp"}, "status": {"state": "ready"}}], [node("a")], needs(4)
    )
    c = conds(r)
    assert {k: v.status for k, v in c.items()} == {
        "KubeRayAvailable": "True",
        "GPUOperatorReady": "True",
        "GPUCapacity": "True",
    }
    assert r.blocking is None and r.warnings == ()
    assert "fit 2 group(s)" in c["GPUCapacity"].message


def test_kuberay_missing_blocks() -> None:
    r = evaluate(False, [], [node("a")], needs(1))
    assert conds(r)["KubeRayAvailable"].status == "False"
    assert r.blocking is not None and "rayservices.ray.io" in r.blocking


def test_gpu_operator_absent_is_reported_not_blocking_unless_required() -> None:
    r = evaluate(True, None, [node("a")], needs(1))
    c = conds(r)["GPUOperatorReady"]
    assert c.status == "False" and c.reason == "NotInstalled"
    assert r.blocking is None
    r = evaluate(True, None, [node("a")], needs(1, require_gpu_operator=True))
    assert r.blocking is not None and "requireGPUOperator" in r.blocking


def test_cluster_policy_not_ready() -> None:
    r = evaluate(
        True, [{"metadata": {"name": "cp"}, "status": {"state": "notReady"}}], [node("a")], needs(1)
    )
    c = conds(r)["GPUOperatorReady"]
    assert c.status == "False" and c.reason == "ClusterPolicyNotReady"
    assert "notReady" in c.message
    r = evaluate(True, [], [node("a")], needs(1))
    assert conds(r)["GPUOperatorReady"].reason == "NoClusterPolicy"


def test_capacity_counts_per_node() -> None:
    # two nodes with 3 GPUs each hold two 2-GPU ranks in total, not three
    nodes = [node("a", 3), node("b", 3)]
    cond = capacity_condition(nodes, needs(3, per=2))
    assert "6 allocatable nvidia.com/gpu on 2 matching node(s) fit 2 rank pod(s)" in cond.message
    r = evaluate(True, None, nodes, needs(3, per=2))
    c = conds(r)["GPUCapacity"]
    assert c.status == "False" and c.reason == "Insufficient"
    assert r.blocking is None and r.warnings
    assert evaluate(True, None, nodes, needs(2, per=2)).conditions[2].status == "True"


def test_node_filters() -> None:
    n = needs(1)
    assert node_fits(node("a"), n)
    assert not node_fits(node("a", labels={}), n)
    assert not node_fits(node("a", ready=False), n)
    assert not node_fits(node("a", unschedulable=True), n)
    assert not node_fits(node("a", taints=[{"key": "other", "effect": "NoSchedule"}]), n)
    # PreferNoSchedule taints do not keep pods away
    assert node_fits(node("a", taints=[{"key": "other", "effect": "PreferNoSchedule"}]), n)
    # custom resource name
    custom = GPUNeeds(
        tp=1, resource_name="nvidia.com/mig-1g.10gb", node_selector={}, tolerations=TOL
    )
    mig = capacity_condition([node("m", 7, resource="nvidia.com/mig-1g.10gb")], custom)
    assert "fit 7 group(s)" in mig.message
    plain = capacity_condition([node("m", 7)], custom)
    assert plain.status == "False" and "0 allocatable" in plain.message


def test_toleration_rules() -> None:
    taint = {"key": "k", "value": "v", "effect": "NoSchedule"}
    assert toleration_matches({"operator": "Exists"}, taint)
    assert toleration_matches({"key": "k", "operator": "Exists"}, taint)
    assert toleration_matches({"key": "k", "value": "v"}, taint)
    assert not toleration_matches({"key": "k", "value": "w"}, taint)
    assert not toleration_matches({"key": "k", "operator": "Exists", "effect": "NoExecute"}, taint)


def test_cluster_facts_cache() -> None:
    calls = 0

    async def fetch() -> tuple[bool, list[dict[str, Any]] | None]:
        nonlocal calls
        calls += 1
        return True, None

    async def go() -> None:
        facts = ClusterFacts(fetch, ttl=60)
        for _ in range(5):
            assert await facts.get() == (True, None)

    asyncio.run(go())
    assert calls == 1


def test_cpu_only_ranks_need_matching_nodes_not_gpus() -> None:
    cpu_node = node("cpu", gpus=0, labels={"pool": "cpu"}, taints=[])
    cpu_needs = GPUNeeds(tp=2, gpus_per_rank=0, node_selector={"pool": "cpu"})
    c = conds(evaluate(True, [], [cpu_node], cpu_needs))["GPUCapacity"]
    assert (c.status, c.reason) == ("True", "NoGPUsRequested")
    r = evaluate(True, [], [node("gpu")], cpu_needs)  # only a GPU node, which does not match
    c = conds(r)["GPUCapacity"]
    assert (c.status, c.reason) == ("False", "NoMatchingNodes")
    assert r.warnings and r.warnings[0].startswith("insufficient nodes:")


# --- KubeRay liveness from its leader Lease ----------------------------------------------------

NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


def lease(holder: str | None, renewed_s_ago: float | None, duration: int = 15) -> dict[str, Any]:
    spec: dict[str, Any] = {"leaseDurationSeconds": duration}
    if holder is not None:
        spec["holderIdentity"] = holder
    if renewed_s_ago is not None:
        t = NOW - timedelta(seconds=renewed_s_ago)
        spec["renewTime"] = t.isoformat().replace("+00:00", "Z")
    return {"metadata": {"name": "ray-operator-leader", "namespace": "ray-system"}, "spec": spec}


def test_kuberay_running_while_its_lease_is_renewed() -> None:
    c = kuberay_condition(True, lease("kuberay-abc", 3), NOW)
    assert (c.status, c.reason) == ("True", "Running")
    # Late by less than the slack still counts as running (a slow API server).
    assert kuberay_condition(True, lease("kuberay-abc", 15 + 9), NOW).status == "True"


def test_kuberay_down_when_its_lease_expired_or_was_released() -> None:
    stale = kuberay_condition(True, lease("kuberay-abc", 60), NOW)
    assert (stale.status, stale.reason) == ("False", "ControllerNotRunning")
    assert "ray-system/ray-operator-leader" in stale.message
    assert "restarts resume" in stale.message
    # A stable message (a timestamp, not an age): no status write per pass.
    assert stale.message == kuberay_condition(True, lease("kuberay-abc", 60), NOW).message
    assert (
        kuberay_condition(True, lease("kuberay-abc", 60), NOW + timedelta(seconds=30)).message
        == stale.message
    )
    released = kuberay_condition(True, lease(None, None), NOW)
    assert (released.status, released.reason) == ("False", "ControllerNotRunning")
    assert "never held" in released.message


def test_kuberay_without_a_lease_is_judged_by_its_crd() -> None:
    assert kuberay_condition(True, None, NOW).reason == "CRDPresent"
    assert kuberay_condition(False, lease("x", 1), NOW).reason == "CRDNotFound"


def test_kuberay_down_is_reported_not_blocking() -> None:
    r = evaluate(True, None, [node("a")], needs(1), lease("kuberay-abc", 600), NOW)
    assert r.blocking is None
    assert conds(r)["KubeRayAvailable"].status == "False"
    assert any("not running" in w for w in r.warnings)


def test_cluster_facts_cache_a_none_answer() -> None:
    calls = []

    async def fetch() -> None:
        calls.append(1)

    async def go() -> None:
        facts: ClusterFacts[None] = ClusterFacts(fetch, ttl=60)
        assert await facts.get() is None
        assert await facts.get() is None

    asyncio.run(go())
    assert len(calls) == 1
