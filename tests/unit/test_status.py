"""Status, phase and conditions computation, the no-change diff, and whole passes of the
pure planner (reconcile.plan) over plain data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from dsi_localcluster.builders import DSIWrapper
from dsi_operator.api.spec import Condition, GroupStatus, RestartPolicySpec
from dsi_operator.serving.plan import Observed, declared_shape, plan, safe_parse
from dsi_operator.serving.preflight import GPUNeeds, evaluate
from dsi_operator.serving.restart import NodeInfo, PodInfo, Restart
from dsi_operator.serving.status import (
    IGNORED_KEYS,
    RayServiceView,
    StatusInputs,
    advance_group,
    compute_status,
    group_states_from_status,
    merge_conditions,
)
from dsi_operator.util.patch import merge_patch
from dsi_operator.util.timefmt import iso

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
SPEC: dict[str, Any] = (
    DSIWrapper("demo")
    .tp(2)
    .replicas(2)
    .restart_policy(
        maxRestarts=2,
        windowSeconds=600,
        backoff={"initialSeconds": 5, "maxSeconds": 20},
        terminatingGraceSeconds=5,
        nodeNotReadyGraceSeconds=5,
        formationTimeoutSeconds=60,
    )
    .spec()
)
GPU_NODE = {
    "metadata": {"name": "n0", "labels": {"nvidia.com/gpu.present": "true"}},
    "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
    "status": {
        "allocatable": {"nvidia.com/gpu": "8"},
        "conditions": [{"type": "Ready", "status": "True"}],
    },
}
GPU_TOL = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
READY_POLICY = [{"metadata": {"name": "cluster-policy"}, "status": {"state": "ready"}}]


def pods_for(g: int, tp: int = 2, **kw: Any) -> list[PodInfo]:
    return [
        PodInfo(
            name=f"w-g{g}-r{r}",
            uid=f"g{g}u{r}",
            rank=r,
            phase=kw.get("phase", "Running"),
            ready=kw.get("ready", True),
            node_name="n0",
        )
        for r in range(tp)
    ]


def observed(status: dict[str, Any] | None = None, **kw: Any) -> Observed:
    base: dict[str, Any] = dict(
        name="demo",
        namespace="ns",
        generation=1,
        spec=SPEC,
        status=status or {},
        now=NOW,
        pods={0: pods_for(0), 1: pods_for(1)},
        nodes={"n0": NodeInfo("n0")},
        preflight=evaluate(True, READY_POLICY, [GPU_NODE], GPUNeeds(tp=2, tolerations=GPU_TOL)),
        children_created=True,
        rayservice=RayServiceView(exists=True, ready=False, message="waiting for serve"),
    )
    base.update(kw)
    # The controller parses the spec once, at the edge; do the same here.
    raw = base.pop("spec")
    base["spec"], base["invalid"] = safe_parse(raw)
    base["declared_replicas"], base["declared_tp"] = declared_shape(raw)
    return Observed(**base)


def settle(obs: Observed, passes: int = 3) -> dict[str, Any]:
    """Run passes until status stops changing (the handlers do the same over time)."""
    status = dict(obs.status)
    for _ in range(passes):
        obs.status = status
        p = plan(obs)
        if p.patch is None:
            return status
        status = p.status
    return status


def test_sim_cluster_is_forming_with_honest_message() -> None:
    st = settle(observed())
    assert st["phase"] == "Forming"
    assert "waiting for Ray Serve" in st["message"]
    assert st["readyReplicas"] == 0 and st["ready"] == "0/2"
    assert [g["readyRanks"] for g in st["groups"]] == [2, 2]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["RayServiceReady"]["status"] == "False"
    assert conds["GroupsFormed"]["status"] == "False"
    assert conds["KubeRayAvailable"]["status"] == "True"
    assert conds["GPUOperatorReady"]["status"] == "True"
    assert conds["GPUCapacity"]["status"] == "True"
    assert st["endpoint"] == "http://demo-api.ns.svc.cluster.local:8000"
    # membership is recorded once the pods are ready
    assert st["groups"][0]["members"] == ["g0u0", "g0u1"]


def test_no_write_when_nothing_changed() -> None:
    st = settle(observed())
    p = plan(observed(status=st, now=NOW + timedelta(seconds=30)))
    assert p.patch is None
    assert p.events == []
    assert not p.acts


def test_ready_and_degraded() -> None:
    rs = RayServiceView(exists=True, ready=True)
    st = settle(observed(rayservice=rs))
    assert st["phase"] == "Ready" and st["readyReplicas"] == 2 and st["ready"] == "2/2"
    obs = observed(status=st, rayservice=rs, pods={0: pods_for(0), 1: pods_for(1, ready=False)})
    obs.status = {k: v for k, v in st.items() if k != "groups"}  # group 1 not formed yet
    st2 = plan(obs).status
    assert st2["phase"] == "Degraded" and st2["readyReplicas"] == 1


def test_provisioning_and_pending() -> None:
    st = settle(observed(pods={0: pods_for(0, phase="Pending", ready=False)}))
    assert st["phase"] == "Provisioning"
    assert "0/4 worker pods running" in st["message"]
    st = settle(observed(children_created=False, pods={}))
    assert st["phase"] == "Pending"


def test_pod_failure_restarts_exactly_that_group_then_completes() -> None:
    st = settle(observed())
    bad = pods_for(1)
    bad[1] = PodInfo(name="w-g1-r1", uid="g1u1", rank=1, phase="Failed", node_name="n0")
    p = plan(observed(status=st, pods={0: pods_for(0), 1: bad}))
    assert [r.group for r in p.restarts] == [1]
    assert p.restarts[0].trigger == "PodFailed"
    assert p.status["phase"] == "Restarting"
    assert p.status["restarts"] == 1
    g1 = p.status["groups"][1]
    assert g1["restarts"] == 1 and g1["restartingSince"] and g1["restartPods"] == ["g1u0", "g1u1"]
    assert g1["lastRestartReason"].startswith("PodFailed")
    assert p.status["groups"][0].get("restarts") == 0
    assert any(e.reason == "GroupRestart" and "group 1" in e.message for e in p.events)
    # the operator "crashes" here and comes back: same status, same pods -> continue, no recount
    p2 = plan(observed(status=p.status, pods={0: pods_for(0), 1: bad}))
    assert not p2.restarts and p2.continues and p2.status["restarts"] == 1
    # new pods for group 1: the restart completes and the group forms again
    new = [
        PodInfo(name=f"n{r}", uid=f"new{r}", rank=r, phase="Running", ready=True) for r in (0, 1)
    ]
    st3 = settle(observed(status=p2.status, pods={0: pods_for(0), 1: new}))
    assert st3["phase"] == "Forming"
    assert "restartingSince" not in st3["groups"][1]
    assert st3["groups"][1]["members"] == ["new0", "new1"]
    assert st3["restarts"] == 1


def test_budget_exhausted_goes_failed_and_stays_until_spec_change() -> None:
    st = settle(observed())
    times = [iso(NOW - timedelta(seconds=s)) for s in (100, 50)]
    for g in st["groups"]:
        if g["index"] == 0:
            g["restartTimes"] = times
            g["restarts"] = 2
    bad = [PodInfo(name="x", uid="g0u0", rank=0, phase="Failed"), pods_for(0)[1]]
    p = plan(observed(status=st, pods={0: bad, 1: pods_for(1)}))
    assert p.status["phase"] == "Failed"
    assert "maxRestarts 2" in p.status["message"]
    assert not p.restarts
    assert any(e.reason == "RestartBudgetExhausted" for e in p.events)
    # sticky
    p2 = plan(observed(status=p.status, pods={0: bad, 1: pods_for(1)}))
    assert p2.status["phase"] == "Failed" and not p2.restarts
    # a spec change (new generation) clears it and the restart can happen
    p3 = plan(observed(status=p.status, generation=2, pods={0: bad, 1: pods_for(1)}))
    assert p3.status["phase"] == "Restarting" and p3.restarts


def test_invalid_spec_names_the_field_and_never_raises() -> None:
    bad = dict(SPEC, tensorParallelSize="four")
    p = plan(observed(spec=bad))
    assert p.status["phase"] == "Failed"
    assert "spec.tensorParallelSize" in p.status["message"]
    assert p.blocked
    assert p.events and p.events[0].reason == "InvalidSpec"
    p2 = plan(observed(spec=bad, status=p.status))
    assert p2.patch is None and not p2.events


def test_blocking_preflight_keeps_pending() -> None:
    spec = dict(SPEC, gpu={"requireGPUOperator": True})
    pre = evaluate(True, None, [GPU_NODE], GPUNeeds(tp=2, require_gpu_operator=True))
    p = plan(observed(spec=spec, preflight=pre, children_created=False, pods={}))
    assert p.blocked and p.status["phase"] == "Pending"
    assert "requireGPUOperator" in p.status["message"]
    assert any(e.reason == "Preflight" for e in p.events)


def test_condition_transition_time_kept_while_status_same() -> None:
    c = [Condition.of("KubeRayAvailable", "True", "CRDPresent", "ok")]
    first = merge_conditions(None, c, 1, NOW)
    later = merge_conditions(first, c, 1, NOW + timedelta(hours=1))
    assert later[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    flipped = merge_conditions(
        first, [Condition.of("KubeRayAvailable", "False", "x", "y")], 1, NOW + timedelta(hours=1)
    )
    assert flipped[0]["lastTransitionTime"] == iso(NOW + timedelta(hours=1))


def test_status_patch_diff() -> None:
    assert merge_patch({"a": 1, "kopf": {"x": 1}}, {"a": 1}, ignore=IGNORED_KEYS) is None
    assert merge_patch({"a": 1, "b": 2}, {"a": 1}, ignore=IGNORED_KEYS) == {"b": None}
    assert merge_patch({"a": 1}, {"a": 2}, ignore=IGNORED_KEYS) == {"a": 2}
    # Lists are replaced whole (merge-patch semantics); kopf's own key is never removed.
    assert merge_patch({"l": [1, 2]}, {"l": [2]}) == {"l": [2]}
    assert merge_patch({"kopf": {"x": 1}}, {}, ignore=IGNORED_KEYS) is None


def test_bookkeeping_roundtrip() -> None:
    policy = RestartPolicySpec()
    st = GroupStatus(index=0)
    r = Restart(0, "PodFailed", "p", "why", ("a", "b"))
    after = advance_group(st, r, [], 2, policy, NOW)
    inp = StatusInputs(
        name="d",
        namespace="n",
        generation=1,
        replicas=1,
        tp=2,
        current={},
        now=NOW,
        groups={0: after},
        children_created=True,
    )
    status = compute_status(inp)
    back = group_states_from_status(status)[0]
    assert back.restart_pods == ("a", "b")
    assert back.restarting_since == NOW
    assert back.restarts == 1


def test_kuberay_cluster_switch_is_a_roll_not_a_failure() -> None:
    def in_cluster(g: int, cluster: str, prefix: str) -> list[PodInfo]:
        return [
            PodInfo(
                name=f"{prefix}{r}",
                uid=f"{prefix}{g}{r}",
                rank=r,
                phase="Running",
                ready=True,
                node_name="n0",
                cluster=cluster,
            )
            for r in range(2)
        ]

    old = {0: in_cluster(0, "rc-a", "a"), 1: in_cluster(1, "rc-a", "a")}
    st = settle(observed(pods=old))
    assert st["groups"][0]["rayCluster"] == "rc-a"
    new = {0: in_cluster(0, "rc-b", "b"), 1: in_cluster(1, "rc-b", "b")}
    p = plan(observed(status=st, pods=new))
    assert not p.restarts
    st2 = settle(observed(status=st, pods=new))
    assert st2["restarts"] == 0
    assert st2["groups"][0]["members"] == ["b00", "b01"]
    assert st2["groups"][0]["rayCluster"] == "rc-b"


def test_unhealthy_serve_deployment_drops_only_that_group() -> None:
    # A rank process died inside a live pod: every pod is still Running and Ready, but Serve
    # reports that group's deployment UNHEALTHY while it re-forms the group.
    rs = RayServiceView(exists=True, ready=True, serve_groups={0: "HEALTHY", 1: "UNHEALTHY"})
    st = settle(observed(rayservice=rs))
    assert st["phase"] == "Degraded" and st["readyReplicas"] == 1 and st["ready"] == "1/2"
    groups = {g["index"]: g for g in st["groups"]}
    assert groups[0]["serveStatus"] == "HEALTHY" and groups[0]["phase"] == "Ready"
    assert groups[1]["serveStatus"] == "UNHEALTHY" and groups[1]["phase"] != "Ready"
    assert groups[1]["readyRanks"] == 2  # the pods are fine; no pod restart is counted
    assert st.get("restarts", 0) == 0

    healed = RayServiceView(exists=True, ready=True, serve_groups={0: "HEALTHY", 1: "HEALTHY"})
    st2 = settle(observed(status=st, rayservice=healed))
    assert st2["phase"] == "Ready" and st2["readyReplicas"] == 2


def test_serve_group_statuses_from_kuberay_status() -> None:
    from dsi_operator.serving.observe import rayservice_view

    body = {
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "Running"}],
            "activeServiceStatus": {
                "rayClusterName": "demo-abc",
                "applicationStatuses": {
                    "dsi": {
                        "status": "RUNNING",
                        "serveDeploymentStatuses": {
                            "ingress": {"status": "HEALTHY"},
                            "group-0": {"status": "HEALTHY"},
                            "group-1": {"status": "UNHEALTHY", "message": "health check"},
                        },
                    }
                },
            },
        }
    }
    view = rayservice_view(body)
    assert view.ready and view.active_cluster == "demo-abc"
    assert view.serve_groups == {0: "HEALTHY", 1: "UNHEALTHY"}
    assert view.group_serving(0) and not view.group_serving(1)
    # No per-deployment status reported: the RayService's own readiness decides.
    assert RayServiceView(exists=True, ready=True).group_serving(3)


def _strict(node: Any) -> Any:
    """The CRD's OpenAPI schema as a JSON schema that also rejects undeclared fields (the
    API server would silently prune them) and understands ``nullable``."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if "properties" in node:
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def test_every_status_the_planner_writes_is_declared_by_the_crd() -> None:
    from pathlib import Path

    import jsonschema
    import yaml
    from dsi_operator.api.crd import CRD_PATHS

    shipped = Path(__file__).resolve().parents[2] / CRD_PATHS[0]
    crd = yaml.safe_load(shipped.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft7Validator(_strict(schema["properties"]["status"]))
    ready_rs = RayServiceView(exists=True, ready=True, serve_groups={0: "HEALTHY", 1: "HEALTHY"})
    formed = settle(observed(rayservice=ready_rs))
    # bookkeeping fields only some paths write: abandoned pods and the forming RayCluster
    formed["groups"][1].update(abandonedPods=["old"], rayCluster="demo-abc")
    failed_pods = {0: pods_for(0), 1: pods_for(1, phase="Failed", ready=False)}
    restarting = plan(observed(formed, pods=failed_pods, rayservice=ready_rs)).status
    later = NOW + timedelta(seconds=1)
    backing_off = plan(observed(restarting, now=later, pods={0: pods_for(0), 1: []})).status
    written = [
        formed,
        restarting,
        backing_off,
        settle(observed(pods={})),
        plan(observed(spec={"model": {}, "tensorParallelSize": 0})).status,
    ]
    assert restarting["groups"][1].get("restartPods") and formed["groups"][1]["abandonedPods"]
    for status in written:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(status)]
        assert not errors, errors
    # and an undeclared field is caught
    assert list(validator.iter_errors({**formed, "surprise": 1}))
