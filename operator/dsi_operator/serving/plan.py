"""The pure heart of one reconcile pass: observed state in, actions and desired status out.

:func:`plan` ties :mod:`restart` (what to do with each group), :mod:`preflight` (what blocks)
and :mod:`status` (what to report) together. The handlers gather the inputs, call it, and carry
out the returned :class:`Plan` in a fixed order that makes a crash at any point safe:

1. write the status patch (it records every restart *before* any pod is deleted),
2. post the Events,
3. delete the pods of restarting groups.

An operator killed between 1 and 3 finds ``restartingSince``/``restartPods`` in status on its
next pass and the decision becomes :class:`~dsi_operator.serving.restart.ContinueRestart`: it
deletes the old pods that remain and never counts the restart twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from dsi_operator.api import labels as L
from dsi_operator.api.spec import (
    Condition,
    ConditionType,
    DeepSpeedInferenceSpec,
    GroupStatus,
    Phase,
    RestartPolicySpec,
    parse_spec,
)
from dsi_operator.serving.observe import HEAD_GROUP
from dsi_operator.serving.preflight import GPUNeeds, PreflightResult
from dsi_operator.serving.reform import Reform, advance_reform, find_reform
from dsi_operator.serving.render import GroupTemplate
from dsi_operator.serving.restart import (
    ContinueRestart,
    Decision,
    Fail,
    NoAction,
    NodeInfo,
    PodInfo,
    Restart,
    RestartDone,
    decide,
    group_pods_ready,
    live_pods,
)
from dsi_operator.serving.rollout import (
    REASON_COMPLETE,
    REASON_ROLLING,
    TRIGGER_ROLLOUT,
    GroupRollout,
    RolloutInputs,
    RolloutPlan,
    plan_rollout,
)
from dsi_operator.serving.status import (
    IGNORED_KEYS,
    RayServiceView,
    StatusInputs,
    advance_group,
    compute_status,
    group_states_from_status,
)
from dsi_operator.util.errors import describe_validation_error
from dsi_operator.util.patch import merge_patch

#: Seconds a restart waits for KubeRay's replacement pods before the operator nudges KubeRay.
#: KubeRay skips a worker group while its scale expectations are unsatisfied and waits for the
#: next event; when none comes, for its periodic requeue (RAYCLUSTER_DEFAULT_REQUEUE_SECONDS,
#: 300 s: the 303 s tail of bench_operator's failure samples). Expectations expire after 30 s,
#: so an annotation change on the RayCluster after that (its watch passes annotation changes)
#: gets the pods made.
NUDGE_AFTER_SECONDS = 35.0

EVENT_GROUP_RESTART = "GroupRestart"
EVENT_BUDGET = "RestartBudgetExhausted"
EVENT_BACKOFF = "GroupRestartBackoff"
EVENT_GROUP_REFORMED = "GroupReformed"
EVENT_INVALID = "InvalidSpec"
EVENT_PREFLIGHT = "Preflight"
EVENT_PHASE = "PhaseChanged"
EVENT_ROLLOUT = "GroupRollout"
EVENT_ROLLOUT_DONE = "RolloutComplete"

#: The conditions preflight reports; each change of one is also an Event.
PREFLIGHT_CONDITIONS = (
    ConditionType.GPUOperatorReady,
    ConditionType.GPUCapacity,
    ConditionType.KubeRayAvailable,
)


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the DSI."""

    type: str  # Normal | Warning
    reason: str
    message: str
    #: Names the incident when the Event must be posted exactly once even across operator
    #: restarts: the executor derives the Event's object name from it, so whichever process
    #: posts it first wins and the others get 409. None: a plain, best-effort Event.
    incident: str | None = None


