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

The controller never writes status when :func:`status_patch` returns ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from dsi_operator.api.spec import (
    Condition,
    ConditionType,
    DeepSpeedInferenceStatus,
    Phase,
    RestartPolicySpec,
)
from dsi_operator.serving.restart import (
    Decision,
    Fail,
    GroupState,
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

# The vocabulary is the status model's (spec.Phase, spec.ConditionType); short names here.
PHASE_PENDING = Phase.Pending
PHASE_PROVISIONING = Phase.Provisioning
PHASE_FORMING = Phase.Forming
PHASE_READY = Phase.Ready
PHASE_DEGRADED = Phase.Degraded
PHASE_RESTARTING = Phase.Restarting
PHASE_FAILED = Phase.Failed

COND_GPU_OPERATOR = ConditionType.GPUOperatorReady
COND_GPU_CAPACITY = ConditionType.GPUCapacity
COND_KUBERAY = ConditionType.KubeRayAvailable
COND_RAYSERVICE = ConditionType.RayServiceReady
COND_GROUPS_FORMED = ConditionType.GroupsFormed
CONDITION_ORDER = (
    COND_KUBERAY,
    COND_GPU_OPERATOR,
    COND_GPU_CAPACITY,
    COND_RAYSERVICE,
    COND_GROUPS_FORMED,
)


# --- time helpers ------------------------------------------------------------------------------


def iso(t: datetime | None) -> str | None:
    """RFC 3339 with second precision and a Z, as Kubernetes writes times."""
    if t is None:
        return None
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def iso_precise(t: datetime | None) -> str | None:
    """RFC 3339 with microseconds: bookkeeping times where a second matters (backoff)."""
    if t is None:
        return None
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> datetime | None:
    """Parse an RFC 3339 string (or pass a datetime through); ``None`` on anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# --- group bookkeeping <-> status dicts --------------------------------------------------------


def group_state_from_status(index: int, raw: Mapping[str, Any] | None) -> GroupState:
    """Read one ``status.groups[]`` entry (tolerating missing or malformed fields)."""
    raw = raw or {}

    def _times(v: Any) -> tuple[datetime, ...]:
        out = [parse_time(x) for x in (v or [])] if isinstance(v, list) else []
        return tuple(t for t in out if t is not None)

    def _strs(v: Any) -> tuple[str, ...]:
        return tuple(str(x) for x in v) if isinstance(v, list) else ()

    restarts = raw.get("restarts", 0)
    return GroupState(
        index=index,
        restarts=restarts if isinstance(restarts, int) else 0,
        restart_times=_times(raw.get("restartTimes")),
        last_restart_time=parse_time(raw.get("lastRestartTime")),
        last_restart_reason=raw.get("lastRestartReason"),
        restarting_since=parse_time(raw.get("restartingSince")),
        restart_trigger=raw.get("restartTrigger"),
        restart_pods=_strs(raw.get("restartPods")),
        members=_strs(raw.get("members")),
        forming_pods=_strs(raw.get("formingPods")),
        formed_at=parse_time(raw.get("formedAt")),
        forming_since=parse_time(raw.get("formingSince")),
        abandoned=_strs(raw.get("abandonedPods")),
        cluster=raw.get("rayCluster") or None,
        reforms=reforms if isinstance(reforms := raw.get("reforms", 0), int) else 0,
        reform_times=_times(raw.get("reformTimes")),
        last_reform_time=parse_time(raw.get("lastReformTime")),
        last_reform_reason=raw.get("lastReformReason"),
        reforming_since=parse_time(raw.get("reformingSince")),
    )


def group_states_from_status(status: Mapping[str, Any] | None) -> dict[int, GroupState]:
    """All groups recorded in a DSI status, by index."""
    out: dict[int, GroupState] = {}
    for raw in (status or {}).get("groups") or []:
        if isinstance(raw, Mapping) and isinstance(raw.get("index"), int):
            out[raw["index"]] = group_state_from_status(raw["index"], raw)
    return out


# --- applying decisions to bookkeeping ---------------------------------------------------------


def advance_group(
    state: GroupState,
    decision: Decision,
    pods: Sequence[PodInfo],
    n_pods: int,
    policy: RestartPolicySpec,
    now: datetime,
) -> GroupState:
    """The group's bookkeeping after ``decision`` (and after observing ``pods``).

    * Restart: marked in progress with the UIDs to replace, membership cleared; counted
      unless it is a rollout's.
    * RestartDone: in-progress marker cleared; the formation clock waits for the new pods.
    * otherwise: record membership when the group's pods become ready; start the formation
      clock once every pod of the group is Running (scheduled, containers started).
    """
    if isinstance(decision, Restart):
        replacing = replace(
            state,
            restarting_since=now,
            restart_trigger=decision.trigger,
            restart_pods=decision.pods,
            members=(),
            forming_pods=(),
            formed_at=None,
            forming_since=None,
        )
        if not decision.counted:  # a rollout replacing the group: no budget, no history
            return replacing
        return replace(
            replacing,
            restarts=state.restarts + 1,
            restart_times=tuple(recent_restarts(state, policy, now)) + (now,),
            last_restart_time=now,
            last_restart_reason=f"{decision.trigger}: {decision.reason}",
        )
    if isinstance(decision, RestartDone):
        present = {p.uid for p in pods}
        state = replace(
            state,
            abandoned=tuple(u for u in state.restart_pods if u in present),
            restarting_since=None,
            restart_trigger=None,
            restart_pods=(),
            members=(),
            forming_pods=(),
            formed_at=None,
            forming_since=None,
        )
    if state.restarting_since is not None:
        return state
    if state.abandoned:
        present = {p.uid for p in pods}
        state = replace(state, abandoned=tuple(u for u in state.abandoned if u in present))
    # Trim restart times that left the window so the status does not grow without bound; a
    # write happens only if something else changed too (see compute_status / status_patch).
    if not state.members and group_pods_ready(pods, n_pods) and not isinstance(decision, Fail):
        clusters = {p.cluster for p in live_pods(pods)}
        return replace(
            state,
            # group_pods_ready: exactly one live pod per index, so this is every index.
            members=pods_by_index(pods, n_pods),
            forming_pods=(),
            formed_at=now,
            forming_since=None,
            cluster=clusters.pop() if len(clusters) == 1 else None,
        )
    if not state.members and not state.forming_pods and (started := pods_by_index(pods, n_pods)):
        # In the same write as a restart's end: a new pod lost before the group forms is seen.
        state = replace(state, forming_pods=started)
    if not state.members and state.forming_since is None and group_pods_started(pods, n_pods):
        # The formation clock starts only once every pod is scheduled and its containers
        # started: image pulls, Kueue admission and a full cluster must not use it up.
        return replace(state, forming_since=now)
    return state


def group_status_dict(
    state: GroupState,
    pods: Sequence[PodInfo],
    n_pods: int,
    ready: bool,
    phase: str,
    ranks_per_pod: int = 1,
) -> dict[str, Any]:
    """One ``status.groups[]`` entry; optional fields are left out when empty."""
    ready_pods = len(
        {p.rank for p in live_pods(pods) if p.phase == "Running" and p.ready and p.rank < n_pods}
    )
    d: dict[str, Any] = {
        "index": state.index,
        "phase": phase,
        "ranks": n_pods * ranks_per_pod,
        "readyRanks": ready_pods * ranks_per_pod,
        "pods": n_pods,
        "readyPods": ready_pods,
        "ready": ready,
        "restarts": state.restarts,
        "reforms": state.reforms,
    }
    optional: dict[str, Any] = {
        "lastRestartReason": state.last_restart_reason,
        "lastRestartTime": iso(state.last_restart_time),
        "restartTimes": [iso_precise(t) for t in state.restart_times] or None,
        "restartingSince": iso_precise(state.restarting_since),
        "restartTrigger": state.restart_trigger,
        "restartPods": list(state.restart_pods) or None,
        "members": list(state.members) or None,
        "formingPods": list(state.forming_pods) or None,
        "formedAt": iso(state.formed_at),
        "formingSince": iso_precise(state.forming_since),
        "abandonedPods": list(state.abandoned) or None,
        "rayCluster": state.cluster,
        "lastReformReason": state.last_reform_reason,
        "lastReformTime": iso(state.last_reform_time),
        "reformTimes": [iso_precise(t) for t in state.reform_times] or None,
        "reformingSince": iso_precise(state.reforming_since),
    }
    d.update({k: v for k, v in optional.items() if v is not None})
    return d


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
    groups: Mapping[int, GroupState] = field(default_factory=dict)
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
    """The desired ``status`` of a DSI (a plain dict; compare with :func:`status_patch`)."""
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
            phase=PHASE_FAILED,
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
    if inp.warnings and phase != PHASE_FAILED:
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
    for g in range(inp.replicas):
        state = inp.groups.get(g, GroupState(index=g))
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
            gphase = PHASE_RESTARTING
            out.restarting.append(
                f"group {g} being replaced by the rollout"
                if state.restart_trigger == TRIGGER_ROLLOUT
                else f"group {g} restarting ({state.restart_trigger})"
            )
        elif isinstance(dec, Wait):
            gphase = PHASE_RESTARTING
            out.restarting.append(
                f"group {g} waiting for restart backoff until {iso(dec.until)} ({dec.trigger})"
            )
        elif gready:
            gphase = PHASE_READY
        elif pready or running:
            gphase = PHASE_FORMING
        else:
            gphase = PHASE_PROVISIONING
        gd = group_status_dict(state, pods, n_pods, gready, gphase, ranks_per_pod)
        if isinstance(dec, Wait):
            gd["backoffUntil"] = iso(dec.until)
        if g in inp.rayservice.serve_groups:
            gd["serveStatus"] = inp.rayservice.serve_groups[g]
        # The template hash the group's bookkeeping refers to (kept when not known now).
        h = inp.group_hashes.get(g) or _recorded_hash(inp.current, g)
        if h:
            gd["hash"] = h
        out.entries.append(gd)
    return out


def _recorded_hash(status: Mapping[str, Any] | None, g: int) -> str | None:
    for gd in (status or {}).get("groups") or []:
        if isinstance(gd, Mapping) and gd.get("index") == g:
            h = gd.get("hash")
            return str(h) if h else None
    return None


def _serving_conditions(inp: StatusInputs, gs: _Groups) -> list[Condition]:
    """RayServiceReady and GroupsFormed, once the children exist."""
    if not inp.children_created:
        return []
    rs, n_ready, n = inp.rayservice, len(gs.ready), inp.replicas
    if rs.ready:
        message = rs.message or "Ray Serve ready"
        serving = Condition.of(COND_RAYSERVICE, "True", "RayServiceReady", message)
    else:
        serving = Condition.of(
            COND_RAYSERVICE,
            "False",
            "RayServiceNotReady" if rs.exists else "RayServiceMissing",
            rs.message or ("RayService not ready" if rs.exists else "RayService not created"),
        )
    formed = Condition.of(
        COND_GROUPS_FORMED,
        "True" if n_ready == n else "False",
        "AllGroupsFormed" if n_ready == n else "GroupsNotFormed",
        f"{n_ready}/{n} groups formed; pods ready in {len(gs.pods_ready)}/{n} groups",
    )
    return [serving, formed]


def _phase(inp: StatusInputs, gs: _Groups) -> tuple[str, str]:
    """(phase, message), in the order of precedence the module docstring gives."""
    n_ready, n = len(gs.ready), inp.replicas
    if inp.failed_reason is not None:
        return PHASE_FAILED, inp.failed_reason
    if inp.blocking is not None:
        return PHASE_PENDING, inp.blocking
    if not inp.children_created:
        return PHASE_PENDING, "children not created yet"
    if gs.restarting:
        return PHASE_RESTARTING, "; ".join(gs.restarting)
    if n_ready == n:
        return PHASE_READY, f"all {n} group(s) ready"
    if n_ready > 0:
        not_ready = ", ".join(str(g) for g in range(n) if g not in gs.ready)
        return PHASE_DEGRADED, f"{n_ready}/{n} groups ready; not ready: group(s) {not_ready}"
    if len(gs.pods_ready) == n and n > 0:
        rs = inp.rayservice
        detail = f": {rs.message}" if rs.message else ""
        waiting = f"all pods running; waiting for Ray Serve (RayService not ready{detail})"
        return PHASE_FORMING, waiting
    if gs.all_running and n > 0:
        return PHASE_FORMING, "all pods running; waiting for pods to become Ready"
    want = sum(inp.shape(g)[0] for g in range(n))
    have = sum(1 for g in range(n) for p in live_pods(inp.pods.get(g, ())) if p.phase == "Running")
    return PHASE_PROVISIONING, f"{have}/{want} worker pods running"


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """Drop unset fields, and pass the status through its model: what is written is exactly
    what the model (and so the CRD) declares, as plain JSON values."""
    typed = DeepSpeedInferenceStatus.model_validate({k: v for k, v in d.items() if v is not None})
    out: dict[str, Any] = typed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return out


#: Status keys owned by other writers (kopf's own progress storage) that the diff ignores.
IGNORED_KEYS = frozenset({"kopf"})


def status_patch(
    current: Mapping[str, Any] | None, desired: Mapping[str, Any]
) -> dict[str, Any] | None:
    """A JSON merge patch for ``status`` turning ``current`` into ``desired``; None if equal.

    Lists are replaced whole (merge-patch semantics); keys that disappear are set to null.
    """
    current = {k: v for k, v in (current or {}).items() if k not in IGNORED_KEYS}
    if dict(current) == dict(desired):
        return None
    patch: dict[str, Any] = {k: v for k, v in desired.items() if current.get(k) != v}
    for k in current:
        if k not in desired:
            patch[k] = None
    return patch or None
