"""Every whole-group restart decision, as plain functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from dsi_operator.api.spec import GroupStatus, RestartPolicySpec
from dsi_operator.serving.restart import (
    TRIGGER_CONTAINER_RESTART,
    TRIGGER_FORMATION_TIMEOUT,
    TRIGGER_NODE_LOST,
    TRIGGER_NODE_NOT_READY,
    TRIGGER_POD_DELETED,
    TRIGGER_POD_EVICTED,
    TRIGGER_POD_FAILED,
    TRIGGER_POD_STUCK_TERMINATING,
    ContinueRestart,
    Fail,
    NoAction,
    NodeInfo,
    PodInfo,
    Restart,
    RestartDone,
    Wait,
    consecutive_restarts,
    decide,
    failure_visible,
    find_triggers,
    group_pods_ready,
)

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
POLICY = RestartPolicySpec(
    max_restarts=3,
    window_seconds=600,
    backoff={"initial_seconds": 10, "max_seconds": 60, "multiplier": 2},
    quiet_period_seconds=300,
    terminating_grace_seconds=30,
    node_not_ready_grace_seconds=40,
    formation_timeout_seconds=120,
)
NODES = {"n0": NodeInfo("n0"), "n1": NodeInfo("n1")}


def pod(rank: int, uid: str | None = None, **kw: object) -> PodInfo:
    base: dict[str, object] = dict(
        name=f"p{rank}",
        uid=uid or f"u{rank}",
        rank=rank,
        phase="Running",
        ready=True,
        node_name=f"n{rank % 2}",
    )
    base.update(kw)
    return PodInfo(**base)  # type: ignore[arg-type]


def formed(tp: int = 2, **kw: object) -> GroupStatus:
    base: dict[str, object] = dict(
        index=0, members=tuple(f"u{r}" for r in range(tp)), formed_at=NOW - timedelta(hours=1)
    )
    base.update(kw)
    return GroupStatus(**base)  # type: ignore[arg-type]


def healthy(tp: int = 2) -> list[PodInfo]:
    return [pod(r) for r in range(tp)]


def test_healthy_formed_group_needs_nothing() -> None:
    assert decide(healthy(), NODES, formed(), POLICY, 2, NOW) == NoAction()


def test_group_ready_requires_every_rank_once() -> None:
    assert group_pods_ready(healthy(3), 3)
    assert not group_pods_ready(healthy(2), 3)
    assert not group_pods_ready([pod(0), pod(1, ready=False)], 2)
    assert not group_pods_ready([pod(0), pod(1), pod(1, uid="x")], 2)


@pytest.mark.parametrize(
    ("pods", "trigger"),
    [
        ([pod(0), pod(1, restart_count=1)], TRIGGER_CONTAINER_RESTART),
        ([pod(0), pod(1, phase="Failed")], TRIGGER_POD_FAILED),
        ([pod(0), pod(1, phase="Failed", reason="Evicted")], TRIGGER_POD_EVICTED),
        ([pod(0)], TRIGGER_POD_DELETED),
        ([pod(0), pod(1, uid="new")], TRIGGER_POD_DELETED),
        (
            [pod(0), pod(1, deletion_timestamp=NOW - timedelta(seconds=31))],
            TRIGGER_POD_STUCK_TERMINATING,
        ),
        ([pod(0), pod(1, node_name="gone")], TRIGGER_NODE_LOST),
    ],
)
def test_each_trigger_restarts_the_whole_group(pods: list[PodInfo], trigger: str) -> None:
    d = decide(pods, NODES, formed(), POLICY, 2, NOW)
    assert isinstance(d, Restart)
    assert d.trigger == trigger
    assert d.group == 0
    # every current pod of the group is replaced, not only the failed one (but a healthy
    # pod that came after the group formed: see the newcomer tests)
    assert set(d.pods) == {p.uid for p in pods} - {"new"}


def test_a_healthy_newcomer_is_kept_by_the_restart() -> None:
    # KubeRay replaced the deleted rank 1 pod before the restart started: the new pod is
    # fresh, and deleting it would stall KubeRay's expectations for 30 s.
    for newcomer in (pod(1, uid="new"), pod(1, uid="new", phase="Pending", ready=False)):
        d = decide([pod(0), newcomer], NODES, formed(), POLICY, 2, NOW)
        assert isinstance(d, Restart) and d.trigger == TRIGGER_POD_DELETED
        assert d.pods == ("u0",)
        # The restart then ends once the member is gone and the ranks are covered.
        state = formed(restarting_since=NOW, restart_pods=d.pods, members=())
        assert decide([pod(0, uid="u0b"), newcomer], NODES, state, POLICY, 2, NOW) == (
            RestartDone(0)
        )


@pytest.mark.parametrize(
    "newcomer",
    [
        pod(1, uid="new", phase="Failed"),
        pod(1, uid="new", restart_count=1),
        pod(1, uid="new", deletion_timestamp=NOW),
        pod(1, uid="new", node_name="gone"),
        pod(1, uid="new", phase="Failed", reason="Evicted"),
    ],
)
def test_an_unhealthy_newcomer_is_replaced_too(newcomer: PodInfo) -> None:
    d = decide([pod(0), newcomer], NODES, formed(), POLICY, 2, NOW)
    assert isinstance(d, Restart)
    assert set(d.pods) == {"u0", "new"}


def test_a_group_that_never_formed_replaces_every_pod() -> None:
    pods = [pod(0), pod(1, ready=False, phase="Pending")]
    state = GroupStatus(index=0, forming_since=NOW - timedelta(seconds=200))
    d = decide(pods, NODES, state, POLICY, 2, NOW)
    assert isinstance(d, Restart) and set(d.pods) == {"u0", "u1"}


def test_a_group_not_formed_yet_keeps_the_replacement_of_its_failed_pod() -> None:
    # No members recorded yet (the failure came right after the pods started): KubeRay's
    # new pod is told apart by its rank having a broken pod beside it.
    failed = pod(1, phase="Failed", deletion_timestamp=NOW)
    pods = [pod(0), failed, pod(1, uid="new", phase="Pending", ready=False)]
    d = decide(pods, NODES, GroupStatus(index=0, forming_since=NOW), POLICY, 2, NOW)
    assert isinstance(d, Restart) and d.trigger == TRIGGER_POD_FAILED
    assert set(d.pods) == {"u0", "u1"}


def test_terminating_within_grace_is_not_stuck() -> None:
    pods = [pod(0), pod(1, deletion_timestamp=NOW - timedelta(seconds=5))]
    triggers = find_triggers(pods, NODES, GroupStatus(index=0), POLICY, 2, NOW)
    assert triggers == []


def test_node_not_ready_waits_for_grace() -> None:
    since = NOW - timedelta(seconds=10)
    nodes = {"n0": NodeInfo("n0"), "n1": NodeInfo("n1", ready=False, since=since)}
    assert decide(healthy(), nodes, formed(), POLICY, 2, NOW) == NoAction()
    later = NOW + timedelta(seconds=31)
    d = decide(healthy(), nodes, formed(), POLICY, 2, later)
    assert isinstance(d, Restart) and d.trigger == TRIGGER_NODE_NOT_READY
    assert d.pod == "p1"


def test_formation_deadline() -> None:
    pods = [pod(0), pod(1, ready=False, phase="Pending")]
    state = GroupStatus(index=0, forming_since=NOW - timedelta(seconds=100))
    assert decide(pods, NODES, state, POLICY, 2, NOW) == NoAction()
    d = decide(pods, NODES, state, POLICY, 2, NOW + timedelta(seconds=21))
    assert isinstance(d, Restart) and d.trigger == TRIGGER_FORMATION_TIMEOUT


def test_unformed_group_without_clock_waits() -> None:
    # A group seen for the first time has no formation clock yet: nothing fires.
    assert decide([pod(0, ready=False)], NODES, GroupStatus(index=0), POLICY, 2, NOW) == NoAction()


def test_one_incident_one_restart_even_with_several_failed_pods() -> None:
    pods = [pod(0, phase="Failed"), pod(1, restart_count=3), pod(2, phase="Failed")]
    d = decide(pods, NODES, formed(tp=3), POLICY, 3, NOW)
    assert isinstance(d, Restart)
    assert "more" in d.reason
    # once recorded, the next pass continues that restart instead of starting another
    state = GroupStatus(
        index=0, restarting_since=NOW, restart_pods=d.pods, restart_times=(NOW,), restarts=1
    )
    d2 = decide(pods, NODES, state, POLICY, 3, NOW + timedelta(seconds=1))
    assert isinstance(d2, ContinueRestart)
    assert set(d2.delete) == {"u0", "u1", "u2"}


def test_continue_restart_resumes_and_finishes() -> None:
    state = GroupStatus(
        index=0, restarting_since=NOW, restart_pods=("u0", "u1"), restart_times=(NOW,)
    )
    # operator died after deleting u0: only u1 remains to delete
    pods = [pod(0, uid="n0", ready=False, phase="Pending"), pod(1)]
    d = decide(pods, NODES, state, POLICY, 2, NOW + timedelta(seconds=2))
    assert d == ContinueRestart(0, ("u1",), ())
    # u1 terminating past grace: force it
    pods = [pod(0, uid="n0"), pod(1, deletion_timestamp=NOW - timedelta(seconds=60))]
    d = decide(pods, NODES, state, POLICY, 2, NOW)
    assert isinstance(d, ContinueRestart) and d.force == ("u1",) and d.delete == ()
    # old pods gone but KubeRay not done yet
    d = decide([pod(0, uid="n0")], NODES, state, POLICY, 2, NOW)
    assert d == ContinueRestart(0, ())
    # every rank has a new pod
    d = decide([pod(0, uid="n0"), pod(1, uid="n1")], NODES, state, POLICY, 2, NOW)
    assert d == RestartDone(0)


def test_backoff_is_exponential_and_capped() -> None:
    assert POLICY.backoff_for(0) == 0
    assert POLICY.backoff_for(1) == 10
    assert POLICY.backoff_for(2) == 20
    assert POLICY.backoff_for(3) == 40
    assert POLICY.backoff_for(10) == 60


def test_second_restart_waits_for_backoff() -> None:
    last = NOW - timedelta(seconds=5)
    state = formed(restart_times=(last,), formed_at=NOW - timedelta(seconds=2), restarts=1)
    pods = [pod(0), pod(1, phase="Failed")]
    d = decide(pods, NODES, state, POLICY, 2, NOW)
    assert isinstance(d, Wait)
    assert d.until == last + timedelta(seconds=10)
    d = decide(pods, NODES, state, POLICY, 2, NOW + timedelta(seconds=6))
    assert isinstance(d, Restart)


def test_budget_exhausted_fails() -> None:
    times = tuple(NOW - timedelta(seconds=s) for s in (300, 200, 100))
    state = formed(restart_times=times, formed_at=NOW - timedelta(seconds=50), restarts=3)
    d = decide([pod(0), pod(1, phase="Failed")], NODES, state, POLICY, 2, NOW)
    assert isinstance(d, Fail)
    assert "maxRestarts 3" in d.reason
    assert d.trigger == TRIGGER_POD_FAILED


def test_budget_window_forgets_old_restarts() -> None:
    times = tuple(NOW - timedelta(seconds=s) for s in (900, 800, 700))
    state = formed(restart_times=times, restarts=3)
    d = decide([pod(0), pod(1, phase="Failed")], NODES, state, POLICY, 2, NOW)
    assert isinstance(d, Restart)


def test_quiet_period_resets_backoff() -> None:
    last = NOW - timedelta(seconds=400)
    # formed for longer than the quiet period: immediate restart
    state = formed(restart_times=(last,), formed_at=NOW - timedelta(seconds=301))
    assert consecutive_restarts(state, POLICY, NOW) == 0
    # chain of restarts closer than the quiet period
    times = (NOW - timedelta(seconds=100), NOW - timedelta(seconds=50))
    state = formed(restart_times=times, formed_at=NOW - timedelta(seconds=10))
    assert consecutive_restarts(state, POLICY, NOW) == 2


def test_max_restarts_zero_fails_on_first_trigger() -> None:
    policy = RestartPolicySpec(max_restarts=0)
    d = decide([pod(0), pod(1, phase="Failed")], NODES, formed(), policy, 2, NOW)
    assert isinstance(d, Fail)


def test_other_groups_are_independent() -> None:
    # the decision for a healthy group ignores another group's failures entirely
    g1 = formed(index=1, members=("v0", "v1"))
    pods_g1 = [pod(0, uid="v0"), pod(1, uid="v1")]
    assert decide(pods_g1, NODES, g1, POLICY, 2, NOW) == NoAction()


def test_stuck_old_pod_does_not_block_or_retrigger() -> None:
    state = GroupStatus(
        index=0, restarting_since=NOW, restart_pods=("u0", "u1"), restart_times=(NOW,)
    )
    stuck = pod(1, deletion_timestamp=NOW - timedelta(seconds=31))
    new = [pod(0, uid="n0"), pod(1, uid="n1")]
    assert decide([stuck, *new], NODES, state, POLICY, 2, NOW) == RestartDone(0)
    # once done, the abandoned stuck pod is ignored by the triggers
    after = GroupStatus(index=0, forming_since=NOW, abandoned_pods=("u1",))
    assert decide([stuck, *new], NODES, after, POLICY, 2, NOW) == NoAction()


# --- a member lost while no operator ran, and the work queue's triage -------------------------


def test_a_member_failed_and_replaced_while_no_operator_ran_is_one_restart() -> None:
    # All the next operator finds: the recorded member u1 is gone, KubeRay's replacement
    # runs healthy under a new UID at rank 1. One restart; the replacement is kept.
    pods = [pod(0), pod(1, uid="kuberay-new", name="p1-new")]
    triggers = find_triggers(pods, NODES, formed(), POLICY, 2, NOW)
    assert [t.trigger for t in triggers] == [TRIGGER_POD_DELETED]
    assert "replaced by p1-new" in triggers[0].reason
    d = decide(pods, NODES, formed(), POLICY, 2, NOW)
    assert isinstance(d, Restart) and d.pods == ("u0",)


def test_both_members_replaced_while_no_operator_ran_is_still_one_restart() -> None:
    pods = [pod(0, uid="n0", name="n0"), pod(1, uid="n1", name="n1")]
    d = decide(pods, NODES, formed(), POLICY, 2, NOW)
    assert isinstance(d, Restart) and d.trigger == TRIGGER_POD_DELETED
    assert "(+1 more)" in d.reason and d.pods == ()


def test_failure_visible_flags_a_lost_member_or_a_broken_pod() -> None:
    steady = {0: formed()}
    assert not failure_visible(steady, {0: healthy()})
    # a member replaced under a new UID, or missing
    assert failure_visible(steady, {0: [pod(0), pod(1, uid="new")]})
    assert failure_visible(steady, {0: [pod(0)]})
    # a member being deleted counts as gone
    assert failure_visible(steady, {0: [pod(0), pod(1, deletion_timestamp=NOW)]})
    for broken in (
        pod(1, phase="Failed"),
        pod(1, reason="Evicted", phase="Failed"),
        pod(1, restart_count=2),
    ):
        assert failure_visible(steady, {0: [pod(0), broken]})
    # a group that has not formed: only its pods speak
    assert not failure_visible({}, {0: healthy()})
    assert failure_visible({}, {0: [pod(0), pod(1, phase="Failed")]})


def test_failure_visible_ignores_a_restart_in_progress_and_abandoned_pods() -> None:
    restarting = {0: formed(members=(), restarting_since=NOW, restart_pods=("u0", "u1"))}
    assert not failure_visible(restarting, {0: [pod(0, phase="Failed"), pod(1)]})
    stuck = pod(1, uid="old", deletion_timestamp=NOW - timedelta(hours=1))
    abandoned = {0: formed(abandoned_pods=("old",))}
    assert not failure_visible(abandoned, {0: [*healthy(), stuck]})


def test_a_pod_lost_before_its_group_formed_is_a_restart_and_its_replacement_is_kept() -> None:
    """Issue 25 item 5: the new pods of a group that has not formed are recorded
    (formingPods); one that failed and was replaced by KubeRay, maybe while no operator ran,
    is a PodDeleted restart, counted once; KubeRay's fresh replacement is kept."""
    forming = GroupStatus(index=0, forming_pods=("u0", "u1"), forming_since=NOW)
    replaced = [pod(0, ready=False), pod(1, uid="new", ready=False)]
    d = decide(replaced, NODES, forming, POLICY, 2, NOW)
    assert isinstance(d, Restart) and d.trigger == TRIGGER_POD_DELETED
    assert "rank 1 pod of the forming group was deleted (replaced by p1)" in d.reason
    assert d.pods == ("u0",)
    assert failure_visible({0: forming}, {0: replaced})
    still = [pod(0, ready=False), pod(1, ready=False)]
    assert isinstance(decide(still, NODES, forming, POLICY, 2, NOW), NoAction)


def test_a_restarts_end_records_the_new_pods_in_the_same_write() -> None:
    from dsi_operator.serving.status import advance_group

    restarting = formed(members=(), restarting_since=NOW, restart_pods=("old0", "old1"))
    new = [pod(0, uid="n0", phase="Pending", ready=False), pod(1, uid="n1", phase="Pending")]
    s = advance_group(restarting, RestartDone(0), new, 2, POLICY, NOW)
    assert s.restarting_since is None and s.forming_pods == ("n0", "n1")
    formed_now = advance_group(s, NoAction(), [pod(0, uid="n0"), pod(1, uid="n1")], 2, POLICY, NOW)
    assert formed_now.members == ("n0", "n1") and formed_now.forming_pods == ()
    # Two pods on one index: nothing is recorded until KubeRay settles.
    extra = [*new, pod(1, uid="n2", phase="Pending")]
    assert advance_group(GroupStatus(index=0), NoAction(), extra, 2, POLICY, NOW).forming_pods == ()