@dataclass(frozen=True)
class RolloutState:
    """The hashes the rollout compares: what the RayService carries and what the spec wants."""

    carried: Mapping[int, GroupTemplate] = field(default_factory=dict)
    carried_head: str | None = None
    head_target: str = ""
    shape_target: str = ""
    spec_hash: str = ""

    def shape(self, g: int, spec: DeepSpeedInferenceSpec) -> tuple[int, int]:
        """(pods, ranks per pod) group g has now: its templates' in the RayService (a group a
        TP-size rollout has not reached yet keeps its old shape), else the spec's."""
        t = self.carried.get(g)
        if t is None or not t.tp or not t.ranks_per_pod:
            return spec.pods_per_group, spec.ranks_per_pod
        return max(t.tp // t.ranks_per_pod, 1), t.ranks_per_pod


@dataclass
class Observed:
    """Everything one pass looks at (plain data; the controller fills it).

    The spec arrives parsed: ``spec`` is the typed spec, or None with ``invalid`` naming the
    bad fields (then ``declared_replicas``/``declared_tp`` are what the raw spec said, for
    the status of a resource that cannot run).
    """

    name: str
    namespace: str
    generation: int | None
    spec: DeepSpeedInferenceSpec | None
    status: Mapping[str, Any]
    now: datetime
    pods: Mapping[int, Sequence[PodInfo]] = field(default_factory=dict)  # by group
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    preflight: PreflightResult | None = None
    children_created: bool = False
    rayservice: RayServiceView = field(default_factory=RayServiceView)
    desired_hashes: Mapping[int, str] | None = None
    invalid: str | None = None
    declared_replicas: int = 0
    declared_tp: int = 1
    #: Seconds a Failed pod of a restarting group is left to KubeRay, which deletes those
    #: itself (racing it stalls its replacement for minutes).
    kuberay_grace_seconds: float = 10.0
    head_pods: Sequence[PodInfo] = ()
    rollout: RolloutState = field(default_factory=RolloutState)


@dataclass(frozen=True)
class PodDeletion:
    """One pod the plan deletes: exactly this UID, forced (grace 0) or with ``grace``, and
    not before ``not_before`` (None: now)."""

    group: int
    name: str
    uid: str
    force: bool = False
    grace: int | None = None
    not_before: datetime | None = None


@dataclass
class Plan:
    """What the executor must do, in order: patch status, post events, delete pods."""

    status: dict[str, Any]
    patch: dict[str, Any] | None
    events: list[EventSpec] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    continues: list[ContinueRestart] = field(default_factory=list)
    #: In-place re-forms recorded by this pass (dsi_operator.serving.reform).
    reforms: list[Reform] = field(default_factory=list)
    decisions: dict[int, Decision] = field(default_factory=dict)
    blocked: bool = False  # do not create children
    deletions: list[PodDeletion] = field(default_factory=list)
    now: datetime | None = None
    rollout: RolloutPlan | None = None
    #: Set when a restart waits too long for KubeRay's new pods: the executor writes it to the
    #: RayCluster's ``deepspeed.ai/nudge`` annotation (once per value).
    nudge: str | None = None

    def due(self) -> list[PodDeletion]:
        """The deletions to carry out now."""
        return [
            d
            for d in self.deletions
            if d.not_before is None or self.now is None or d.not_before <= self.now
        ]

    @property
    def acts(self) -> bool:
        """True when the plan starts a restart or deletes pods now (the controller then
        re-reads the resource before acting)."""
        return bool(self.restarts) or bool(self.due())


def gpu_needs(spec: DeepSpeedInferenceSpec) -> GPUNeeds:
    """The GPU capacity question a parsed spec asks."""
    return GPUNeeds(
        tp=spec.tensor_parallel_size,
        gpus_per_rank=spec.resources.gpus,
        ranks_per_pod=spec.ranks_per_pod,
        resource_name=spec.gpu.resource_name,
        node_selector=dict(spec.gpu.node_selector),
        tolerations=[t.model_dump(by_alias=True, exclude_none=True) for t in spec.gpu.tolerations],
        require_gpu_operator=spec.gpu.require_gpu_operator,
        group_domain_key=(
            domain.topology_key
            if (domain := spec.placement.group_domain) is not None and domain.mode == "Required"
            else None
        ),
    )


def safe_parse(spec: Mapping[str, Any]) -> tuple[DeepSpeedInferenceSpec | None, str | None]:
    """(parsed spec, None) or (None, message naming the invalid fields)."""
    try:
        return parse_spec(spec), None
    except ValidationError as err:
        return None, describe_validation_error(err, prefix="spec.", limit=5)
    except (TypeError, ValueError) as err:  # defensive: never crash on a bad resource
        return None, str(err)


def plan(obs: Observed) -> Plan:
    """Decide one pass for one DSI (see the module docstring)."""
    if obs.spec is None:
        return _plan_invalid(obs)
    spec = obs.spec
    policy = spec.restart_policy
    current = dict(obs.status or {})
    states, failed_reason = _prior_states(current, obs.generation)
    pre = obs.preflight
    blocking = pre.blocking if pre is not None else None
    gp = _plan_groups(obs, policy, states, failed_reason, blocking)
    ro = _plan_rollout(obs, gp, blocking)

    inputs = StatusInputs(
        name=obs.name,
        namespace=obs.namespace,
        generation=obs.generation,
        replicas=spec.replicas,
        tp=spec.tensor_parallel_size,
        ranks_per_pod=spec.ranks_per_pod,
        current=current,
        now=obs.now,
        endpoint=L.endpoint_url(obs.name, obs.namespace, spec.serve.port),
        selector=L.selector_for(obs.name),
        groups=gp.states,
        pods=obs.pods,
        decisions=gp.decisions,
        preflight=pre.conditions if pre is not None else (),
        blocking=blocking,
        children_created=obs.children_created,
        rayservice=obs.rayservice,
        failed_reason=gp.failed_reason,
        warnings=pre.warnings if pre is not None else (),
        new_restarts=sum(1 for r in gp.restarts if r.counted),
        group_hashes=obs.desired_hashes or {},
        rollout=rollout_status(obs, ro, gp.states) if ro is not None else None,
        rollout_condition=rollout_condition(ro) if ro is not None else None,
        group_shapes={
            g: shape
            for g in range(spec.replicas)
            if (shape := obs.rollout.shape(g, spec)) != (spec.pods_per_group, spec.ranks_per_pod)
        },
    )
    desired = compute_status(inputs)
    events = gp.events + _phase_events(current, desired) + _preflight_events(current, desired)
    events += _rollout_events(current, desired)
    grace = spec.restart_policy.pod_deletion_grace_seconds
    deletions = plan_deletions(obs, gp.restarts, gp.continues, desired, grace)
    if ro is not None:
        heads = {p.uid: p for p in obs.head_pods}
        deletions += [PodDeletion(HEAD_GROUP, heads[u].name, u, grace=grace) for u in ro.head_pods]
    return Plan(
        status=desired,
        patch=merge_patch(current, desired, ignore=IGNORED_KEYS),
        events=events,
        restarts=gp.restarts,
        continues=gp.continues,
        reforms=gp.reforms,
        decisions=gp.decisions,
        blocked=blocking is not None,
        deletions=deletions,
        now=obs.now,
        rollout=ro,
        nudge=kuberay_nudge(obs, gp.states),
    )


def kuberay_nudge(obs: Observed, states: Mapping[int, GroupStatus]) -> str | None:
    """A token naming a restart that has waited :data:`NUDGE_AFTER_SECONDS` (or another
    multiple of it) for KubeRay to create the group's replacement pods; None when none has."""
    if obs.spec is None:
        return None
    for g, st in sorted(states.items()):
        if st.restarting_since is None:
            continue
        waited = (obs.now - st.restarting_since).total_seconds()
        new = {p.rank for p in live_pods(obs.pods.get(g, ())) if p.uid not in st.restart_pods}
        n_pods = obs.rollout.shape(g, obs.spec)[0]
        if waited >= NUDGE_AFTER_SECONDS and not new >= set(range(n_pods)):
            return (
                f"g{g}-{st.restarting_since.timestamp():.0f}-{int(waited // NUDGE_AFTER_SECONDS)}"
            )
    return None


def _plan_rollout(obs: Observed, gp: _GroupsPlan, blocking: str | None) -> RolloutPlan | None:
    """The rollout's decision, its rolls added to the groups' plan as uncounted restarts."""
    spec = obs.spec
    if spec is None or not obs.children_created or blocking or gp.failed_reason is not None:
        return None
    if not obs.rollout.spec_hash:
        return None  # the caller observed no rollout state (plain planning, e.g. a dry run)
    ro = plan_rollout(rollout_inputs(obs, gp.decisions, gp.states))
    for g in ro.rolls:
        pods = obs.pods.get(g, ())
        message = f"replacing group {g} with spec {obs.rollout.spec_hash}: {ro.message}"
        roll = Restart(g, TRIGGER_ROLLOUT, "", message, tuple(sorted(p.uid for p in pods)), False)
        gp.decisions[g] = roll
        gp.restarts.append(roll)
        gp.states[g] = advance_group(
            gp.states[g], roll, pods, obs.rollout.shape(g, spec)[0], spec.restart_policy, obs.now
        )
        gp.events.append(EventSpec("Normal", EVENT_ROLLOUT, message))
    return ro


def rollout_inputs(
    obs: Observed, decisions: Mapping[int, Decision], states: Mapping[int, GroupStatus]
) -> RolloutInputs:
    """The rollout's view of every group (after this pass's restart decisions)."""
    assert obs.spec is not None
    spec, rs = obs.spec, obs.rollout
    groups = []
    for g in range(spec.replicas):
        pods = obs.pods.get(g, ())
        state = states.get(g, GroupStatus(index=g))
        busy = not isinstance(decisions.get(g, NoAction()), NoAction) or (
            state.restarting_since is not None
        )
        target = (obs.desired_hashes or {}).get(g, "")
        carried = rs.carried.get(g)
        # The group's own signals: every rank formed (pod readiness) and its Serve deployment
        # healthy where reported. Not the RayService's Ready, which is one bit for all groups.
        ready = (
            not busy
            and group_pods_ready(pods, rs.shape(g, spec)[0])
            and obs.rayservice.group_serving(g)
        )
        groups.append(
            GroupRollout(
                index=g,
                target=target,
                template=carried.hash if carried else None,
                shape_ok=carried is None or carried.shape in ("", rs.shape_target),
                pods_at_target=all(p.group_hash == target for p in live_pods(pods)),
                ready=ready,
                busy=busy,
            )
        )
    stale_head = tuple(
        p.uid
        for p in live_pods(obs.head_pods)
        if p.group_hash and rs.head_target and p.group_hash != rs.head_target
    )
    return RolloutInputs(
        groups=groups,
        head_target=rs.head_target,
        head_template=rs.carried_head,
        stale_head_pods=stale_head,
        max_unavailable=spec.rollout.max_unavailable,
        paused=spec.rollout.paused,
    )


def rollout_status(
    obs: Observed, ro: RolloutPlan, states: Mapping[int, GroupStatus]
) -> dict[str, Any]:
    """``status.rollout``."""
    assert obs.spec is not None
    updating = sorted(g for g, st in states.items() if st.restart_trigger == TRIGGER_ROLLOUT)
    out: dict[str, Any] = {
        "targetHash": obs.rollout.spec_hash or None,
        "updatedGroups": ro.updated,
        "readyUpdatedGroups": ro.ready_updated,
        "updated": f"{ro.ready_updated}/{obs.spec.replicas}",
        "headUpdated": ro.head_at_target and not ro.head_pods,
    }
    if updating:
        out["updating"] = updating
    return {k: v for k, v in out.items() if v is not None}


def rollout_condition(ro: RolloutPlan) -> Condition:
    """``Progressing``: True while groups are being replaced, False once complete or paused."""
    status = "True" if ro.reason == REASON_ROLLING else "False"
    return Condition.of(ConditionType.Progressing, status, ro.reason, ro.message)


def rollout_targets(obs: Observed, p: Plan) -> tuple[frozenset[int], bool]:
    """(groups rendered at the spec, head rendered at the spec) for the RayService: the plan's
    rollout, or without one (nothing created yet) every group the RayService does not carry
    at another template."""
    if p.rollout is not None:
        return p.rollout.target_groups, p.rollout.head_at_target
    assert obs.spec is not None
    rs, want = obs.rollout, obs.desired_hashes or {}
    groups = frozenset(
        g for g in range(obs.spec.replicas) if rs.carried.get(g, (None,))[0] in (None, want.get(g))
    )
    return groups, rs.carried_head in (None, rs.head_target)


def rollout_sync_needed(obs: Observed, p: Plan) -> bool:
    """Whether the RayService must be rendered again for the rollout's decision."""
    if p.rollout is None or obs.spec is None:
        return False
    rs, want = obs.rollout, obs.desired_hashes or {}
    groups, head = rollout_targets(obs, p)
    for g in groups:
        carried = rs.carried.get(g, (None,))[0]
        if carried is not None and carried != want.get(g):
            return True
    return head and rs.carried_head not in (None, rs.head_target)


def _rollout_events(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[EventSpec]:
    """RolloutComplete when Progressing turns from RollingUpdate to RolloutComplete."""

    def reason(status: Mapping[str, Any]) -> str | None:
        for c in status.get("conditions") or []:
            if isinstance(c, Mapping) and c.get("type") == ConditionType.Progressing:
                return str(c.get("reason"))
        return None

    if reason(current) == REASON_ROLLING and reason(desired) == REASON_COMPLETE:
        msg = next(
            str(c.get("message"))
            for c in desired.get("conditions") or []
            if c.get("type") == ConditionType.Progressing
        )
        return [EventSpec("Normal", EVENT_ROLLOUT_DONE, msg)]
    return []


def waits_on_clock(obs: Observed, p: Plan) -> bool:
    """Whether a later pass may decide differently with time alone (no watch event): a
    restart, backoff or deferred deletion under way, or a grace period or the formation
    deadline running (the clocks of :mod:`.restart`). Only such resources need the ticker;
    any other waits for events, whatever its phase.
    """
    if obs.spec is None:
        return False  # only a spec change (an event) helps an invalid spec
    # A restart in progress always decides ContinueRestart or RestartDone, so it is here too.
    if p.deletions or any(not isinstance(d, NoAction) for d in p.decisions.values()):
        return True
    if p.status.get("phase") == Phase.Failed or p.blocked or not obs.children_created:
        return False  # nothing is decided until the spec, the cluster or the children change
    groups = group_states_from_status(p.status).values()
    if len(groups) < obs.spec.replicas or any(not g.members and g.forming_since for g in groups):
        # The formation deadline runs. It starts once all of a group's pods run: a group
        # whose pods are still Pending (no room, pulling images) waits for pod events.
        return True
    nodes = {pod.node_name for pods in obs.pods.values() for pod in pods}
    return any(
        pod.deletion_timestamp is not None for pods in obs.pods.values() for pod in pods
    ) or any(n not in obs.nodes or not obs.nodes[n].ready for n in nodes if n is not None)


def _plan_invalid(obs: Observed) -> Plan:
    """A spec that does not validate: report it (Failed, naming the fields), create nothing."""
    current = dict(obs.status or {})
    desired = compute_status(
        StatusInputs(
            name=obs.name,
            namespace=obs.namespace,
            generation=obs.generation,
            replicas=obs.declared_replicas,
            tp=obs.declared_tp,
            current=current,
            now=obs.now,
            invalid_spec=obs.invalid or "invalid spec",
        )
    )
    patch = merge_patch(current, desired, ignore=IGNORED_KEYS)
    bad: list[EventSpec] = []
    if patch is not None and current.get("message") != desired.get("message"):
        bad.append(EventSpec("Warning", EVENT_INVALID, desired["message"]))
    return Plan(status=desired, patch=patch, events=bad, blocked=True, now=obs.now)


def declared_shape(raw: Mapping[str, Any]) -> tuple[int, int]:
    """(replicas, tp) as a raw, possibly invalid, spec states them (0 and 1 when unusable)."""
    replicas, tp = raw.get("replicas", 1), raw.get("tensorParallelSize", 1)
    return (
        replicas if isinstance(replicas, int) else 0,
        tp if isinstance(tp, int) else 1,
    )


def _prior_states(
    current: Mapping[str, Any], generation: int | None
) -> tuple[dict[int, GroupStatus], str | None]:
    """Group bookkeeping from status, and the Failed reason that still holds.

    Failed is sticky for the generation it happened in; a spec change clears it and the
    restart history that exhausted the budget.
    """
    states = group_states_from_status(current)
    if not current.get("failedReason"):
        return states, None
    if current.get("observedGeneration") == generation:
        return states, str(current["failedReason"])
    return {g: s.model_copy(update={"restart_times": ()}) for g, s in states.items()}, None


@dataclass
class _GroupsPlan:
    decisions: dict[int, Decision] = field(default_factory=dict)
    restarts: list[Restart] = field(default_factory=list)
    continues: list[ContinueRestart] = field(default_factory=list)
    reforms: list[Reform] = field(default_factory=list)
    states: dict[int, GroupStatus] = field(default_factory=dict)
    events: list[EventSpec] = field(default_factory=list)
    failed_reason: str | None = None


def _plan_groups(
    obs: Observed,
    policy: RestartPolicySpec,
    states: Mapping[int, GroupStatus],
    failed_reason: str | None,
    blocking: str | None,
) -> _GroupsPlan:
    """The decision for every group, and each group's bookkeeping after it."""
    assert obs.spec is not None
    out = _GroupsPlan(failed_reason=failed_reason)
    head = _the_head(obs.head_pods)
    for g in range(obs.spec.replicas):
        n_pods = obs.rollout.shape(g, obs.spec)[0]
        state = _follow_cluster_switch(
            states.get(g, GroupStatus(index=g)), obs.pods.get(g, ()), obs
        )
        pods = obs.pods.get(g, ())
        dec: Decision = NoAction()
        halted = out.failed_reason is not None or blocking is not None
        if (not halted and obs.children_created) or state.restarting_since is not None:
            # A restart already under way is finished even when newly blocked or failed.
            dec = decide(pods, obs.nodes, state, policy, n_pods, obs.now)
        if isinstance(dec, Fail):
            out.failed_reason = dec.reason
            out.events.append(EventSpec("Warning", EVENT_BUDGET, dec.reason))
            dec = NoAction()
        out.decisions[g] = dec
        if isinstance(dec, Restart):
            out.restarts.append(dec)
        elif isinstance(dec, ContinueRestart):
            out.continues.append(dec)
        out.states[g] = advance_group(state, dec, pods, n_pods, policy, obs.now)
        _track_reform(out, g, dec, pods, n_pods, policy, obs.now, head)
        if isinstance(dec, Restart):
            out.events.append(restart_event(out.states[g]))
        elif isinstance(dec, ContinueRestart | RestartDone) and (
            state.restart_trigger != TRIGGER_ROLLOUT
        ):
            # Planned again on every pass of a restart in progress: a process killed between
            # the status write and the Event leaves it to the next one (409 once posted).
            out.events.append(restart_event(state))

    # A failure in one group makes the resource Failed; stop restarting the others too.
    if out.failed_reason is not None and out.restarts:
        cancelled = {restart_event(out.states[r.group]).incident for r in out.restarts}
        for r in out.restarts:
            out.decisions[r.group] = NoAction()
            out.states[r.group] = states.get(r.group, GroupStatus(index=r.group))
        out.events = [e for e in out.events if e.incident not in cancelled]
        out.restarts = []
    return out


def _track_reform(
    out: _GroupsPlan,
    g: int,
    dec: Decision,
    pods: Sequence[PodInfo],
    n_pods: int,
    policy: RestartPolicySpec,
    now: datetime,
    head: PodInfo | None,
) -> None:
    """Count an in-place re-form of group ``g`` that began (only when nothing at the pod level
    is wrong), and plan its Event on every pass until the group is whole again."""
    state = out.states[g]
    reform = find_reform(state, pods, now, head) if isinstance(dec, NoAction) else None
    out.states[g] = state = advance_reform(state, reform, dec, pods, n_pods, policy, now)
    if reform is not None:
        out.reforms.append(reform)
    if state.reforming_since is not None:
        out.events.append(reform_event(state))


def _the_head(heads: Sequence[PodInfo]) -> PodInfo | None:
    """The one head pod, when there is exactly one and it is not being deleted."""
    live = live_pods(heads)
    return live[0] if len(live) == len(heads) == 1 else None


def reform_event(state: GroupStatus) -> EventSpec:
    """The GroupReformed Event of the group's latest in-place re-form (from status alone)."""
    g, n = state.index, state.reforms
    return EventSpec(
        "Warning",
        EVENT_GROUP_REFORMED,
        f"group {g} re-forming in place (re-form {n}): {state.last_reform_reason or 'unknown'}",
        incident=f"g{g}-reform-{n}",
    )


def restart_event(state: GroupStatus) -> EventSpec:
    """The GroupRestart Event of the group's latest recorded restart (built from status
    bookkeeping alone, so any process can post it and it reads the same)."""
    g, n = state.index, state.restarts
    return EventSpec(
        "Warning",
        EVENT_GROUP_RESTART,
        f"restarting group {g} (restart {n}): {state.last_restart_reason or 'unknown trigger'}",
        incident=f"g{g}-restart-{n}",
    )


def _follow_cluster_switch(
    state: GroupStatus, pods: Sequence[PodInfo], obs: Observed
) -> GroupStatus:
    """KubeRay switched the group to a new RayCluster (blue/green upgrade after a spec
    change): the old members going away is a roll, not a failure. Form afresh."""
    clusters = {p.cluster for p in pods if p.deletion_timestamp is None and p.cluster}
    if state.members and state.ray_cluster and clusters and state.ray_cluster not in clusters:
        return state.model_copy(
            update={
                "members": (),
                "forming_pods": (),
                "formed_at": None,
                "forming_since": obs.now,
                "ray_cluster": None,
            }
        )
    return state


def plan_deletions(
    obs: Observed,
    restarts: Sequence[Restart],
    continues: Sequence[ContinueRestart],
    desired: Mapping[str, Any],
    grace: int | None,
) -> list[PodDeletion]:
    """Every pod deletion the restarts in progress need: which, forced or not, and when.

    * a pod on a NotReady or vanished node is force-deleted: its kubelet never confirms;
    * a pod already Terminating is left to its kubelet (``ContinueRestart.force`` lists the
      ones stuck past the grace period: those are forced);
    * a Failed/Succeeded pod is left to KubeRay, which deletes those itself at once, for
      ``kuberay_grace_seconds`` after the restart started; racing it for the same pod leaves
      its scale expectations unsatisfied and stalls the replacement for minutes.
    """
    by_uid = {p.uid: (g, p) for g, pods in obs.pods.items() for p in pods}
    started = {g: s.restarting_since for g, s in group_states_from_status(desired).items()}
    out: list[PodDeletion] = []

    def on_dead_node(pod: PodInfo) -> bool:
        node = obs.nodes.get(pod.node_name or "")
        return pod.node_name is not None and (node is None or not node.ready)

    def regular(uid: str) -> None:
        if uid not in by_uid:
            return
        g, pod = by_uid[uid]
        dead = on_dead_node(pod)
        if pod.deletion_timestamp is not None and not dead:
            return
        not_before = None
        if pod.phase in ("Failed", "Succeeded") and not dead:
            since = started.get(g) or obs.now
            not_before = since + timedelta(seconds=obs.kuberay_grace_seconds)
        out.append(PodDeletion(g, pod.name, uid, dead, None if dead else grace, not_before))

    for r in restarts:
        for uid in r.pods:
            regular(uid)
    for c in continues:
        for uid in c.delete:
            regular(uid)
        for uid in c.force:
            if uid in by_uid:
                g, pod = by_uid[uid]
                out.append(PodDeletion(g, pod.name, uid, force=True))
    return out


def _phase_events(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[EventSpec]:
    if current.get("phase") == desired.get("phase") or desired.get("phase") is None:
        return []
    etype = "Warning" if desired["phase"] in (Phase.Failed, Phase.Degraded) else "Normal"
    message = f"phase {desired['phase']}: {desired.get('message', '')}"
    return [EventSpec(etype, EVENT_PHASE, message)]


def _preflight_events(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[EventSpec]:
    """An Event each time a preflight condition appears or flips."""
    prev = {
        c.get("type"): c.get("status")
        for c in current.get("conditions") or []
        if isinstance(c, Mapping)
    }
    out = []
    for c in desired.get("conditions") or []:
        if c["type"] not in PREFLIGHT_CONDITIONS:
            continue
        if prev.get(c["type"]) != c["status"]:
            out.append(
                EventSpec(
                    "Normal" if c["status"] == "True" else "Warning",
                    EVENT_PREFLIGHT,
                    f"{c['type']}={c['status']} ({c['reason']}): {c['message']}",
                )
            )
    return out
