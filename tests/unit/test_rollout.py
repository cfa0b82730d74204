"""The group-by-group rollout: which groups move to the spec, when (rollout.plan_rollout), and
how a pass records it (reconcile.plan: uncounted restarts, status.rollout, Progressing)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import yaml
from dsi_localcluster.builders import DSIWrapper
from dsi_operator.api import labels as L
from dsi_operator.serving.plan import (
    EVENT_ROLLOUT,
    Observed,
    RolloutState,
    plan,
    rollout_sync_needed,
    rollout_targets,
    safe_parse,
)
from dsi_operator.serving.render import GroupTemplate, Kept, parse_group_hashes, render_rayservice
from dsi_operator.serving.restart import NodeInfo, PodInfo
from dsi_operator.serving.rollout import (
    REASON_COMPLETE,
    REASON_PAUSED,
    REASON_ROLLING,
    TRIGGER_ROLLOUT,
    GroupRollout,
    RolloutInputs,
    plan_rollout,
)
from dsi_operator.serving.status import RayServiceView, group_states_from_status

NOW = datetime(2026, 12, 5, 10, 0, 0, tzinfo=UTC)


def grp(g: int, *, stale: bool = True, ready: bool = True, busy: bool = False) -> GroupRollout:
    return GroupRollout(
        index=g,
        target="new",
        template="old" if stale else "new",
        shape_ok=True,
        pods_at_target=not stale,
        ready=ready,
        busy=busy,
    )


def inputs(*groups: GroupRollout, **kw: Any) -> RolloutInputs:
    base = {"head_target": "h", "head_template": "h", "max_unavailable": 1}
    return RolloutInputs(groups=groups, **{**base, **kw})


def test_one_group_at_a_time_by_default() -> None:
    ro = plan_rollout(inputs(grp(0), grp(1), grp(2)))
    assert ro.rolls == (0,) and ro.target_groups == {0}
    assert ro.reason == REASON_ROLLING and "0/3 groups updated; replacing group 0" in ro.message
    assert not ro.complete and ro.head_at_target and ro.head_pods == ()


def test_the_next_group_waits_until_the_replaced_one_serves_again() -> None:
    # Group 0's template is at the spec, its new pods are not ready yet: the budget is spent.
    replacing = replace(grp(0, stale=False, ready=False), pods_at_target=True)
    ro = plan_rollout(inputs(replacing, grp(1), grp(2)))
    assert ro.rolls == () and ro.target_groups == {0}
    back = plan_rollout(inputs(grp(0, stale=False), grp(1), grp(2)))
    assert back.rolls == (1,) and back.target_groups == {0, 1} and back.updated == 1


def test_a_busy_group_is_never_replaced_twice_and_counts_as_unavailable() -> None:
    rolling = replace(grp(0, ready=False, busy=True), template="new")
    ro = plan_rollout(inputs(rolling, grp(1)))
    assert ro.rolls == () and 0 in ro.target_groups
    assert "replacing group 0" in ro.message


def test_stale_groups_that_serve_nothing_go_first_and_free() -> None:
    ro = plan_rollout(inputs(grp(0), grp(1, ready=False), grp(2)))
    # Group 1 is unavailable already: replacing it costs nothing, and it uses up the budget.
    assert ro.rolls == (1,)
    ro2 = plan_rollout(inputs(grp(0), grp(1, ready=False), grp(2), max_unavailable=2))
    assert ro2.rolls == (1, 0)


def test_max_unavailable_two_replaces_two_at_once() -> None:
    assert plan_rollout(inputs(grp(0), grp(1), grp(2), max_unavailable=2)).rolls == (0, 1)


def test_paused_keeps_every_template_where_it_is() -> None:
    ro = plan_rollout(inputs(grp(0, stale=False), grp(1), paused=True))
    assert ro.rolls == () and ro.target_groups == {0}
    assert ro.reason == REASON_PAUSED and "1/2" in ro.message


def test_a_failed_group_not_replaced_yet_comes_back_at_its_own_template() -> None:
    # Restarting after a failure (busy) with the old template: it stays old (LWS's rule).
    failing = grp(1, ready=False, busy=True)
    ro = plan_rollout(inputs(grp(0, stale=False), failing))
    assert 1 not in ro.target_groups and ro.rolls == ()


def test_complete_when_every_group_and_the_head_are_at_the_spec() -> None:
    ro = plan_rollout(inputs(grp(0, stale=False), grp(1, stale=False)))
    assert ro.rolls == () and ro.complete and ro.reason == REASON_COMPLETE
    assert ro.updated == 2 and ro.ready_updated == 2


def test_a_head_change_replaces_the_head_and_every_group_at_once() -> None:
    ro = plan_rollout(inputs(grp(0, stale=False), grp(1), head_template="old-head"))
    assert ro.rolls == (0, 1) and ro.head_at_target
    assert "the head's template" in ro.message
    stale_pod = plan_rollout(inputs(grp(0, stale=False), stale_head_pods=("head-uid",)))
    assert stale_pod.head_pods == ("head-uid",) and stale_pod.rolls == (0,)
    paused = plan_rollout(inputs(grp(0), head_template="old-head", paused=True))
    assert not paused.head_at_target and paused.rolls == () and paused.head_pods == ()


def test_a_changed_serve_shape_replaces_every_stale_group_at_once() -> None:
    g0, g1 = replace(grp(0), shape_ok=False), replace(grp(1), shape_ok=False)
    ro = plan_rollout(inputs(g0, g1))
    assert ro.rolls == (0, 1) and "the model or group shape" in ro.message


def test_new_groups_are_rendered_at_the_spec_without_replacing_anything() -> None:
    new = GroupRollout(2, "new", None, True, True, ready=False, busy=False)
    ro = plan_rollout(inputs(grp(0, stale=False), grp(1, stale=False), new))
    assert ro.rolls == () and ro.target_groups == {0, 1, 2}


# --- one pass of the planner -------------------------------------------------------------------

SPEC = DSIWrapper("demo").tp(2).replicas(2).gpus(0).spec()


def pod(g: int, r: int, h: str) -> PodInfo:
    return PodInfo(
        name=f"w-g{g}-r{r}",
        uid=f"g{g}u{r}",
        rank=r,
        phase="Running",
        ready=True,
        node_name="n0",
        group_hash=h,
    )


def observed(status: dict[str, Any], pod_hashes: dict[int, str], carried: str) -> Observed:
    spec, err = safe_parse(SPEC)
    assert spec is not None, err
    return Observed(
        name="demo",
        namespace="ns",
        generation=2,
        spec=spec,
        status=status,
        now=NOW,
        pods={g: [pod(g, 0, h), pod(g, 1, h)] for g, h in pod_hashes.items()},
        nodes={"n0": NodeInfo("n0")},
        children_created=True,
        rayservice=RayServiceView(exists=True, ready=True),
        desired_hashes={0: "new0", 1: "new1"},
        rollout=RolloutState(
            carried={0: GroupTemplate(f"{carried}0", "s"), 1: GroupTemplate(f"{carried}1", "s")},
            carried_head="h",
            head_target="h",
            shape_target="s",
            spec_hash="spec2",
        ),
    )


def formed(g: int) -> dict[str, Any]:
    return {"index": g, "members": [f"g{g}u0", f"g{g}u1"], "formedAt": "2026-12-05T09:00:00Z"}


def test_a_pass_replaces_one_group_as_an_uncounted_restart() -> None:
    status = {"restarts": 3, "groups": [formed(0), formed(1)]}
    o = observed(status, {0: "old0", 1: "old1"}, carried="old")
    p = plan(o)
    assert [(r.group, r.trigger, r.counted) for r in p.restarts] == [(0, TRIGGER_ROLLOUT, False)]
    assert p.status["restarts"] == 3  # not a failure: the budget and the total stay
    g0 = group_states_from_status(p.status)[0]
    assert g0.restart_trigger == TRIGGER_ROLLOUT and g0.restarts == 0
    assert {d.uid for d in p.due()} == {"g0u0", "g0u1"}
    assert p.status["rollout"] == {
        "targetHash": "spec2",
        "updatedGroups": 0,
        "readyUpdatedGroups": 0,
        "updated": "0/2",
        "headUpdated": True,
        "updating": [0],
    }
    progressing = next(c for c in p.status["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "True" and progressing["reason"] == REASON_ROLLING
    assert [e.reason for e in p.events if e.reason == EVENT_ROLLOUT] == [EVENT_ROLLOUT]
    # Group 0's templates must reach the RayService before its pods go.
    assert rollout_targets(o, p) == (frozenset({0}), True) and rollout_sync_needed(o, p)


def test_a_finished_rollout_reports_complete() -> None:
    status = {"groups": [formed(0), formed(1)]}
    p = plan(observed(status, {0: "new0", 1: "new1"}, carried="new"))
    assert p.restarts == [] and not rollout_sync_needed(observed(status, {}, "new"), p)
    progressing = next(c for c in p.status["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "False" and progressing["reason"] == REASON_COMPLETE
    assert p.status["rollout"]["updated"] == "2/2"


def test_no_rollout_without_observed_rollout_state() -> None:
    o = replace(observed({"groups": [formed(0), formed(1)]}, {0: "x", 1: "y"}, "old"))
    o.rollout = RolloutState()
    assert plan(o).restarts == [] and "rollout" not in plan(o).status


def test_a_tp_change_replaces_one_group_and_counts_each_by_its_own_size() -> None:
    # The spec says TP 2; the RayService still carries both groups at TP 1 (one pod each).
    o = observed({"groups": [formed1(0), formed1(1)]}, {}, carried="old")
    o.pods = {g: [pod(g, 0, f"old{g}")] for g in (0, 1)}
    o.rollout = replace(
        o.rollout,
        carried={g: GroupTemplate(f"old{g}", "s", 1, 1) for g in (0, 1)},
    )
    p = plan(o)
    # Group 1 still serves at TP 1 (its one pod ready): it is available, so one roll only.
    assert [r.group for r in p.restarts] == [0]
    g1 = next(g for g in p.status["groups"] if g["index"] == 1)
    assert (g1["ranks"], g1["readyRanks"], g1["ready"]) == (1, 1, True)


def formed1(g: int) -> dict[str, Any]:
    return {"index": g, "members": [f"g{g}u0"], "formedAt": "2026-12-05T09:00:00Z"}


def test_a_kept_group_keeps_its_tp_shape_in_serve_and_the_annotation() -> None:
    spec, _ = safe_parse(SPEC)
    assert spec is not None
    old_spec, _ = safe_parse({**SPEC, "tensorParallelSize": 1})
    assert old_spec is not None
    old = render_rayservice("demo", "ns", "u", old_spec)
    old_g1 = [
        w
        for w in old["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if w["groupName"].startswith("g1-")
    ]
    rs = render_rayservice("demo", "ns", "u", spec, kept=Kept(groups={1: old_g1}, shapes={1: "s"}))
    names = [w["groupName"] for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert names == ["g0-r0", "g0-r1", "g1-r0"]
    recorded = parse_group_hashes(rs["metadata"]["annotations"][L.ANNOTATION_GROUP_HASHES])
    assert (recorded[0].tp, recorded[1].tp) == (2, 1)
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    shapes = {d["name"]: d["user_config"].get("tensor_parallel_size") for d in app["deployments"]}
    assert shapes == {"group-0": 2, "group-1": 1, "ingress": None}
