"""The operator's process-wide state and one reconcile pass: read, observe, plan, write.

Design:

* **Indexes, not reads.** kopf indexes keep the latest DSIs, worker pods, nodes, RayServices and
  master Services in memory, so a pass needs no API reads unless it is about to write.
* **One pass at a time per resource, bursts coalesced** (:mod:`.workqueue`).
* **A ticker instead of kopf timers.** Timers would put a kopf finalizer on every DSI (deletion
  would hang while the operator is down). One loop re-kicks, every few seconds, only the DSIs
  whose last pass had a clock running (grace periods, deadlines, backoff: see
  :func:`~dsi_operator.serving.plan.waits_on_clock`), every DSI when the cluster-wide
  preflight facts change, and every DSI every few minutes as a safety net; idle cost does not
  grow with resources.
* **Parse once.** A DSI's spec is parsed once per (uid, generation), at the edge; everything
  after that takes the typed spec.
* **Read before write.** When the plan writes (status, children, pod deletions) the pass
  re-reads the DSI first: status patches that record a restart are conditional on that
  resourceVersion, so a restart is never recorded twice.
* **A straight line of named steps, planned once** (:meth:`Controller.reconcile_one`): read,
  observe, plan, then (only when something is to be written) re-read, children, status,
  Events, pod deletions, nudge, and schedule the next pass. A step that must plan again says
  why (:class:`Replan`). The writing steps live in :mod:`.execute`; they return what they did
  and the controller alone updates its caches.
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
from dsi_operator.runtime import failpoints, metrics
from dsi_operator.runtime.execute import (
    Applied,
    AppliedChildren,
    ApplyInterrupted,
    KubeClient,
    StatusResult,
    StatusWrite,
    already_posted,
    delete_pods,
    ensure_children,
    nudge_kuberay,
    post_events,
    report_restarts,
    write_status,
)
from dsi_operator.runtime.passes import (
    PLANNED,
    REQUEUE,
    Outcome,
    Parsed,
    Pass,
    PassResult,
    Replan,
    parse_body,
    rollout_view,
)
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
    gpu_needs,
    plan,
    rollout_sync_needed,
    rollout_targets,
    waits_on_clock,
)
from dsi_operator.serving.preflight import ClusterFacts, PreflightResult, kuberay_condition
from dsi_operator.serving.preflight import evaluate as evaluate_preflight
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


@dataclass
class Controller:
    """Process-wide state of the operator; kept in kopf's memo (see :mod:`.handlers`)."""

    kubeconfig: str | None = None
    exact_namespaces: bool = False
    kube: KubeClient | None = None
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
    # What this process last applied of each DSI's children (object, spec hash, scope).
    applied: dict[Key, AppliedChildren] = field(default_factory=dict)
    # The last Event message per reason of each DSI, not to repeat identical Events.
    last_events: dict[Key, dict[str, str]] = field(default_factory=dict)
    # DSIs whose last pass had a clock running (plan.waits_on_clock): the ticker's work.
    clock_waiters: set[Key] = field(default_factory=set)
    # The last nudge (plan.Plan.nudge) written to each DSI's RayClusters.
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
            applied_here=(a := self.applied.get(key)) is not None
            and a.complete(uid, parsed.spec_hash),
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

    # --- one pass: a straight line of named steps ---------------------------------------------

    async def reconcile_one(self, key: Key, cause: str) -> PassResult:
        """One pass over one DSI. It plans once, from memory, and stops there when nothing is
        to be written; otherwise it re-reads the DSI and writes in the order that makes a
        crash at any point safe (see :mod:`dsi_operator.serving.plan`): children, the status
        (which records a restart), Events, and only then pod deletions. An API error other
        than those a step handles raises: the pass is retried (its clock keeps ticking)."""
        body = self.read(key)
        if body is None:
            return PassResult(Outcome.GONE)
        self.begin(key, cause)
        ps = await self.observe_pass(key, cause, body)
        self.plan_pass(ps, PLANNED)
        if self.nothing_to_write(ps):
            return self.schedule_next(ps, Outcome.NOOP)
        if self.first_apply_due(ps):
            await self.apply_children(ps, first=True)
            return self.schedule_next(ps, Outcome.FIRST_APPLY)
        if not await self.reread(ps):
            return PassResult(Outcome.GONE, tuple(ps.plans))
        await self.sync_children(ps)
        status = await self.write_status(ps)
        if not status.proceed:
            gone = status.outcome is StatusWrite.GONE
            return self.schedule_next(ps, Outcome.GONE if gone else Outcome.CONFLICT)
        await self.post_events(key, ps.body, ps.plan)
        await self.delete_pods(ps)
        await self.nudge(ps)
        return self.schedule_next(ps, Outcome.ACTED)

    def read(self, key: Key) -> dict[str, Any] | None:
        """Step: the DSI as the watch last showed it (None: not known, or deleted)."""
        return self.dsis.get(key)

    def begin(self, key: Key, cause: str) -> None:
        """Step: log the process's first pass; keep the DSI on the ticker until the pass
        ends cleanly, so that one which raises (an API error) is retried."""
        if not self.first_pass_logged:
            self._first_pass(key, cause)
        self._track_clock(key, True)

    async def observe_pass(self, key: Key, cause: str, body: dict[str, Any]) -> Pass:
        """Step: everything the pass plans from (preflight facts are cached)."""
        parsed = self.parsed(body)
        pre = await self.preflight(parsed)
        current = self.children(key, parsed, _uid(body))[1]
        return Pass(key, cause, body, parsed, pre, self.observe(key, body, pre), current)

    def plan_pass(self, ps: Pass, reason: str) -> None:
        """Step: the pure plan of ``ps.obs``; ``reason`` says why (once per pass, then only
        for a :class:`Replan`)."""
        ps.plan = plan(ps.obs)
        ps.plans.append(reason)

    def replan(self, ps: Pass, reason: Replan) -> None:
        """Step: observe and plan again, for a named reason."""
        log.debug("%s/%s: planning again: %s", *ps.key, reason)
        ps.obs = self.observe(ps.key, ps.body, ps.pre)
        self.plan_pass(ps, reason)

    def nothing_to_write(self, ps: Pass) -> bool:
        """Step: whether the plan writes nothing (no status, pods, children, Events, nudge)."""
        p, key = ps.plan, ps.key
        return (
            not p.patch
            and not p.acts
            and (ps.children_current or p.blocked)
            and not self._new_events(key, p)
            and (p.nudge is None or self.nudged.get(key) == p.nudge)
        )

    def first_apply_due(self, ps: Pass) -> bool:
        """Step: whether this is a new resource's first pass here: children this process
        never applied. Then the pass applies the RayService alone, from the watched object
        (a newer spec brings its own event), and leaves the Services, status and Events to a
        later, non-urgent pass, so in a burst of new resources every RayService comes first."""
        return (
            ps.key not in self.applied
            and not ps.children_current
            and not ps.plan.blocked
            and ps.parsed.spec is not None
        )

    async def reread(self, ps: Pass) -> bool:
        """Step: read the DSI before writing (a restart's status patch is conditional on its
        resourceVersion). False: it is gone. A newer object than the one planned from is
        planned again (:attr:`Replan.NEWER_OBJECT`); the same one keeps the plan."""
        ps.started = time.monotonic()
        fresh = await self._api.get_dsi(*ps.key)
        if fresh is None:
            return False
        self.dsis[ps.key] = copy.deepcopy(fresh)
        rv = _resource_version(fresh)
        newer = rv is None or rv != _resource_version(ps.body)
        ps.body, ps.parsed = fresh, self.parsed(fresh)
        if newer:
            self.replan(ps, Replan.NEWER_OBJECT)
        return True

    async def sync_children(self, ps: Pass) -> None:
        """Step: apply the children when they differ from the spec, or when the rollout moves
        groups to it: their templates first (RayService and RayCluster), so the pods deleted
        next come back from the new ones. Children created by this step are planned with
        again (:attr:`Replan.CHILDREN_CREATED`)."""
        p, obs = ps.plan, ps.obs
        if p.blocked or ps.parsed.spec is None:
            return
        if not self.children(ps.key, ps.parsed, _uid(ps.body))[1]:
            await self.apply_children(ps)
            if not obs.children_created:
                self.replan(ps, Replan.CHILDREN_CREATED)
            # Else the plan stands: planned again, the rollout would see the templates it
            # just moved as carried already and could decide differently (e.g. one group
            # at a time where the Serve shape changed for all).
        elif rollout_sync_needed(obs, p) or (
            p.rollout is not None and (p.rollout.rolls or p.rollout.head_pods)
        ):
            await self.apply_children(ps)

    async def apply_children(self, ps: Pass, *, first: bool = False) -> None:
        """Apply the children (``first``: the RayService alone) and record what was applied,
        also when an API error cut the step short."""
        spec, spec_hash = ps.parsed.spec, ps.parsed.spec_hash
        assert spec is not None and spec_hash is not None
        known = (self.rayservices.get(ps.key), self.applied.get(ps.key))
        targets = rollout_targets(ps.obs, ps.plan)
        try:
            done = await ensure_children(
                self._api, ps.key, ps.body, spec, spec_hash, known, targets, first=first
            )
        except ApplyInterrupted as e:
            self.record_applied(ps.key, e.applied)
            raise
        self.record_applied(ps.key, done)

    def record_applied(self, key: Key, done: Applied) -> None:
        """Record our own writes so the next steps and passes need not wait for the watches;
        their events overwrite this with the real objects."""
        if done.record is not None:
            self.applied[key] = done.record
        if done.rayservice_annotations is not None:
            prev = self.rayservices.get(key) or {}
            self.rayservices[key] = {
                "metadata": {"annotations": dict(done.rayservice_annotations)},
                "status": copy.deepcopy(prev.get("status") or {}),
            }
        if done.added:
            self.services.setdefault(key, set()).update(done.added)
        if done.removed and key in self.services:
            self.services[key] -= done.removed

    async def write_status(self, ps: Pass) -> StatusResult:
        """Step: the status patch, which records every restart before any pod is deleted.
        A conflict or a vanished DSI stops the pass (see :class:`StatusResult`)."""
        res = await write_status(self._api, ps.key, ps.body, ps.plan)
        if res.body is not None:
            self.dsis[ps.key] = copy.deepcopy(res.body)
        if res.proceed:
            if ps.plan.restarts:
                failpoints.hit(failpoints.AFTER_RESTART_RECORDED)
            status = ps.plan.status
            metrics.set_phase(*ps.key, status.get("phase"), status.get("readyReplicas"))
        return res

    async def post_events(self, key: Key, body: Mapping[str, Any], p: Plan) -> None:
        """Step: post the plan's Events this process has not posted yet (incidents once, even
        across processes: see :func:`~.execute.post_events`)."""
        seen = (self.last_events.get(key, {}), self.posted_incidents.get(key, set()))
        posted = await post_events(self._api, key, body, p.events, seen)
        if posted.last:
            self.last_events.setdefault(key, {}).update(posted.last)
        if posted.incidents:
            self.posted_incidents.setdefault(key, set()).update(posted.incidents)

    async def delete_pods(self, ps: Pass) -> None:
        """Step: count the restarts the status now records, then delete the pods that are
        due (an error raises: the next pass continues the recorded restart)."""
        report_restarts(ps.key, ps.plan)
        await delete_pods(self._api, ps.key, ps.plan.due())

    async def nudge(self, ps: Pass) -> None:
        """Step: write the plan's nudge to the RayClusters, once per value."""
        nudge = ps.plan.nudge
        if nudge is None or self.nudged.get(ps.key) == nudge:
            return
        if await nudge_kuberay(self._api, ps.key, self.rayservices.get(ps.key), nudge):
            self.nudged[ps.key] = nudge

    def schedule_next(self, ps: Pass, outcome: Outcome) -> PassResult:
        """Step: when the next pass comes. A pass that wrote nothing stays on the ticker only
        while a clock runs; one that wrote keeps ticking until its watch events bring the
        next pass. A first apply and a status conflict are queued again at once."""
        if outcome is Outcome.NOOP:
            self._track_clock(ps.key, waits_on_clock(ps.obs, ps.plan))
            metrics.RECONCILES.labels(cause=ps.cause, outcome="noop").inc()
            return PassResult(outcome, tuple(ps.plans))
        again = REQUEUE.get(outcome)
        if again is not None:
            self.kick(ps.key, again)
        if ps.started is not None:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - ps.started)
        metrics.RECONCILES.labels(cause=ps.cause, outcome="acted").inc()
        return PassResult(outcome, tuple(ps.plans))

    @property
    def _api(self) -> KubeClient:
        assert self.kube is not None, "the API client is made at startup"
        return self.kube

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
        self.last_events.pop(key, None)

    def event_posted(self, key: Key, ev: EventSpec) -> bool:
        """Whether this process already posted ``ev`` (an incident by name, any other Event
        when it repeats the last one of its reason)."""
        return already_posted(
            ev, self.last_events.get(key, {}), self.posted_incidents.get(key, set())
        )

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


def _resource_version(body: Mapping[str, Any]) -> str | None:
    rv = (body.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None
