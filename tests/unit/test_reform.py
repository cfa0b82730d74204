"""In-place re-forms (issue 25 item 3): detection, bookkeeping, the ReformLoop escalation
and a planner pass that records one, as plain functions."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from dsi_operator.api.spec import GroupStatus, RestartPolicySpec
from dsi_operator.serving import plan as reconcile
from dsi_operator.serving.reform import REFORM_GRACE, advance_reform, find_reform
from dsi_operator.serving.restart import (
    TRIGGER_CONTAINER_RESTART,
    TRIGGER_REFORM_LOOP,
    Fail,
    NoAction,
    PodInfo,
    Restart,
    decide,
)
from dsi_operator.serving.status import group_status

from tests.unit.test_restart import NODES, NOW, formed, pod
from tests.unit.test_status import observed, pods_for

POLICY = RestartPolicySpec(max_restarts=3, window_seconds=600, max_reforms=2)
HEAD_POD = PodInfo(name="head", uid="h", rank=0, phase="Running", ready=True)
HEAD = [HEAD_POD]
LONG_AGO = NOW - REFORM_GRACE


def not_ready(rank: int, since: Any = LONG_AGO, **kw: Any) -> PodInfo:
    return pod(rank, ready=False, ready_changed=since, **kw)


def test_every_member_down_in_running_pods_is_a_reform_named_by_the_first_down() -> None:
    earlier = LONG_AGO - timedelta(seconds=3)
    rf = find_reform(formed(), [not_ready(0), not_ready(1, since=earlier)], NOW, HEAD_POD)
    assert rf is not None and (rf.group, rf.rank, rf.pod) == (0, 1, "p1")
    assert rf.reason.startswith("rank 1 (pod p1) stopped being formed first")


def test_not_a_reform_within_the_grace_or_when_the_pod_itself_failed() -> None:
    group = formed()
    just_now = NOW - REFORM_GRACE + timedelta(seconds=1)
    assert find_reform(group, [not_ready(0), not_ready(1, since=just_now)], NOW, HEAD_POD) is None
    # A restarted container is a restart (decide() sees it), never also a re-form.
    assert find_reform(group, [not_ready(0), not_ready(1, restart_count=1)], NOW, HEAD_POD) is None
    assert find_reform(group, [not_ready(0)], NOW, HEAD_POD) is None  # member gone: PodDeleted
    failed = [not_ready(0), not_ready(1, phase="Failed")]
    assert find_reform(group, failed, NOW, HEAD_POD) is None
    unformed = GroupStatus(index=0)
    assert find_reform(unformed, [not_ready(0), not_ready(1)], NOW, HEAD_POD) is None
    in_progress = group.model_copy(update={"reforming_since": NOW - timedelta(seconds=30)})
    assert find_reform(in_progress, [not_ready(0), not_ready(1)], NOW, HEAD_POD) is None


def test_a_member_still_ready_is_not_a_reform_as_on_a_lost_node() -> None:
    """Node lost: its pod looks Running and Ready until the node controller's grace ends,
    while the survivors lose their actors. That is a NodeNotReady restart, not a re-form."""
    assert find_reform(formed(), [not_ready(0), pod(1)], NOW, HEAD_POD) is None


def test_not_a_reform_without_a_head_or_under_a_head_newer_than_the_group() -> None:
    """Ray keeps no worker across a head restart: the workers' containers exit a few seconds
    after the new head is Ready, which is a restart."""
    down = [not_ready(0), not_ready(1)]
    group = formed()
    assert find_reform(group, down, NOW, None) is None
    assert find_reform(group, down, NOW, replace(HEAD_POD, ready=False)) is None
    newer = replace(HEAD_POD, ready_changed=group.formed_at + timedelta(seconds=1))
    assert find_reform(group, down, NOW, newer) is None
    older = replace(HEAD_POD, ready_changed=group.formed_at - timedelta(seconds=1))
    assert find_reform(group, down, NOW, older) is not None


def test_unknown_transition_times_count_at_once() -> None:
    down = [not_ready(0, since=None), not_ready(1, since=None)]
    assert find_reform(formed(), down, NOW, HEAD_POD) is not None


def test_bookkeeping_counts_marks_and_clears_once_whole_again() -> None:
    pods = [not_ready(0), not_ready(1)]
    rf = find_reform(formed(), pods, NOW, HEAD_POD)
    assert rf is not None
    s = advance_reform(formed(), rf, NoAction(), pods, 2, POLICY, NOW)
    assert (s.reforms, s.reforming_since, s.last_reform_time) == (1, NOW, NOW)
    assert s.reform_times == (NOW,) and s.last_reform_reason == rf.reason
    later = NOW + timedelta(seconds=20)
    still = advance_reform(s, None, NoAction(), pods, 2, POLICY, later)
    assert still.reforming_since == NOW
    whole = advance_reform(s, None, NoAction(), [pod(0), pod(1)], 2, POLICY, later)
    assert whole.reforming_since is None and whole.reforms == 1


def test_the_status_round_trip_keeps_every_reform_field() -> None:
    s = formed().model_copy(
        update={
            "reforms": 3,
            "reform_times": (NOW,),
            "last_reform_time": NOW,
            "last_reform_reason": "rank 1 ...",
            "reforming_since": NOW,
        }
    )
    raw = group_status(s, [pod(0), pod(1)], 2, True, "Ready").model_dump(mode="json", by_alias=True)
    assert raw["reforms"] == 3 and raw["lastReformReason"] == "rank 1 ..."
    back = GroupStatus.model_validate(raw)
    assert (back.reforms, back.reform_times, back.reforming_since) == (3, (NOW,), NOW)
    assert back.last_reform_reason == "rank 1 ..."


def test_a_reform_loop_restarts_the_group_with_new_pods_and_then_fails() -> None:
    """Past maxReforms in the window the group restarts (counted); the restart clears the
    re-form history; a loop that goes on exhausts maxRestarts and ends in Failed."""
    times = tuple(NOW - timedelta(seconds=s) for s in (100, 50, 10))
    looping = formed().model_copy(
        update={"reforms": 3, "reform_times": times, "last_reform_reason": "rank 1 ..."}
    )
    pods = [pod(0), pod(1)]
    dec = decide(pods, NODES, looping, POLICY, 2, NOW)
    assert isinstance(dec, Restart) and dec.trigger == TRIGGER_REFORM_LOOP and dec.counted
    assert "re-formed in place 3 times within 600s (maxReforms 2)" in dec.reason
    after = advance_reform(looping, None, dec, pods, 2, POLICY, NOW)
    assert after.reform_times == () and after.reforms == 3
    spent = looping.model_copy(update={"restart_times": (NOW - timedelta(seconds=5),) * 3})
    assert isinstance(decide(pods, NODES, spent, POLICY, 2, NOW), Fail)
    # Two in the window are within the budget: nothing happens.
    assert isinstance(
        decide(pods, NODES, looping.model_copy(update={"reform_times": times[1:]}), POLICY, 2, NOW),
        NoAction,
    )


def test_a_pod_level_failure_wins_over_the_reform() -> None:
    pods = [pod(0), not_ready(1, restart_count=1)]
    dec = decide(pods, NODES, formed(), POLICY, 2, NOW)
    assert isinstance(dec, Restart) and dec.trigger == TRIGGER_CONTAINER_RESTART
    assert advance_reform(formed(), None, dec, pods, 2, POLICY, NOW).reforms == 0


def test_one_planner_pass_records_the_reform_posts_its_event_and_shows_it_in_status() -> None:
    formed_status = _formed_status()
    pods = [replace(p, ready=False, ready_changed=LONG_AGO) for p in pods_for(0)]
    p = reconcile.plan(observed(formed_status, pods={0: pods, 1: pods_for(1)}, head_pods=HEAD))
    assert [(r.group, r.rank) for r in p.reforms] == [(0, 0)]
    g0 = p.status["groups"][0]
    assert g0["reforms"] == 1 and g0["restarts"] == 0 and g0["reformingSince"]
    assert p.status["reforms"] == 1 and p.status["restarts"] == 0
    events = [e for e in p.events if e.reason == reconcile.EVENT_GROUP_REFORMED]
    assert len(events) == 1 and events[0].incident == "g0-reform-1"
    assert "re-forming in place (re-form 1): rank 0 (pod" in events[0].message
    # The next pass (re-form still under way) counts nothing new; its Event is the same one.
    again = reconcile.plan(observed(p.status, pods={0: pods, 1: pods_for(1)}, head_pods=HEAD))
    assert again.reforms == [] and again.status["groups"][0]["reforms"] == 1
    assert {e.incident for e in again.events if e.reason == "GroupReformed"} == {"g0-reform-1"}
    # With the head being replaced, nothing is counted (the head path restarts pods).
    gone = [replace(HEAD[0], deletion_timestamp=NOW)]
    headless = reconcile.plan(
        observed(formed_status, pods={0: pods, 1: pods_for(1)}, head_pods=gone)
    )
    assert headless.reforms == [] and headless.status["reforms"] == 0
    # Whole again: the mark clears, the count stays.
    done = reconcile.plan(observed(again.status, head_pods=HEAD))
    assert "reformingSince" not in done.status["groups"][0]
    assert done.status["groups"][0]["reforms"] == 1


def _formed_status() -> dict[str, Any]:
    """Status after both groups formed on pods_for(g)."""
    st: dict[str, Any] = dict(observed().status)
    for _ in range(3):
        p = reconcile.plan(observed(st))
        st = p.status
    assert all(g.get("members") for g in st["groups"]), st["groups"]
    return st
