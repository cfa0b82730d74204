"""The operator's process-wide state and one reconcile pass: observe, plan, execute.

Design:

* **Indexes, not reads.** kopf indexes keep the latest DSIs, worker pods, nodes, RayServices and
  master Services in memory, so a pass needs no API reads unless it is about to write.
* **One pass at a time per resource, bursts coalesced** (:mod:`workqueue`).
* **A ticker instead of kopf timers.** Timers would put a kopf finalizer on every DSI (deletion
  would hang while the operator is down). One loop re-kicks, every few seconds, only the DSIs
  whose last pass had a clock running (grace periods, deadlines, backoff: see
  :func:`~.reconcile.waits_on_clock`), every DSI when the cluster-wide preflight facts change,
  and every DSI every few minutes as a safety net; idle cost does not grow with resources.
* **Parse once.** A DSI's spec is parsed once per (uid, generation), at the edge; everything
  after that takes the typed spec.
* **Read before write.** When the planner wants to write (status, children, pod deletions)
  the pass re-reads the DSI and plans again on the fresh object: status patches that record a
  restart are conditional on that resourceVersion, so a restart is never recorded twice.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dsi_operator.api import labels as L
from dsi_operator.api.spec import DeepSpeedInferenceSpec
from dsi_operator.runtime import metrics
from dsi_operator.runtime.execute import ensure_children, execute
from dsi_operator.runtime.kube import Kube
from dsi_operator.runtime.workqueue import Key, Scheduler
from dsi_operator.serving.observe import (
    HEAD_GROUP,
    children_current,
    node_info,
    rayservice_view,
    select_cluster_pods,
)
from dsi_operator.serving.plan import (
    EventSpec,
    Observed,
    Plan,
    RolloutState,
    declared_shape,
    gpu_needs,
    plan,
    rollout_sync_needed,
    rollout_targets,
    safe_parse,
    waits_on_clock,
)
from dsi_operator.serving.preflight import ClusterFacts, PreflightResult, kuberay_condition
from dsi_operator.serving.preflight import evaluate as evaluate_preflight
from dsi_operator.serving.render import (
    head_hash,
    parse_group_hashes,
    serve_shape_hash,
    spec_hash,
    spec_hash_by_group,
)
from dsi_operator.serving.restart import PodInfo, failure_visible
from dsi_operator.serving.status import group_states_from_status

log = logging.getLogger("dsi_operator")

#: Seconds between ticker passes over the DSIs with a clock running (grace periods,
#: deadlines, backoff): a steady DSI costs nothing between events.
TICK_SECONDS = float(os.environ.get("DSI_OPERATOR_TICK_SECONDS", "5"))
#: Seconds between passes over every DSI whatever its state: a safety net, not a mechanism.
RESYNC_SECONDS = float(os.environ.get("DSI_OPERATOR_RESYNC_SECONDS", "300"))
#: Concurrent passes (different DSIs).
WORKERS = int(os.environ.get("DSI_OPERATOR_WORKERS", "8"))
#: Seconds a restart leaves a Failed pod to KubeRay (which deletes those itself).
KUBERAY_GRACE_SECONDS = float(os.environ.get("DSI_OPERATOR_KUBERAY_GRACE", "10"))
#: Seconds the cluster-wide preflight facts (CRD, ClusterPolicy) are cached.
FACTS_TTL = float(os.environ.get("DSI_OPERATOR_FACTS_TTL", "30"))
#: Seconds KubeRay's leader Lease is cached (its liveness; one list call per period).
LEASE_TTL = float(os.environ.get("DSI_OPERATOR_LEASE_TTL", "10"))


@dataclass(frozen=True)
class Parsed:
    """A DSI spec parsed once per (uid, generation), with the hashes derived from it."""

    spec: DeepSpeedInferenceSpec | None
    error: str | None
    spec_hash: str | None = None
    group_hashes: dict[int, str] | None = None
    declared: tuple[int, int] = (0, 1)  # (replicas, tp) as the raw spec says, when invalid
    head_hash: str = ""
    serve_shape: str = ""


def parse_body(body: Mapping[str, Any]) -> Parsed:
    """Parse a DSI body's spec (never raises: a bad spec is an error message)."""
    raw = body.get("spec") or {}
    spec, err = safe_parse(raw)
    if spec is None:
        return Parsed(None, err, declared=declared_shape(raw))
    return Parsed(
        spec,
        None,
        spec_hash(spec),
        spec_hash_by_group(spec),
        head_hash=head_hash(spec),
        serve_shape=serve_shape_hash(spec),
    )


