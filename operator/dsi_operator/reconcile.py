"""The pure heart of one reconcile pass: observed state in, actions and desired status out.

:func:`plan` ties :mod:`restart` (what to do with each group), :mod:`preflight` (what blocks)
and :mod:`status` (what to report) together. The handlers gather the inputs, call it, and carry
out the returned :class:`Plan` in a fixed order that makes a crash at any point safe:

1. write the status patch (it records every restart *before* any pod is deleted),
2. post the Events,
3. delete the pods of restarting groups.

An operator killed between 1 and 3 finds ``restartingSince``/``restartPods`` in status on its
next pass and the decision becomes :class:`~dsi_operator.restart.ContinueRestart`: it deletes
the old pods that remain and never counts the restart twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from . import labels as L
from .preflight import GPUNeeds, PreflightResult
from .restart import (
    ContinueRestart,
    Decision,
    Fail,
    GroupState,
    NoAction,
    NodeInfo,
    PodInfo,
    Restart,
    RestartPolicy,
    decide,
)
from .spec import DeepSpeedInferenceSpec, parse_spec
from .status import (
    RayServiceView,
    StatusInputs,
    advance_group,
    compute_status,
    group_states_from_status,
    status_patch,
)

EVENT_GROUP_RESTART = "GroupRestart"
EVENT_BUDGET = "RestartBudgetExhausted"
EVENT_BACKOFF = "GroupRestartBackoff"
EVENT_INVALID = "InvalidSpec"
EVENT_PREFLIGHT = "Preflight"
EVENT_PHASE = "PhaseChanged"


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the DSI."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Observed:
    """Everything one pass looks at (plain data; the handlers fill it)."""

    name: str
    namespace: str
    generation: int | None
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    now: datetime
    pods: Mapping[int, Sequence[PodInfo]] = field(default_factory=dict)  # by group
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    preflight: PreflightResult | None = None
    children_created: bool = False
    rayservice: RayServiceView = field(default_factory=RayServiceView)
    desired_hashes: Mapping[int, str] | None = None
    parsed: DeepSpeedInferenceSpec | None = None  # the spec already parsed (saves a parse)


@dataclass
class Plan:
    """What the handlers must do, in order: patch status, post events, delete pods."""

    status: dict[str, Any]
    patch: dict[str, Any] | None
    events: list[EventSpec] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    continues: list[ContinueRestart] = field(default_factory=list)
    decisions: dict[int, Decision] = field(default_factory=dict)
    blocked: bool = False  # do not create children

    @property
    def acts(self) -> bool:
        """True when the plan deletes pods (the handlers then re-read before acting)."""
        return bool(self.restarts) or any(c.delete or c.force for c in self.continues)


def policy_from_spec(spec: DeepSpeedInferenceSpec) -> RestartPolicy:
    """The restart policy of a parsed spec."""
    rp = spec.restart_policy
    return RestartPolicy(
        max_restarts=rp.max_restarts,
        window_seconds=float(rp.window_seconds),
        backoff_seconds=float(rp.backoff.initial_seconds),
        max_backoff_seconds=float(rp.backoff.max_seconds),
        multiplier=float(rp.backoff.multiplier),
        quiet_period_seconds=float(rp.quiet_period_seconds),
        terminating_grace_seconds=float(rp.terminating_grace_seconds),
        node_grace_seconds=float(rp.node_not_ready_grace_seconds),
        formation_timeout_seconds=float(rp.formation_timeout_seconds),
    )


def gpu_needs(spec: DeepSpeedInferenceSpec) -> GPUNeeds:
    """The GPU capacity question a parsed spec asks."""
    return GPUNeeds(
        tp=spec.tensor_parallel_size,
        gpus_per_rank=spec.resources.gpus,
        resource_name=spec.gpu.resource_name,
        node_selector=dict(spec.gpu.node_selector),
        tolerations=[t.model_dump(by_alias=True, exclude_none=True) for t in spec.gpu.tolerations],
        require_gpu_operator=spec.gpu.require_gpu_operator,
    )


def describe_validation_error(err: ValidationError) -> str:
    """'spec.a.b: message; ...' naming every invalid field."""
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"spec.{loc}: {e.get('msg', 'invalid')}" if loc else e.get("msg", "invalid"))
    return "; ".join(parts)


def safe_parse(spec: Mapping[str, Any]) -> tuple[DeepSpeedInferenceSpec | None, str | None]:
    """(parsed spec, None) or (None, message naming the invalid fields)."""
    try:
        return parse_spec(spec), None
    except ValidationError as err:
        return None, describe_validation_error(err)
    except (TypeError, ValueError) as err:  # defensive: never crash on a bad resource
        return None, str(err)


def plan(obs: Observed) -> Plan:
    """Decide one pass for one DSI (see the module docstring)."""
    current = dict(obs.status or {})
    parsed, invalid = (obs.parsed, None) if obs.parsed is not None else safe_parse(obs.spec)
    if parsed is None:
        tp = obs.spec.get("tensorParallelSize", 1)
        replicas = obs.spec.get("replicas", 1)
        desired = compute_status(
            StatusInputs(
                name=obs.name,
                namespace=obs.namespace,
                generation=obs.generation,
                replicas=replicas if isinstance(replicas, int) else 0,
                tp=tp if isinstance(tp, int) else 1,
                current=current,
                now=obs.now,
                invalid_spec=invalid,
            )
        )
        patch = status_patch(current, desired)
        bad: list[EventSpec] = []
        if patch is not None and current.get("message") != desired.get("message"):
            bad.append(EventSpec("Warning", EVENT_INVALID, desired["message"]))
        return Plan(status=desired, patch=patch, events=bad, blocked=True)

    spec = parsed
    policy = policy_from_spec(spec)
    tp, replicas = spec.tensor_parallel_size, spec.replicas
    states = group_states_from_status(current)
    events: list[EventSpec] = []

    # Failed is sticky for the generation it happened in; a spec change clears it and the
    # restart history that exhausted the budget.
    failed_reason: str | None = None
    if current.get("failedReason"):
        if current.get("observedGeneration") == obs.generation:
            failed_reason = str(current["failedReason"])
        else:
            states = {g: replace(s, restart_times=()) for g, s in states.items()}

    pre = obs.preflight
    blocking = pre.blocking if pre is not None else None

    decisions: dict[int, Decision] = {}
    restarts: list[Restart] = []
    continues: list[ContinueRestart] = []
    new_states: dict[int, GroupState] = {}
    for g in range(replicas):
        state = states.get(g, GroupState(index=g))
        pods = obs.pods.get(g, ())
        clusters = {p.cluster for p in pods if p.deletion_timestamp is None and p.cluster}
        if state.members and state.cluster and clusters and state.cluster not in clusters:
            # KubeRay switched the group to a new RayCluster (blue/green upgrade after a spec
            # change): the old members going away is a roll, not a failure. Form afresh.
            state = replace(state, members=(), formed_at=None, forming_since=obs.now, cluster=None)
        if failed_reason is not None or blocking is not None or not obs.children_created:
            dec: Decision = NoAction()
            if state.restarting_since is not None:
                # Finish a restart already under way even when newly blocked or failed.
                dec = decide(pods, obs.nodes, state, policy, tp, obs.now)
        else:
            dec = decide(pods, obs.nodes, state, policy, tp, obs.now)
        if isinstance(dec, Fail):
            failed_reason = dec.reason
            events.append(EventSpec("Warning", EVENT_BUDGET, dec.reason))
            dec = NoAction()
        decisions[g] = dec
        if isinstance(dec, Restart):
            restarts.append(dec)
            events.append(
                EventSpec(
                    "Warning",
                    EVENT_GROUP_RESTART,
                    f"restarting group {g} (trigger {dec.trigger}, pod {dec.pod or '-'}): "
                    f"{dec.reason}",
                )
            )
        elif isinstance(dec, ContinueRestart):
            continues.append(dec)
        new_states[g] = advance_group(state, dec, pods, tp, policy, obs.now)

    # A failure in one group makes the resource Failed; stop restarting the others too.
    if failed_reason is not None and restarts:
        for r in restarts:
            decisions[r.group] = NoAction()
            new_states[r.group] = states.get(r.group, GroupState(index=r.group))
        events = [e for e in events if e.reason != EVENT_GROUP_RESTART]
        restarts = []

    hashes = obs.desired_hashes or {}
    inputs = StatusInputs(
        name=obs.name,
        namespace=obs.namespace,
        generation=obs.generation,
        replicas=replicas,
        tp=tp,
        current=current,
        now=obs.now,
        endpoint=L.endpoint_url(obs.name, obs.namespace, spec.serve.port),
        selector=L.selector_for(obs.name),
        groups=new_states,
        pods=obs.pods,
        decisions=decisions,
        preflight=pre.conditions if pre is not None else (),
        blocking=blocking,
        children_created=obs.children_created,
        rayservice=obs.rayservice,
        failed_reason=failed_reason,
        warnings=pre.warnings if pre is not None else (),
        new_restarts=len(restarts),
    )
    desired = compute_status(inputs)
    # Record the template hash each group's bookkeeping refers to.
    for gd in desired.get("groups", []):
        h = hashes.get(gd["index"]) or _recorded_hash(current, gd["index"])
        if h:
            gd["hash"] = h

    patch = status_patch(current, desired)
    if current.get("phase") != desired.get("phase") and desired.get("phase") is not None:
        etype = "Warning" if desired["phase"] in ("Failed", "Degraded") else "Normal"
        events.append(
            EventSpec(etype, EVENT_PHASE, f"phase {desired['phase']}: {desired.get('message', '')}")
        )
    events.extend(_preflight_events(current, desired))
    return Plan(
        status=desired,
        patch=patch,
        events=events,
        restarts=restarts,
        continues=continues,
        decisions=decisions,
        blocked=blocking is not None,
    )


def _recorded_hash(status: Mapping[str, Any], g: int) -> str | None:
    for gd in status.get("groups") or []:
        if isinstance(gd, Mapping) and gd.get("index") == g:
            h = gd.get("hash")
            return str(h) if h else None
    return None


def _preflight_events(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[EventSpec]:
    """An Event each time a preflight condition appears or flips."""
    prev = {
        c.get("type"): c.get("status")
        for c in current.get("conditions") or []
        if isinstance(c, Mapping)
    }
    out = []
    for c in desired.get("conditions") or []:
        if c["type"] not in ("GPUOperatorReady", "GPUCapacity", "KubeRayAvailable"):
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
