"""Which pods a restart deletes, forced or not, and not before when: decided by the pure
planner (reconcile.plan_deletions), carried out verbatim by the executor."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from dsi_localcluster.builders import DSIWrapper
from dsi_operator.reconcile import Observed, Plan, PodDeletion, plan, plan_deletions, safe_parse
from dsi_operator.restart import ContinueRestart, NodeInfo, PodInfo, Restart
from dsi_operator.status import RayServiceView, iso_precise

NOW = datetime(2026, 12, 3, 8, 0, 0, tzinfo=UTC)
SPEC = DSIWrapper("demo").tp(2).replicas(2).gpus(0).restart_policy(podDeletionGraceSeconds=7).spec()


def pod(g: int, r: int, **kw: Any) -> PodInfo:
    base = PodInfo(
        name=f"w-g{g}-r{r}", uid=f"g{g}u{r}", rank=r, phase="Running", ready=True, node_name="n0"
    )
    return replace(base, **kw)


def obs(pods: dict[int, list[PodInfo]], nodes: dict[str, NodeInfo] | None = None) -> Observed:
    spec, err = safe_parse(SPEC)
    assert spec is not None, err
    return Observed(
        name="demo",
        namespace="ns",
        generation=1,
        spec=spec,
        status={},
        now=NOW,
        pods=pods,
        nodes={"n0": NodeInfo("n0")} if nodes is None else nodes,
        children_created=True,
        rayservice=RayServiceView(exists=True),
        kuberay_grace_seconds=10.0,
    )


def restarting_since(g: int, t: datetime) -> dict[str, Any]:
    return {"groups": [{"index": g, "restartingSince": iso_precise(t)}]}


def test_a_restart_deletes_every_pod_of_the_group_with_the_spec_grace() -> None:
    o = obs({0: [pod(0, 0, restart_count=1), pod(0, 1)]})
    r = Restart(0, "ContainerRestarted", "w-g0-r0", "x", ("g0u0", "g0u1"))
    got = plan_deletions(o, [r], [], restarting_since(0, NOW), grace=7)
    assert got == [
        PodDeletion(0, "w-g0-r0", "g0u0", force=False, grace=7),
        PodDeletion(0, "w-g0-r1", "g0u1", force=False, grace=7),
    ]


def test_failed_pods_are_left_to_kuberay_for_its_grace_then_deleted() -> None:
    o = obs({0: [pod(0, 0, phase="Failed", ready=False), pod(0, 1)]})
    r = Restart(0, "PodFailed", "w-g0-r0", "x", ("g0u0", "g0u1"))
    started = NOW - timedelta(seconds=4)
    got = plan_deletions(o, [r], [], restarting_since(0, started), grace=7)
    failed = next(d for d in got if d.uid == "g0u0")
    assert failed.not_before == started + timedelta(seconds=10)
    p = Plan(status={}, patch=None, deletions=got, now=NOW)
    assert [d.uid for d in p.due()] == ["g0u1"]  # the Failed one waits for KubeRay
    p.now = started + timedelta(seconds=10)
    assert [d.uid for d in p.due()] == ["g0u0", "g0u1"]


def test_pods_on_a_dead_node_are_forced_and_terminating_ones_left_to_the_kubelet() -> None:
    nodes = {"n0": NodeInfo("n0"), "n1": NodeInfo("n1", ready=False)}
    o = obs(
        {
            0: [
                pod(0, 0, node_name="n1", phase="Failed"),  # dead node: forced at once
                pod(0, 1, deletion_timestamp=NOW),  # live kubelet is finishing it
            ],
            1: [pod(1, 0, node_name="gone"), pod(1, 1)],  # vanished node: forced
        },
        nodes,
    )
    rs = [
        Restart(0, "NodeNotReady", "w-g0-r0", "x", ("g0u0", "g0u1")),
        Restart(1, "NodeLost", "w-g1-r0", "x", ("g1u0", "g1u1")),
    ]
    got = {d.uid: d for d in plan_deletions(o, rs, [], {}, grace=7)}
    assert set(got) == {"g0u0", "g1u0", "g1u1"}
    assert got["g0u0"].force and got["g0u0"].not_before is None and got["g0u0"].grace is None
    assert got["g1u0"].force and not got["g1u1"].force


def test_a_continued_restart_forces_stuck_pods_and_ignores_unknown_uids() -> None:
    o = obs({0: [pod(0, 0, deletion_timestamp=NOW - timedelta(minutes=5)), pod(0, 1)]})
    c = ContinueRestart(0, delete=("g0u1", "gone-uid"), force=("g0u0",))
    got = plan_deletions(o, [], [c], restarting_since(0, NOW), grace=7)
    assert got == [
        PodDeletion(0, "w-g0-r1", "g0u1", force=False, grace=7),
        PodDeletion(0, "w-g0-r0", "g0u0", force=True),
    ]


def test_plan_names_the_deletions_of_a_new_restart() -> None:
    o = obs({0: [pod(0, 0, restart_count=1), pod(0, 1)], 1: [pod(1, 0), pod(1, 1)]})
    o.status = {"groups": [{"index": 0, "members": ["g0u0", "g0u1"]}]}
    p = plan(o)
    assert [r.group for r in p.restarts] == [0]
    assert [(d.uid, d.grace) for d in p.due()] == [("g0u0", 7), ("g0u1", 7)]
    assert p.acts