def rollout_view(annotations: Mapping[str, str] | None, parsed: Parsed) -> RolloutState:
    """The hashes the rollout compares: the RayService's annotations against the spec's."""
    annotations = annotations or {}
    return RolloutState(
        carried=parse_group_hashes(annotations.get(L.ANNOTATION_GROUP_HASHES)),
        carried_head=annotations.get(L.ANNOTATION_RS_HEAD_HASH) or None,
        head_target=parsed.head_hash,
        shape_target=parsed.serve_shape,
        spec_hash=parsed.spec_hash or "",
    )


@dataclass
class Controller:
    """Process-wide state of the operator; kept in kopf's memo (see :mod:`handlers`)."""

    kubeconfig: str | None = None
    exact_namespaces: bool = False
    kube: Kube | None = None
    facts: ClusterFacts[tuple[bool, list[dict[str, Any]] | None]] | None = None
    lease: ClusterFacts[dict[str, Any] | None] | None = None
    scheduler: Scheduler | None = None
    ticker: asyncio.Task[None] | None = None
    # Startup helpers (API imports, facts prefetch, watchdog); cancelled at cleanup.
    background: list[asyncio.Task[None]] = field(default_factory=list)
    dsis: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # kopf indexes (live mappings), captured from the first DSI event: kopf fills them
    # completely before any regular handler runs, so a pass never sees a half-listed cluster
    # (a formed group whose pods were simply not listed yet would look deleted).
    pod_index: Mapping[Key, Any] | None = None  # Key -> Store of (group, PodInfo)
    node_index: Mapping[str, Any] | None = None  # node name -> Store of node summary
    node_seen: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    rayservices: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # Names of the per-group children seen by the watches: master Services and NetworkPolicies.
    services: dict[Key, set[str]] = field(default_factory=dict)
    # (namespace, name) -> (uid, spec hash) of the children last applied by this process.
    applied: dict[Key, tuple[str, str]] = field(default_factory=dict)
    # last Event per (key, reason) to avoid repeating identical Events every pass.
    last_events: dict[tuple[Key, str], str] = field(default_factory=dict)
    # DSIs whose last pass had a clock running (reconcile.waits_on_clock): the ticker's work.
    clock_waiters: set[Key] = field(default_factory=set)
    # The last nudge (reconcile.Plan.nudge) written to each DSI's RayClusters.
    nudged: dict[Key, str] = field(default_factory=dict)
    # Incidents (EventSpec.incident) whose Event this process posted or found posted.
    posted_incidents: dict[Key, set[str]] = field(default_factory=dict)
    parsed_cache: dict[tuple[str, Any], Parsed] = field(default_factory=dict)
    # Whether this process logged its first pass yet (how long a restart left it blind).
    first_pass_logged: bool = False

    # --- reading the in-memory state -----------------------------------------------------------

    def kick(self, key: Key, cause: str) -> None:
        """Queue a pass over a known DSI."""
        if self.scheduler is not None and key in self.dsis:
            self.scheduler.kick(key, cause, urgent=self.urgent(key))

    def urgent(self, key: Key) -> bool:
        """Whether a pass over ``key`` goes before the others: a new resource (its pods
        cannot start before its RayService exists), or one that shows a failure. After a
        restart every resource is queued at once: the one whose pod failed meanwhile goes
        first instead of behind every steady one."""
        if key not in self.applied and key not in self.rayservices:
            return True
        body = self.dsis.get(key) or {}
        states = group_states_from_status(body.get("status") or {})
        by_group: dict[int, list[PodInfo]] = {}
        for g, p in self.pods_of(key):
            if g != HEAD_GROUP:
                by_group.setdefault(g, []).append(p)
        return failure_visible(states, by_group)

    def pods_of(self, key: Key) -> list[tuple[int, PodInfo]]:
        """(group, PodInfo) of every worker pod of a DSI, from the index."""
        if self.pod_index is None:
            return []
        return list(self.pod_index.get(key, ()))

    def all_nodes(self) -> dict[str, dict[str, Any]]:
        """Node summaries by name, from the index."""
        if self.node_index is None:
            return {}
        return {name: summary for name, store in self.node_index.items() for summary in store}

    def parsed(self, body: Mapping[str, Any]) -> Parsed:
        """The body's spec parsed, cached per (uid, generation)."""
        meta = body.get("metadata") or {}
        ck = (meta.get("uid", ""), meta.get("generation"))
        hit = self.parsed_cache.get(ck)
        if hit is None:
            if len(self.parsed_cache) > 4096:
                self.parsed_cache.clear()
            hit = self.parsed_cache[ck] = parse_body(body)
        return hit

    def children(self, key: Key, parsed: Parsed, uid: str) -> tuple[bool, bool]:
        """(children exist, children up to date) for the desired spec."""
        if parsed.spec is None or parsed.spec_hash is None:
            return False, False
        wanted = {L.master_service_name(key[1], g) for g in range(parsed.spec.replicas)}
        if parsed.spec.network_policy.enabled:
            wanted |= {L.network_policy_name(key[1], g) for g in range(parsed.spec.replicas)}
        return children_current(
            self.rayservices.get(key),
            self.services.get(key, set()),
            wanted,
            parsed.spec_hash,
            applied_here=self.applied.get(key) == (uid, parsed.spec_hash),
        )

    async def preflight(self, parsed: Parsed) -> PreflightResult | None:
        """Preflight conditions for a valid spec (cluster facts cached for FACTS_TTL)."""
        if parsed.spec is None or self.facts is None:
            return None
        kuberay, policies = await self.facts.get()
        lease = await self.lease.get() if self.lease is not None else None
        nodes = list(self.all_nodes().values())
        return evaluate_preflight(kuberay, policies, nodes, gpu_needs(parsed.spec), lease)

    def observe(self, key: Key, body: Mapping[str, Any], pre: PreflightResult | None) -> Observed:
        """Everything a pass plans from, as plain data."""
        meta = body.get("metadata") or {}
        parsed = self.parsed(body)
        rs = rayservice_view(self.rayservices.get(key))
        entries = self.pods_of(key)
        keep = {p.uid for p in select_cluster_pods([p for _, p in entries], rs)}
        pods_by_group: dict[int, list[PodInfo]] = {}
        for g, p in entries:
            if p.uid in keep:
                pods_by_group.setdefault(g, []).append(p)
        head_pods = pods_by_group.pop(HEAD_GROUP, [])
        annotations = (self.rayservices.get(key) or {}).get("metadata", {}).get("annotations")
        exists, _ = self.children(key, parsed, meta.get("uid", ""))
        return Observed(
            name=key[1],
            namespace=key[0],
            generation=meta.get("generation"),
            spec=parsed.spec,
            status=body.get("status") or {},
            now=datetime.now(UTC),
            pods=pods_by_group,
            nodes={n: node_info(s) for n, s in self.all_nodes().items()},
            preflight=pre,
            children_created=exists,
            rayservice=rs,
            desired_hashes=parsed.group_hashes,
            head_pods=head_pods,
            rollout=rollout_view(annotations, parsed),
            invalid=parsed.error,
            declared_replicas=parsed.declared[0],
            declared_tp=parsed.declared[1],
            kuberay_grace_seconds=KUBERAY_GRACE_SECONDS,
        )

    # --- one pass ------------------------------------------------------------------------------

    async def reconcile_one(self, key: Key, cause: str) -> None:
        """One pass over one DSI: plan from memory; re-read, act and write only when needed."""
        body = self.dsis.get(key)
        if body is None:
            return
        if not self.first_pass_logged:
            self._first_pass(key, cause)
        # Ticked until a pass ends cleanly: one that raises (an API error) is retried.
        self._track_clock(key, True)
        pre = await self.preflight(self.parsed(body))
        obs = self.observe(key, body, pre)
        p = plan(obs)
        _, current = self.children(key, self.parsed(body), _uid(body))
        if (
            not p.patch
            and not p.acts
            and (current or p.blocked)
            and not self._new_events(key, p)
            and (p.nudge is None or self.nudged.get(key) == p.nudge)
        ):
            self._track_clock(key, waits_on_clock(obs, p))
            metrics.RECONCILES.labels(cause=cause, outcome="noop").inc()
            return

        started = time.monotonic()
        parsed = self.parsed(body)
        if key not in self.applied and not current and not p.blocked and parsed.spec is not None:
            # Children this process never applied: apply the RayService from the watched
            # object (a newer spec brings its own event) and leave the Services, status and
            # Events to a later, non-urgent pass, so in a burst of new resources every
            # RayService comes first.
            await ensure_children(self, key, body, parsed, rollout_targets(obs, p), first=True)
            self.kick(key, "children")
            metrics.RECONCILES.labels(cause=cause, outcome="acted").inc()
            return
        assert self.kube is not None
        fresh = await self.kube.get_dsi(*key)
        if fresh is None:
            return
        self.dsis[key] = copy.deepcopy(fresh)
        obs = self.observe(key, fresh, pre)
        p = plan(obs)
        parsed = self.parsed(fresh)
        if not p.blocked and parsed.spec is not None:
            if not self.children(key, parsed, _uid(fresh))[1]:
                existed = obs.children_created
                await ensure_children(self, key, fresh, parsed, rollout_targets(obs, p))
                if not existed:
                    p = plan(self.observe(key, fresh, pre))
                # Else the plan stands: planned again, the rollout would see the templates it
                # just moved as carried already and could decide differently (e.g. one group
                # at a time where the Serve shape changed for all).
            elif rollout_sync_needed(obs, p) or (
                p.rollout is not None and (p.rollout.rolls or p.rollout.head_pods)
            ):
                # The rollout moves groups to the spec: their templates first (RayService
                # and RayCluster), so the pods deleted next come back from the new ones.
                await ensure_children(self, key, fresh, parsed, rollout_targets(obs, p))
        await execute(self, key, fresh, p)
        # A write is followed by a watch event and a new pass; until then, keep ticking.
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        metrics.RECONCILES.labels(cause=cause, outcome="acted").inc()

    def _first_pass(self, key: Key, cause: str) -> None:
        """Log how long the start took; import the API classes the pass's Events and pod
        deletions need while it reads and writes the status."""
        self.first_pass_logged = True
        log.info(
            "first pass (%s/%s, %s) %.2fs after start; %d resource(s) known",
            *key,
            cause,
            process_age(),
            len(self.dsis),
        )
        if self.kube is not None:
            warm = asyncio.to_thread(self.kube.warm, ("core", "networking"))
            self.background.append(asyncio.create_task(warm))

    def _track_clock(self, key: Key, waiting: bool) -> None:
        if waiting:
            self.clock_waiters.add(key)
        else:
            self.clock_waiters.discard(key)

    async def cluster_signature(self) -> tuple[Any, ...]:
        """What every DSI's preflight reads from the cluster besides nodes (watched): a
        change means every DSI must be planned again. Liveness, not the Lease itself, whose
        renewTime moves every few seconds."""
        if self.facts is None:
            return ()
        kuberay, policies = await self.facts.get()
        lease = await self.lease.get() if self.lease is not None else None
        alive = kuberay_condition(kuberay, lease)
        return (kuberay, policies, alive.status, alive.reason)

    def forget(self, key: Key) -> None:
        """Drop what this process keeps about a DSI that was deleted."""
        self.clock_waiters.discard(key)
        self.dsis.pop(key, None)
        self.applied.pop(key, None)
        self.posted_incidents.pop(key, None)
        self.nudged.pop(key, None)
        for k in [k for k in self.last_events if k[0] == key]:
            del self.last_events[k]

    def event_posted(self, key: Key, ev: EventSpec) -> bool:
        """Whether this process already posted ``ev`` (an incident by name, any other Event
        when it repeats the last one of its reason)."""
        if ev.incident is not None:
            return ev.incident in self.posted_incidents.get(key, ())
        return self.last_events.get((key, ev.reason)) == ev.message

    def _new_events(self, key: Key, p: Plan) -> bool:
        return not all(self.event_posted(key, e) for e in p.events)


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere since import)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


def _uid(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid", ""))
