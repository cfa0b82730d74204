"""In-place re-forms: pure detection and bookkeeping.

A group can break and come back without any pod changing: a rank actor dies, or the worker
kills a hung or wedged epoch, and Ray Serve forms the group again inside the same pods.
Nothing at the pod level shows it except readiness: a rank pod is Ready exactly while its
rank process holds the formed lock (``dsi_worker.readiness``), so a member of a formed group
that turns NotReady while its pod runs on (same UID, no container restart) is the start of
an in-place re-form.

Re-forms are counted apart from restarts (``status.groups[].reforms``), with their cause, an
Event and a metric, so a week of silent re-forms shows. They do not use the restart budget:
a re-form costs no pod and no scheduling, and Serve already does it. But a crash loop inside
the same pods must end: past ``restartPolicy.maxReforms`` re-forms within ``windowSeconds``
the group is restarted with new pods (trigger ``ReformLoop``), which counts against
``maxRestarts`` and so ends in ``Failed`` if the loop goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from dsi_operator.api.spec import GroupStatus, RestartPolicySpec
from dsi_operator.serving.restart import (
    TRIGGER_REFORM_LOOP,
    Decision,
    PodInfo,
    Restart,
    group_pods_ready,
    live_pods,
    recent_reforms,
)

#: How long a member must have been NotReady before it counts: a container that died shows
#: NotReady a moment before its restart count grows, and that is a restart, not a re-form.
REFORM_GRACE = timedelta(seconds=5)


@dataclass(frozen=True)
class Reform:
    """A re-form in place that began: ``rank``'s pod ``pod`` lost its formed rank process."""

    group: int
    rank: int
    pod: str
    reason: str


def find_reform(
    state: GroupStatus,
    pods: Sequence[PodInfo],
    now: datetime,
    head: PodInfo | None,
    grace: timedelta = REFORM_GRACE,
) -> Reform | None:
    """The re-form that began in this formed group, or None.

    Only for a formed group (members recorded) with no restart or re-form in progress, when
    every member pod is still there, Running, has not restarted, and has been NotReady for
    ``grace``: when an epoch ends, the group replica kills every rank actor of it, so all of
    them lose the formed lock. One member still Ready is not a re-form: a pod on a lost node
    looks Ready until the node controller's grace ends, and that is a restart (NodeNotReady).
    Anything at the pod level is a restart, which :func:`dsi_operator.serving.restart.decide`
    handles first. Not either unless the Ray ``head`` (the one live head pod) is Ready and
    was so before the group formed: Ray keeps no worker across a head restart, so a group
    that formed under another head comes back through its containers restarting.
    """
    if not state.members or state.restarting_since or state.reforming_since:
        return None
    if not _same_head(head, state.formed_at):
        return None
    live = {p.uid: p for p in live_pods(pods)}
    members = [live.get(uid) for uid in state.members]
    down: list[tuple[int, PodInfo]] = []
    for rank, p in enumerate(members):
        if p is None or p.restart_count > 0 or p.phase != "Running" or p.ready:
            return None
        if p.ready_changed is not None and now - p.ready_changed < grace:
            return None
        down.append((rank, p))
    rank, first = min(down, key=lambda d: (d[1].ready_changed or now, d[0]))
    return Reform(
        state.index,
        rank,
        first.name,
        f"rank {rank} (pod {first.name}) stopped being formed first while the group's pods ran "
        "on (a rank process lost or failed as wedged, or the Serve app redeployed); Ray Serve "
        "re-forms the group in place",
    )


def _same_head(head: PodInfo | None, formed_at: datetime | None) -> bool:
    """The head runs and has been Ready since before the group formed (unknown: assume so)."""
    if head is None or head.phase != "Running" or not head.ready:
        return False
    return head.ready_changed is None or formed_at is None or head.ready_changed <= formed_at


def advance_reform(
    state: GroupStatus,
    reform: Reform | None,
    decision: Decision,
    pods: Sequence[PodInfo],
    n_pods: int,
    policy: RestartPolicySpec,
    now: datetime,
) -> GroupStatus:
    """The group's re-form bookkeeping after this pass: a new re-form counted and marked in
    progress; the mark cleared once every rank is ready again or a restart replaces the pods
    (a ``ReformLoop`` restart also clears the re-form history that caused it)."""
    if isinstance(decision, Restart):
        times = () if decision.trigger == TRIGGER_REFORM_LOOP else state.reform_times
        return state.model_copy(update={"reforming_since": None, "reform_times": times})
    if reform is not None:
        return state.model_copy(
            update={
                "reforms": state.reforms + 1,
                "reform_times": tuple(recent_reforms(state, policy, now)) + (now,),
                "last_reform_time": now,
                "last_reform_reason": reform.reason,
                "reforming_since": now,
            }
        )
    if state.reforming_since is not None and group_pods_ready(pods, n_pods):
        return state.model_copy(update={"reforming_since": None})
    return state
