"""Which pods a restart deletes, forced or not, and not before when: decided by the pure
planner (reconcile.plan_deletions), carried out verbatim by the executor."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from dsi_localcluster.builders import DSIWrapper
from dsi_operator.serving.plan import (
    EVENT_GROUP_RESTART,
    Observed,
    Plan,
    PodDeletion,
    plan,
    plan_deletions,
    safe_parse,
    waits_on_clock,
)
from dsi_operator.serving.restart import ContinueRestart, NodeInfo, PodInfo, Restart
from dsi_operator.serving.status import RayServiceView
from dsi_operator.util.timefmt import iso_precise

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


def test_the_restart_event_is_planned_until_the_restart_is_done() -> None:
    # The operator can be killed between the status write that records a restart and the
    # Event: every pass of the restart in progress plans the same incident again, and the
    # executor posts it once under a name derived from the incident.
    o = obs({0: [pod(0, 0, restart_count=1), pod(0, 1)], 1: [pod(1, 0), pod(1, 1)]})
    o.status = {"groups": [{"index": 0, "members": ["g0u0", "g0u1"]}]}
    first = plan(o)
    [ev] = [e for e in first.events if e.reason == EVENT_GROUP_RESTART]
    assert ev.incident == "g0-restart-1" and ev.type == "Warning"
    assert ev.message.startswith("restarting group 0 (restart 1): ContainerRestarted")

    o.status = first.status  # what the killed process wrote; the old pods are still there
    again = plan(o)
    assert isinstance(again.decisions[0], ContinueRestart)
    assert [e for e in again.events if e.reason == EVENT_GROUP_RESTART] == [ev]

    o.pods = {0: [pod(0, 0, uid="new0"), pod(0, 1, uid="new1")], 1: o.pods[1]}
    done = plan(o)
    assert [e for e in done.events if e.reason == EVENT_GROUP_RESTART] == [ev]

    o.status = done.status
    after = plan(o)
    assert not [e for e in after.events if e.reason == EVENT_GROUP_RESTART]


def _steady() -> Observed:
    o = obs({0: [pod(0, 0), pod(0, 1)], 1: [pod(1, 0), pod(1, 1)]})
    o.rayservice = RayServiceView(exists=True, ready=True)
    o.status = plan(o).status  # members recorded
    return o


def test_only_a_resource_with_a_clock_running_needs_the_ticker() -> None:
    o = _steady()
    p = plan(o)
    assert p.status["phase"] == "Ready" and not waits_on_clock(o, p)
    o.rayservice = RayServiceView(exists=True, ready=False)
    p = plan(o)  # Serve not ready: an event (the RayService's status) will say when it is
    assert p.status["phase"] != "Ready" and not waits_on_clock(o, p)
    o.pods = {**o.pods, 1: [pod(1, 0), pod(1, 1, ready=False)]}
    assert not waits_on_clock(o, plan(o))  # a readiness blip of a formed group: no clock

    forming = obs({0: [pod(0, 0), pod(0, 1, ready=False)], 1: [pod(1, 0), pod(1, 1)]})
    assert waits_on_clock(forming, plan(forming))  # the formation deadline runs
    unplaced = [pod(0, r, phase="Pending", ready=False) for r in (0, 1)]
    pending = obs({0: unplaced, 1: [pod(1, 0), pod(1, 1)]})
    assert not waits_on_clock(pending, plan(pending))  # no deadline before its pods run

    for changed in (
        {1: [pod(1, 0), pod(1, 1, deletion_timestamp=NOW)]},  # terminating: grace runs
        {1: [pod(1, 0), pod(1, 1, node_name="n1")]},  # on a node not (yet) seen
    ):
        o2 = _steady()
        o2.pods = {**o2.pods, **changed}
        assert waits_on_clock(o2, plan(o2)), changed

    o3 = _steady()
    o3.nodes = {"n0": NodeInfo("n0", ready=False, since=NOW)}  # NodeNotReady grace runs
    assert waits_on_clock(o3, plan(o3))

    o4 = _steady()
    o4.pods = {0: [pod(0, 0, phase="Failed", ready=False), pod(0, 1)], 1: o4.pods[1]}
    restart = plan(o4)
    assert restart.restarts and waits_on_clock(o4, restart)
    o4.status = restart.status  # restart in progress until the old pods are gone
    assert waits_on_clock(o4, plan(o4))

    bad = obs({})
    bad.spec, bad.invalid = None, "spec.tensorParallelSize: must be >= 1"
    assert not waits_on_clock(bad, plan(bad))


def _restarting(since: datetime, pods: dict[int, list[PodInfo]]) -> Observed:
    o = obs(pods)
    o.status = {
        "groups": [
            {
                "index": 0,
                "restartingSince": iso_precise(since),
                "restartTrigger": "PodFailed",
                "restartPods": ["g0u0", "g0u1"],
            }
        ]
    }
    return o


def test_a_restart_kept_waiting_by_kuberay_past_its_expectations_nudges_it() -> None:
    since = NOW - timedelta(seconds=40)
    # One replacement pod came, the other did not: KubeRay skipped the group.
    p = plan(_restarting(since, {0: [pod(0, 0, uid="new0")]}))
    assert p.nudge == f"g0-{since.timestamp():.0f}-1"
    later = plan(_restarting(NOW - timedelta(seconds=75), {0: []}))
    assert later.nudge is not None and later.nudge.endswith("-2")  # once per 35 s window
    assert plan(_restarting(NOW - timedelta(seconds=10), {0: []})).nudge is None
    both = {0: [pod(0, 0, uid="new0"), pod(0, 1, uid="new1")]}
    assert plan(_restarting(since, both)).nudge is None  # the replacements are there
