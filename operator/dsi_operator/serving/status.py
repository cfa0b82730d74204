"""Pure status computation: phase, conditions, per-group bookkeeping, and the "changed?" diff.

How readiness is judged (documented for users in the README):

* a group's **pods are ready** when each of its pods (one per rank, or one per ranksPerPod
  ranks) is live, Running and Ready (``status.groups[g].readyPods == pods``); a rank pod's
  readiness probe passes only while its rank actors have formed the group (see
  ``render.formed_probe``);
* a group is **ready** (counted in ``status.readyReplicas`` and the READY column) when its pods
  are ready *and* KubeRay reports the RayService ready, i.e. Ray Serve runs the application that
  drives the group, *and* (where KubeRay reports per-deployment status) the group's own
  ``group-<g>`` Serve deployment is HEALTHY. Serve health is the signal that the rank processes
  formed their torch.distributed group; a rank process lost inside a live pod turns only its
  group's deployment UNHEALTHY, so that group alone drops out of READY (phase Degraded).

Phases, in order of precedence: Failed (invalid spec or restart budget exhausted), Pending
(a blocking preflight failed, or nothing created yet), Restarting (a group restart is in
progress or backing off), Ready (all groups ready), Degraded (some but not all groups ready),
Forming (all pods running, Ray Serve not ready yet), Provisioning (pods missing, unscheduled
or starting).

The controller never writes status when the merge patch from the current status to
:func:`compute_status`'s is empty (:func:`dsi_operator.util.patch.merge_patch`, with
:data:`IGNORED_KEYS` left alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dsi_operator.api.fields import validate_leniently
from dsi_operator.api.spec import (
    Condition,
    ConditionType,
    DeepSpeedInferenceStatus,
    GroupStatus,
    Phase,
    RestartPolicySpec,
)
from dsi_operator.serving.restart import (
    Decision,
    Fail,
    NoAction,
    PodInfo,
    Restart,
    RestartDone,
    Wait,
    group_pods_ready,
    group_pods_started,
    live_pods,
    pods_by_index,
    recent_restarts,
)
from dsi_operator.serving.rollout import TRIGGER_ROLLOUT
from dsi_operator.util.timefmt import iso

# Condition types in the order they are listed in status.
CONDITION_ORDER = (
    ConditionType.KubeRayAvailable,
    ConditionType.GPUOperatorReady,
    ConditionType.GPUCapacity,
    ConditionType.RayServiceReady,
    ConditionType.GroupsFormed,
)


# --- group bookkeeping from status ----------------------------------------------------------


def group_states_from_status(status: Mapping[str, Any] | None) -> dict[int, GroupStatus]:
    """All groups recorded in a DSI status, by index (fields that do not validate read as
    unset, so one malformed field does not lose the rest of a group's bookkeeping)."""
    out: dict[int, GroupStatus] = {}
    for raw in (status or {}).get("groups") or []:
        if isinstance(raw, Mapping) and isinstance(raw.get("index"), int):
            out[raw["index"]] = validate_leniently(GroupStatus, dict(raw))
    return out


# --- applying decisions to bookkeeping ---------------------------------------------------------


def _restarting(
    state: GroupStatus, decision: Restart, policy: RestartPolicySpec, now: datetime
) -> GroupStatus:
    """A restart starts: marked in progress with the UIDs to replace, membership cleared;
    counted (budget and history) unless it is a rollout's."""
    replacing = state.model_copy(
        update={
            "restarting_since": now,
            "restart_trigger": decision.trigger,
            "restart_pods": decision.pods,
            "members": (),
            "forming_pods": (),
            "formed_at": None,
            "forming_since": None,
        }
    )
    if not decision.counted:  # a rollout replacing the group: no budget, no history
        return replacing
    return replacing.model_copy(
        update={
            "restarts": state.restarts + 1,
            "restart_times": tuple(recent_restarts(state, policy, now)) + (now,),
            "last_restart_time": now,
            "last_restart_reason": f"{decision.trigger}: {decision.reason}",
        }
    )


def advance_group(
    state: GroupStatus,
    decision: Decision,
    pods: Sequence[PodInfo],
    n_pods: int,
    policy: RestartPolicySpec,
    now: datetime,
) -> GroupStatus:
    """The group's bookkeeping after ``decision`` (and after observing ``pods``).

    * Restart: marked in progress with the UIDs to replace, membership cleared; counted
      unless it is a rollout's.
    * RestartDone: in-progress marker cleared; the formation clock waits for the new pods.
    * otherwise: record membership when the group's pods become ready; start the formation
      clock once every pod of the group is Running (scheduled, containers started).
    """
    if isinstance(decision, Restart):
        return _restarting(state, decision, policy, now)
    if isinstance(decision, RestartDone):
        present = {p.uid for p in pods}
        state = state.model_copy(
            update={
                "abandoned_pods": tuple(u for u in state.restart_pods if u in present),
                "restarting_since": None,
                "restart_trigger": None,
                "restart_pods": (),
                "members": (),
                "forming_pods": (),
                "formed_at": None,
                "forming_since": None,
            }
        )
    if state.restarting_since is not None:
        return state
    if state.abandoned_pods:
        present = {p.uid for p in pods}
        state = state.model_copy(
            update={"abandoned_pods": tuple(u for u in state.abandoned_pods if u in present)}
        )
    # The members are recorded once, when the group first has a ready pod per index: a pod
    # of that set that later fails or vanishes is the group's failure, even if the operator
    # was down when it happened (restart_times are trimmed to the window in _restarting).
    if not state.members and group_pods_ready(pods, n_pods) and not isinstance(decision, Fail):
        clusters = {p.cluster for p in live_pods(pods)}
        # group_pods_ready: exactly one live pod per index, so members is every index.
        return state.model_copy(
            update={
                "members": pods_by_index(pods, n_pods),
                "forming_pods": (),
                "formed_at": now,
                "forming_since": None,
                "ray_cluster": clusters.pop() if len(clusters) == 1 else None,
            }
        )
    if not state.members and not state.forming_pods and (started := pods_by_index(pods, n_pods)):
        # In the same write as a restart's end: a new pod lost before the group forms is seen.
        state = state.model_copy(update={"forming_pods": started})
    if not state.members and state.forming_since is None and group_pods_started(pods, n_pods):
        # The formation clock starts only once every pod is scheduled and its containers
        # started: image pulls, Kueue admission and a full cluster must not use it up.
        return state.model_copy(update={"forming_since": now})
    return state


def group_status(
    state: GroupStatus,
    pods: Sequence[PodInfo],
    n_pods: int,
    ready: bool,
    phase: str,
    ranks_per_pod: int = 1,
) -> GroupStatus:
    """One ``status.groups[]`` entry: the group's bookkeeping with this pass's observations."""
    ready_pods = len(
        {p.rank for p in live_pods(pods) if p.phase == "Running" and p.ready and p.rank < n_pods}
    )
    return state.model_copy(
        update={
            "phase": phase,
            "ranks": n_pods * ranks_per_pod,
            "ready_ranks": ready_pods * ranks_per_pod,
            "pods": n_pods,
            "ready_pods": ready_pods,
            "ready": ready,
        }
    )


# --- conditions --------------------------------------------------------------------------------


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None,
    conditions: Sequence[Condition],
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Conditions as status dicts, keeping ``lastTransitionTime`` unless ``status`` flipped."""
    prev = {c.get("type"): c for c in previous or [] if isinstance(c, Mapping)}
    order: dict[str, int] = {t: i for i, t in enumerate(CONDITION_ORDER)}
    out: list[dict[str, Any]] = []
    for c in sorted(conditions, key=lambda c: order.get(c.type, len(order))):
        old = prev.get(c.type)
        ltt = old.get("lastTransitionTime") if old and old.get("status") == c.status else None
        d: dict[str, Any] = {
            "type": c.type,
            "status": c.status,
            "reason": c.reason,
            "message": c.message,
            "lastTransitionTime": ltt or iso(now),
        }
        if generation is not None:
            d["observedGeneration"] = generation
        out.append(d)
    return out


# --- the whole status --------------------------------------------------------------------------


@dataclass
class RayServiceView:
    """What the controller saw of the RayService child."""

    exists: bool = False
    ready: bool = False
    message: str = ""
    active_cluster: str | None = None  # status.activeServiceStatus.rayClusterName
    pending_cluster: str | None = None  # status.pendingServiceStatus.rayClusterName
    # Ray Serve status of each group's ``group-<g>`` deployment (HEALTHY, UNHEALTHY,
    # UPDATING, ...) as KubeRay reports it. A rank process that died while its pod lives shows
    # up only here: Serve's health check fails and the group re-forms inside Ray.
    serve_groups: dict[int, str] = field(default_factory=dict)

    def group_serving(self, g: int) -> bool:
        """Serve reports group g healthy (or reports no per-group status at all)."""
        return not self.serve_groups or self.serve_groups.get(g) == "HEALTHY"


@dataclass
class StatusInputs:
    """Everything :func:`compute_status` needs; gathered by the controller."""

    name: str
    namespace: str
    generation: int | None
    replicas: int
    tp: int
    current: Mapping[str, Any]
    now: datetime
    endpoint: str | None = None
    groups: Mapping[int, GroupStatus] = field(default_factory=dict)
    pods: Mapping[int, Sequence[PodInfo]] = field(default_factory=dict)
    decisions: Mapping[int, Decision] = field(default_factory=dict)
    preflight: Sequence[Condition] = ()
    blocking: str | None = None  # message when a preflight blocks creation
    children_created: bool = False
    rayservice: RayServiceView = field(default_factory=RayServiceView)
    failed_reason: str | None = None  # restart budget exhausted (sticky until a spec change)
    invalid_spec: str | None = None  # validation error message naming the field
    warnings: Sequence[str] = ()
    selector: str | None = None  # label selector of the worker pods (scale subresource)
    new_restarts: int = 0  # restarts started by this evaluation
    group_hashes: Mapping[int, str] = field(default_factory=dict)  # group -> template hash
    ranks_per_pod: int = 1
    rollout: Mapping[str, Any] | None = None  # status.rollout
    rollout_condition: Condition | None = None  # Progressing
    #: (pods, ranks per pod) of groups whose shape is not the spec's yet (a TP-size rollout).
    group_shapes: Mapping[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def pods_per_group(self) -> int:
        """Pods one group should have."""
        return max(self.tp // self.ranks_per_pod, 1)

    def shape(self, g: int) -> tuple[int, int]:
        """(pods, ranks per pod) group g has now."""
        return self.group_shapes.get(g, (self.pods_per_group, self.ranks_per_pod))


def compute_status(inp: StatusInputs) -> dict[str, Any]:
    """The desired ``status`` of a DSI: a plain dict, which the controller merge-patches in."""
    prev_conditions = inp.current.get("conditions") if inp.current else None
    # The total only grows: it survives groups being scaled away and is never recomputed from
    # the per-group counters alone.
    prior_total = inp.current.get("restarts", 0) if inp.current else 0
    if not isinstance(prior_total, int):
        prior_total = 0
    restarts_total = max(
        prior_total + inp.new_restarts, sum(g.restarts for g in inp.groups.values())
    )

    prior_reforms = inp.current.get("reforms", 0) if inp.current else 0
    reforms_total = max(
        prior_reforms if isinstance(prior_reforms, int) else 0,
        sum(g.reforms for g in inp.groups.values()),
    )

    base: dict[str, Any] = {
        "observedGeneration": inp.generation,
        "replicas": inp.replicas,
        "restarts": restarts_total,
        "reforms": reforms_total,
    }
    if inp.invalid_spec is not None:
        base.update(
            phase=Phase.Failed,
            message=f"invalid spec: {inp.invalid_spec}",
            readyReplicas=0,
            ready=f"0/{inp.replicas}",
        )
        base["conditions"] = merge_conditions(
            prev_conditions, inp.preflight, inp.generation, inp.now
        )
        return _clean(base)

    gs = _groups(inp)
    n_ready = len(gs.ready)
    base["groups"] = gs.entries
    base["readyReplicas"] = n_ready
    base["ready"] = f"{n_ready}/{inp.replicas}"
    if inp.selector:
        base["selector"] = inp.selector
    if inp.endpoint and inp.children_created:
        base["endpoint"] = inp.endpoint
    conditions = [*inp.preflight, *_serving_conditions(inp, gs)]
    if inp.rollout_condition is not None:
        conditions.append(inp.rollout_condition)
    if inp.rollout is not None:
        base["rollout"] = dict(inp.rollout)
    base["conditions"] = merge_conditions(prev_conditions, conditions, inp.generation, inp.now)
    if inp.failed_reason is not None:
        base["failedReason"] = inp.failed_reason
    phase, message = _phase(inp, gs)
    if inp.warnings and phase != Phase.Failed:
        message = message + "; " + "; ".join(inp.warnings)
    base.update(phase=phase, message=message)
    return _clean(base)


@dataclass
class _Groups:
    """The per-group part of a status, and the tallies the phase is judged from."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    pods_ready: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    restarting: list[str] = field(default_factory=list)
    all_running: bool = True


def _groups(inp: StatusInputs) -> _Groups:
    out = _Groups()
    recorded = group_states_from_status(inp.current)
    for g in range(inp.replicas):
        state = inp.groups.get(g, GroupStatus(index=g))
        pods = inp.pods.get(g, ())
        dec = inp.decisions.get(g, NoAction())
        n_pods, ranks_per_pod = inp.shape(g)
        pready = group_pods_ready(pods, n_pods)
        running = {p.rank for p in live_pods(pods) if p.phase == "Running"} >= set(range(n_pods))
        out.all_running = out.all_running and running
        gready = (
            pready
            and inp.rayservice.ready
            and inp.rayservice.group_serving(g)
            and state.restarting_since is None
        )
        if pready:
            out.pods_ready.append(g)
        if gready:
            out.ready.append(g)
        if state.restarting_since is not None:
            gphase = Phase.Restarting
            out.restarting.append(
                f"group {g} being replaced by the rollout"
                if state.restart_trigger == TRIGGER_ROLLOUT
                else f"group {g} restarting ({state.restart_trigger})"
            )
        elif isinstance(dec, Wait):
            gphase = Phase.Restarting
            out.restarting.append(
                f"group {g} waiting for restart backoff until {iso(dec.until)} ({dec.trigger})"
            )
        elif gready:
            gphase = Phase.Ready
        elif pready or running:
            gphase = Phase.Forming
        else:
            gphase = Phase.Provisioning
        entry = group_status(state, pods, n_pods, gready, gphase, ranks_per_pod)
        entry = entry.model_copy(
            update={
                "backoff_until": dec.until if isinstance(dec, Wait) else None,
                "serve_status": inp.rayservice.serve_groups.get(g),
                # The template hash the group's bookkeeping refers to (kept when not known now).
                "hash": inp.group_hashes.get(g) or (recorded[g].hash if g in recorded else None),
            }
        )
        gd: dict[str, Any] = entry.model_dump(mode="json", by_alias=True)
        out.entries.append(gd)
    return out


def _serving_conditions(inp: StatusInputs, gs: _Groups) -> list[Condition]:
    """RayServiceReady and GroupsFormed, once the children exist."""
    if not inp.children_created:
        return []
    rs, n_ready, n = inp.rayservice, len(gs.ready), inp.replicas
    if rs.ready:
        message = rs.message or "Ray Serve ready"
        serving = Condition.of(ConditionType.RayServiceReady, "True", "RayServiceReady", message)
    else:
        serving = Condition.of(
            ConditionType.RayServiceReady,
            "False",
            "RayServiceNotReady" if rs.exists else "RayServiceMissing",
            rs.message or ("RayService not ready" if rs.exists else "RayService not created"),
        )
    formed = Condition.of(
        ConditionType.GroupsFormed,
        "True" if n_ready == n else "False",
        "AllGroupsFormed" if n_ready == n else "GroupsNotFormed",
        f"{n_ready}/{n} groups formed; pods ready in {len(gs.pods_ready)}/{n} groups",
    )
    return [serving, formed]


def _phase(inp: StatusInputs, gs: _Groups) -> tuple[str, str]:
    """(phase, message), in the order of precedence the module docstring gives."""
    n_ready, n = len(gs.ready), inp.replicas
    if inp.failed_reason is not None:
        return Phase.Failed, inp.failed_reason
    if inp.blocking is not None:
        return Phase.Pending, inp.blocking
    if not inp.children_created:
        return Phase.Pending, "children not created yet"
    if gs.restarting:
        return Phase.Restarting, "; ".join(gs.restarting)
    if n_ready == n:
        return Phase.Ready, f"all {n} group(s) ready"
    if n_ready > 0:
        not_ready = ", ".join(str(g) for g in range(n) if g not in gs.ready)
        return Phase.Degraded, f"{n_ready}/{n} groups ready; not ready: group(s) {not_ready}"
    if len(gs.pods_ready) == n and n > 0:
        rs = inp.rayservice
        detail = f": {rs.message}" if rs.message else ""
        waiting = f"all pods running; waiting for Ray Serve (RayService not ready{detail})"
        return Phase.Forming, waiting
    if gs.all_running and n > 0:
        return Phase.Forming, "all pods running; waiting for pods to become Ready"
    want = sum(inp.shape(g)[0] for g in range(n))
    have = sum(1 for g in range(n) for p in live_pods(inp.pods.get(g, ())) if p.phase == "Running")
    return Phase.Provisioning, f"{have}/{want} worker pods running"


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """Drop unset fields, and pass the status through its model: what is written is exactly
    what the model (and so the CRD) declares, as plain JSON values."""
    typed = DeepSpeedInferenceStatus.model_validate({k: v for k, v in d.items() if v is not None})
    out: dict[str, Any] = typed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return out


#: Status keys owned by other writers (kopf's own progress storage) that the diff ignores.
IGNORED_KEYS = frozenset({"kopf"})
