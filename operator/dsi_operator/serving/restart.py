"""Pure whole-group restart decisions.

Nothing here talks to Kubernetes. The controller gathers plain data (the pods of a group, the
nodes they run on, the group's bookkeeping -- the :class:`~dsi_operator.api.spec.GroupStatus`
read from ``status.groups[g]`` -- the restart policy and the current time) and asks
:func:`decide` what to do with that group. The answer is one of:

* :class:`NoAction` -- the group is healthy, or forming within its deadline;
* :class:`Restart` -- start a whole-group restart now (one per incident, whatever the number
  of failed pods): record it in status first, then delete every pod listed in ``pods``;
* :class:`ContinueRestart` -- a restart recorded in status is still in progress: delete the old
  pods that remain (this is how a killed-and-restarted operator resumes), or wait for them;
* :class:`RestartDone` -- every old pod is gone and the group has a full new set of pods;
* :class:`Wait` -- a trigger fired but the group is in backoff until ``until``;
* :class:`Fail` -- a trigger fired and the restart budget is exhausted.

Why UIDs rather than creation times: ``creationTimestamp`` has one-second resolution, and on a
fast cluster a replacement pod can be created in the same second as the decision, so "older
than the restart" would delete the new pods too. The restart records the UIDs it replaces and
the group records the UIDs of its members when it forms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from dsi_operator.api.spec import GroupStatus, RestartPolicySpec
from dsi_operator.util.timefmt import iso_precise

# Trigger names, used in Events, status.groups[].lastRestartReason and metrics labels.
TRIGGER_CONTAINER_RESTART = "ContainerRestarted"
TRIGGER_POD_FAILED = "PodFailed"
TRIGGER_POD_EVICTED = "PodEvicted"
TRIGGER_POD_DELETED = "PodDeleted"
TRIGGER_POD_STUCK_TERMINATING = "PodStuckTerminating"
TRIGGER_NODE_NOT_READY = "NodeNotReady"
TRIGGER_NODE_LOST = "NodeLost"
TRIGGER_FORMATION_TIMEOUT = "FormationTimeout"
#: Too many in-place re-forms in the window (see :mod:`dsi_operator.serving.reform`).
TRIGGER_REFORM_LOOP = "ReformLoop"

#: Priority order: the first trigger found names the incident.
ALL_TRIGGERS = (
    TRIGGER_CONTAINER_RESTART,
    TRIGGER_POD_EVICTED,
    TRIGGER_POD_FAILED,
    TRIGGER_POD_STUCK_TERMINATING,
    TRIGGER_NODE_NOT_READY,
    TRIGGER_NODE_LOST,
    TRIGGER_POD_DELETED,
    TRIGGER_FORMATION_TIMEOUT,
    TRIGGER_REFORM_LOOP,
)


@dataclass(frozen=True)
class PodInfo:
    """What the restart logic needs to know about one worker pod of a group."""

    name: str
    uid: str
    # Index of the pod within its group: its rank at one rank per pod (the usual case, and
    # the name the messages use), else deepspeed.ai/pod.
    rank: int
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool = False
    restart_count: int = 0  # sum over the regular containers (init containers excluded)
    reason: str | None = None  # status.reason, e.g. "Evicted"
    node_name: str | None = None
    deletion_timestamp: datetime | None = None
    #: lastTransitionTime of the pod's Ready condition (None: unknown).
    ready_changed: datetime | None = None
    group_hash: str | None = None  # deepspeed.ai/group-hash annotation/label of the pod
    cluster: str | None = None  # ray.io/cluster label: the RayCluster the pod belongs to


@dataclass(frozen=True)
class NodeInfo:
    """Readiness of one node: ``ready`` is the Ready condition, ``since`` its last transition."""

    name: str
    ready: bool = True
    since: datetime | None = None


@dataclass(frozen=True)
class NoAction:
    """Nothing to do for this group."""


@dataclass(frozen=True)
class Restart:
    """Start a whole-group restart: record it, post an Event, then delete ``pods`` (UIDs)."""

    group: int
    trigger: str
    pod: str  # the pod that triggered it ("" when the group as a whole did, e.g. a deadline)
    reason: str  # human-readable message for the Event and status
    pods: tuple[str, ...]  # UIDs to replace: every current pod but a healthy newcomer
    #: False for a rollout replacing the group (not a failure: no budget, no backoff).
    counted: bool = True


@dataclass(frozen=True)
class ContinueRestart:
    """A restart is in progress: delete ``delete`` (UIDs); ``force`` are stuck, delete now."""

    group: int
    delete: tuple[str, ...]
    force: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestartDone:
    """The restart in progress has replaced every old pod; clear the in-progress marker."""

    group: int


@dataclass(frozen=True)
class Wait:
    """A trigger fired but the group is backing off until ``until``."""

    group: int
    trigger: str
    pod: str
    reason: str
    until: datetime


@dataclass(frozen=True)
class Fail:
    """A trigger fired and the restart budget is exhausted: the resource goes to Failed."""

    group: int
    trigger: str
    pod: str
    reason: str


Decision = NoAction | Restart | ContinueRestart | RestartDone | Wait | Fail


@dataclass(frozen=True)
class Trigger:
    """One detected failure of a group."""

    trigger: str
    pod: str
    reason: str


def recent_restarts(state: GroupStatus, policy: RestartPolicySpec, now: datetime) -> list[datetime]:
    """Restart times of the group that are still inside the budget window."""
    window = timedelta(seconds=policy.window_seconds)
    return sorted(t for t in state.restart_times if now - t < window)


def consecutive_restarts(state: GroupStatus, policy: RestartPolicySpec, now: datetime) -> int:
    """Restarts since the group was last quiet (formed for ``quiet_period_seconds``).

    Walks back from the latest restart while the gap to the next one is shorter than the
    quiet period; only restarts inside the budget window are known.
    """
    quiet = timedelta(seconds=policy.quiet_period_seconds)
    if state.formed_at is not None and now - state.formed_at >= quiet:
        return 0
    times = recent_restarts(state, policy, now)
    if not times:
        return 0
    count = 1
    for earlier, later in zip(reversed(times[:-1]), reversed(times[1:]), strict=True):
        if later - earlier >= quiet:
            break
        count += 1
    return count


def recent_reforms(state: GroupStatus, policy: RestartPolicySpec, now: datetime) -> list[datetime]:
    """Re-form times of the group that are still inside the budget window."""
    window = timedelta(seconds=policy.window_seconds)
    return sorted(t for t in state.reform_times if now - t < window)


def reform_loop_trigger(
    state: GroupStatus, policy: RestartPolicySpec, now: datetime
) -> Trigger | None:
    """A restart trigger once the group re-formed more than ``maxReforms`` times in the
    window (a crash loop inside the same pods)."""
    recent = recent_reforms(state, policy, now)
    if len(recent) <= policy.max_reforms:
        return None
    return Trigger(
        TRIGGER_REFORM_LOOP,
        "",
        f"group re-formed in place {len(recent)} times within {policy.window_seconds:g}s "
        f"(maxReforms {policy.max_reforms}); last: {state.last_reform_reason or 'unknown'}",
    )


def live_pods(pods: Sequence[PodInfo]) -> list[PodInfo]:
    """Pods that are not being deleted."""
    return [p for p in pods if p.deletion_timestamp is None]


def group_pods_ready(pods: Sequence[PodInfo], n_pods: int) -> bool:
    """True when every pod index 0..n_pods-1 (the rank, at one rank per pod) has exactly one
    live pod, Running and Ready."""
    live = live_pods(pods)
    ranks = {p.rank for p in live if p.phase == "Running" and p.ready}
    return ranks == set(range(n_pods)) and len(live) == n_pods


def group_pods_started(pods: Sequence[PodInfo], n_pods: int) -> bool:
    """True when every pod index 0..n_pods-1 has exactly one live pod that is Running: bound
    to a node, images pulled and containers started (Ready or not)."""
    live = live_pods(pods)
    started = {p.rank for p in live if p.phase == "Running" and p.node_name}
    return started == set(range(n_pods)) and len(live) == n_pods


def find_triggers(
    pods: Sequence[PodInfo],
    nodes: Mapping[str, NodeInfo],
    state: GroupStatus,
    policy: RestartPolicySpec,
    n_pods: int,
    now: datetime,
) -> list[Trigger]:
    """Every failure currently visible in a group, most specific first.

    The order matters only for which trigger names the incident; all of them lead to one
    restart of the same group.
    """
    found: list[Trigger] = []
    for p in sorted(pods, key=lambda p: (p.rank, p.name)):
        if p.uid not in state.abandoned_pods:
            found.extend(_pod_triggers(p, nodes, policy, now))
    found.extend(_group_triggers(pods, state, policy, n_pods, now))
    if (loop := reform_loop_trigger(state, policy, now)) is not None:
        found.append(loop)
    return _dedupe(found)


def _pod_triggers(
    p: PodInfo, nodes: Mapping[str, NodeInfo], policy: RestartPolicySpec, now: datetime
) -> list[Trigger]:
    """What is wrong with one pod: stuck Terminating, evicted, failed, restarted, its node."""
    found: list[Trigger] = []
    who = f"pod {p.name} (rank {p.rank})"
    if p.deletion_timestamp is not None:
        # deletionTimestamp is already "request time + grace period": past it plus our
        # grace, the kubelet (or the node) is not finishing the job.
        if now - p.deletion_timestamp > timedelta(seconds=policy.terminating_grace_seconds):
            found.append(
                Trigger(
                    TRIGGER_POD_STUCK_TERMINATING,
                    p.name,
                    f"{who} stuck Terminating since {iso_precise(p.deletion_timestamp)}",
                )
            )
        # A pod being deleted may still show why it failed (KubeRay deletes Failed
        # worker pods at once): keep checking so the incident gets its real name.
    if p.reason == "Evicted":
        found.append(Trigger(TRIGGER_POD_EVICTED, p.name, f"{who} was evicted"))
    elif p.phase == "Failed":
        why = f" ({p.reason})" if p.reason else ""
        found.append(Trigger(TRIGGER_POD_FAILED, p.name, f"{who} phase Failed{why}"))
    if p.restart_count > 0:
        found.append(
            Trigger(
                TRIGGER_CONTAINER_RESTART,
                p.name,
                f"{who} container restarted (restartCount {p.restart_count})",
            )
        )
    if p.node_name:
        node = nodes.get(p.node_name)
        if node is None:
            found.append(Trigger(TRIGGER_NODE_LOST, p.name, f"node {p.node_name} of {who} is gone"))
        elif not node.ready:
            since = node.since or now
            if now - since > timedelta(seconds=policy.node_not_ready_grace_seconds):
                found.append(
                    Trigger(
                        TRIGGER_NODE_NOT_READY,
                        p.name,
                        f"node {p.node_name} of {who} NotReady since {iso_precise(since)}",
                    )
                )
    return found


def _group_triggers(
    pods: Sequence[PodInfo],
    state: GroupStatus,
    policy: RestartPolicySpec,
    n_pods: int,
    now: datetime,
) -> list[Trigger]:
    """What is wrong with the group as a whole: a member gone, or not formed in time."""
    if state.members:
        # The group had formed: every member must still be there. A member that is gone (or
        # was replaced by KubeRay under a new UID) means the process group is broken.
        return _lost_pods(pods, state.members, "formed group")
    if lost := _lost_pods(pods, state.forming_pods, "forming group"):
        return lost
    if state.forming_since is None or group_pods_ready(pods, n_pods):
        return []
    if now - state.forming_since <= timedelta(seconds=policy.formation_timeout_seconds):
        return []
    return [
        Trigger(
            TRIGGER_FORMATION_TIMEOUT,
            "",
            f"group not formed within {policy.formation_timeout_seconds:g}s "
            f"(forming since {iso_precise(state.forming_since)})",
        )
    ]


def _lost_pods(pods: Sequence[PodInfo], recorded: Sequence[str], what: str) -> list[Trigger]:
    """A PodDeleted trigger for each recorded pod (by index) that is no longer live."""
    live = live_pods(pods)
    live_uids = {p.uid for p in live}
    found: list[Trigger] = []
    for rank, uid in enumerate(recorded):
        if uid not in live_uids:
            current = sorted((p for p in live if p.rank == rank), key=lambda p: p.name)
            how = f"replaced by {current[0].name}" if current else "missing"
            found.append(
                Trigger(
                    TRIGGER_POD_DELETED,
                    current[0].name if current else "",
                    f"rank {rank} pod of the {what} was deleted ({how})",
                )
            )
    return found


def pods_by_index(pods: Sequence[PodInfo], n_pods: int) -> tuple[str, ...]:
    """UIDs of the group's live pods by index when each index 0..n_pods-1 has exactly one
    (and there are no others); () otherwise."""
    live = live_pods(pods)
    by_rank = {p.rank: p.uid for p in live}
    if len(live) != n_pods or set(by_rank) != set(range(n_pods)):
        return ()
    return tuple(by_rank[r] for r in range(n_pods))


def decide(
    pods: Sequence[PodInfo],
    nodes: Mapping[str, NodeInfo],
    state: GroupStatus,
    policy: RestartPolicySpec,
    n_pods: int,
    now: datetime,
) -> Decision:
    """Decide what to do with one group (see the module docstring)."""
    if state.restarting_since is not None:
        return _continue(pods, state, policy, n_pods, now)

    triggers = find_triggers(pods, nodes, state, policy, n_pods, now)
    if not triggers:
        return NoAction()
    first = triggers[0]
    reason = first.reason
    if len(triggers) > 1:
        reason += f" (+{len(triggers) - 1} more)"

    recent = recent_restarts(state, policy, now)
    if len(recent) >= policy.max_restarts:
        return Fail(
            state.index,
            first.trigger,
            first.pod,
            f"group {state.index} needs a restart ({reason}) but already restarted "
            f"{len(recent)} time(s) within {policy.window_seconds:g}s "
            f"(maxRestarts {policy.max_restarts})",
        )
    consecutive = consecutive_restarts(state, policy, now)
    if recent and consecutive:
        until = recent[-1] + timedelta(seconds=policy.backoff_for(consecutive))
        if now < until:
            return Wait(state.index, first.trigger, first.pod, reason, until)
    return Restart(
        state.index, first.trigger, first.pod, reason, _uids(_to_replace(pods, nodes, state))
    )


def _to_replace(
    pods: Sequence[PodInfo], nodes: Mapping[str, NodeInfo], state: GroupStatus
) -> list[PodInfo]:
    """The pods a restart deletes: every pod of the group but a healthy newcomer.

    A newcomer is KubeRay's replacement of a failed or deleted pod, often created before the
    restart starts: a pod that came after the group formed (not a member), or, in a group
    that has not formed, a healthy pod whose rank also has a broken one. It is a fresh
    process, so keeping it loses nothing, and deleting it costs up to 30 s: KubeRay holds
    back a worker group while a pod it created is "expected" and not yet in its cache, and a
    pod deleted before KubeRay looked again stays expected until the 30 s expectations
    timeout (KubeRay 1.6.2 ``controllers/ray/expectations/scale_expectations.go``).
    """
    return [p for p in pods if not _newcomer(p, pods, nodes, state)]


def _newcomer(
    p: PodInfo, pods: Sequence[PodInfo], nodes: Mapping[str, NodeInfo], state: GroupStatus
) -> bool:
    recorded = state.members or state.forming_pods
    if p.uid in recorded or p.uid in state.abandoned_pods or not _healthy(p, nodes):
        return False
    if recorded:
        return True
    return any(q.rank == p.rank and q.uid != p.uid and not _healthy(q, nodes) for q in pods)


def _healthy(p: PodInfo, nodes: Mapping[str, NodeInfo]) -> bool:
    """Neither deleting, failed, evicted nor restarted, and on a node that is Ready."""
    node = nodes.get(p.node_name) if p.node_name else None
    return (
        p.deletion_timestamp is None
        and p.phase in ("Pending", "Running")
        and p.reason is None
        and p.restart_count == 0
        and (p.node_name is None or (node is not None and node.ready))
    )


def _continue(
    pods: Sequence[PodInfo],
    state: GroupStatus,
    policy: RestartPolicySpec,
    n_pods: int,
    now: datetime,
) -> Decision:
    old = set(state.restart_pods)
    remaining = [p for p in pods if p.uid in old]
    grace = timedelta(seconds=policy.terminating_grace_seconds)

    def forced(p: PodInfo) -> bool:
        return p.deletion_timestamp is not None and now - p.deletion_timestamp > grace

    # Old pods still Terminating past the grace period have been force-deleted; if they
    # linger (finalizer, dead kubelet) they must not hold the group back forever.
    blocking = [p for p in remaining if not forced(p)]
    if not blocking:
        new = [p for p in live_pods(pods) if p.uid not in old]
        if {p.rank for p in new} >= set(range(n_pods)):
            return RestartDone(state.index)
    to_delete = tuple(p.uid for p in remaining if p.deletion_timestamp is None)
    force = tuple(p.uid for p in remaining if forced(p))
    return ContinueRestart(state.index, to_delete, force)


def _uids(pods: Sequence[PodInfo]) -> tuple[str, ...]:
    return tuple(sorted(p.uid for p in pods))


def _dedupe(triggers: list[Trigger]) -> list[Trigger]:
    seen: set[tuple[str, str]] = set()
    out: list[Trigger] = []
    for t in triggers:
        key = (t.trigger, t.pod)
        if key not in seen:
            seen.add(key)
            out.append(t)
    # Most specific first: a failed/evicted/restarted pod names the incident better than the
    # membership check that the same incident also trips.
    order = {name: i for i, name in enumerate(ALL_TRIGGERS)}
    return sorted(out, key=lambda t: order.get(t.trigger, len(order)))


def failure_visible(
    states: Mapping[int, GroupStatus], pods: Mapping[int, Sequence[PodInfo]]
) -> bool:
    """Whether a pass would likely find a group to restart: a recorded member gone (deleted,
    or replaced by KubeRay under a new UID), or a pod failed, evicted, restarted or deleting.

    A cheap triage for the work queue, without nodes or clocks (a pass decides for real): a
    resource that shows one is planned before the others. After an operator restart every
    resource is queued at once, and the one whose pod failed while no operator ran must not
    wait behind a hundred steady ones.
    """
    for g, group_pods in pods.items():
        state = states.get(g, GroupStatus(index=g))
        if state.restarting_since is not None:
            continue  # a restart in progress: its old pods are expected to fail or go
        if any(_pod_broken(p) and p.uid not in state.abandoned_pods for p in group_pods):
            return True
    for g, state in states.items():
        recorded = state.members or state.forming_pods
        if recorded and state.restarting_since is None:
            live = {p.uid for p in live_pods(pods.get(g, ()))}
            if not set(recorded) <= live:
                return True
    return False


def _pod_broken(p: PodInfo) -> bool:
    return (
        p.deletion_timestamp is not None
        or p.phase == "Failed"
        or p.reason == "Evicted"
        or p.restart_count > 0
    )
