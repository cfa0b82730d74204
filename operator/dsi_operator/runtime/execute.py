"""Carrying out a :class:`~dsi_operator.serving.plan.Plan`: the writing steps of a pass.

Every decision (which pods, forced or not, not before when) is made by the pure planner; this
module only writes. It keeps no state and knows nothing of the controller: each step takes the
API client and plain data, and returns what it did (:class:`Applied`, :class:`StatusResult`,
:class:`PostedEvents`, ...) for the controller to record. The controller runs the steps in the
order that makes a crash at any point safe: children, the status patch (it records a restart
before any pod is deleted), Events, then pod deletions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from dsi_operator.api import labels as L
from dsi_operator.api.spec import DeepSpeedInferenceSpec
from dsi_operator.runtime import metrics
from dsi_operator.runtime.workqueue import Key
from dsi_operator.serving.plan import EventSpec, Plan, PodDeletion
from dsi_operator.serving.render import Kept, parse_group_hashes, render_children
from dsi_operator.serving.scaling import cluster_names, cluster_patch, previous_capacity

log = logging.getLogger("dsi_operator")

#: Roles of the per-group children the controller tracks by name (in ``Controller.services``)
#: and deletes when their group goes away.
GROUP_CHILD_ROLES = frozenset({L.ROLE_MASTER_SERVICE, L.ROLE_NETWORK_POLICY})


class KubeClient(Protocol):
    """The part of :class:`~dsi_operator.runtime.kube.Kube` a serving pass uses (a test
    stands an in-memory fake in for it)."""

    def warm(self, names: tuple[str, ...] = ...) -> None: ...

    async def get_dsi(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def patch_dsi_status(
        self,
        namespace: str,
        name: str,
        status_patch: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]: ...

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def get_raycluster(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def patch_raycluster(
        self, namespace: str, name: str, ops: list[dict[str, Any]]
    ) -> None: ...

    async def list_master_services(self, namespace: str, name: str) -> list[str]: ...

    async def list_network_policies(self, namespace: str, name: str) -> list[str]: ...

    async def delete_service(self, namespace: str, name: str) -> None: ...

    async def delete_network_policy(self, namespace: str, name: str) -> None: ...

    async def delete_pod(
        self, namespace: str, name: str, uid: str, *, force: bool = False, grace: int | None = None
    ) -> bool: ...

    async def post_event(
        self,
        involved: Mapping[str, Any],
        etype: str,
        reason: str,
        message: str,
        name: str | None = None,
    ) -> None: ...


# --- children --------------------------------------------------------------------------------


class ChildrenScope(StrEnum):
    """Which children a pass applied."""

    #: A new resource's first pass: its RayService alone (the next pass applies the rest).
    RAYSERVICE_ONLY = "rayservice-only"
    #: The RayService and every per-group child.
    ALL = "all"


@dataclass(frozen=True)
class AppliedChildren:
    """What this process last applied for a DSI: the object (uid), the spec (hash), and how
    much of it (``scope``). Kept per DSI in ``Controller.applied``."""

    uid: str
    spec_hash: str
    scope: ChildrenScope = ChildrenScope.ALL

    def complete(self, uid: str, spec_hash: str) -> bool:
        """Whether every child of this object at this spec was applied."""
        return (self.uid, self.spec_hash, self.scope) == (uid, spec_hash, ChildrenScope.ALL)

    def rayservice_only(self, uid: str, spec_hash: str | None = None) -> bool:
        """Whether a first pass applied this object's RayService alone (at this spec, when
        given): the resource was new then."""
        same_spec = spec_hash is None or self.spec_hash == spec_hash
        return self.uid == uid and same_spec and self.scope == ChildrenScope.RAYSERVICE_ONLY


@dataclass(frozen=True)
class Applied:
    """What :func:`ensure_children` wrote, for the controller to record in its caches.

    ``record`` is None when the step was interrupted (:class:`ApplyInterrupted`) before it
    finished; the other fields then say what was written before the error."""

    record: AppliedChildren | None
    #: The annotations of the RayService written by this pass; None: not written.
    rayservice_annotations: dict[str, str] | None = None
    #: Names of the per-group children (master Services, NetworkPolicies) written or deleted.
    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()


class ApplyInterrupted(Exception):
    """An API call failed part way through :func:`ensure_children`; ``applied`` says what
    had been written before it (the controller records that, then the pass fails)."""

    def __init__(self, applied: Applied, cause: BaseException) -> None:
        super().__init__(f"applying children failed: {cause}")
        self.applied = applied


def children_for_pass(
    children: list[dict[str, Any]],
    applied: AppliedChildren | None,
    uid: str,
    spec_hash: str,
    *,
    first: bool,
    kept: bool,
) -> list[dict[str, Any]]:
    """Which of ``children`` (RayService first, see ``render_children``) a pass applies.

    ``first``: a new resource's first pass applies only its RayService, so in a burst every
    RayService (which the pods wait on) comes before any Service: one write per resource
    instead of three, measured as the cost that set the burst's tail. The next pass skips
    that RayService when the first pass applied it at this very spec (``applied``) and no
    group keeps an older template (``kept``): re-applying it would be a no-op write."""
    if first:
        return children[:1]
    if applied is not None and applied.rayservice_only(uid, spec_hash) and not kept:
        return children[1:]
    return children


@dataclass
class _Written:
    """What :func:`ensure_children` has written so far."""

    rayservice: dict[str, str] | None = None
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)

    def result(self, record: AppliedChildren | None) -> Applied:
        return Applied(record, self.rayservice, frozenset(self.added), frozenset(self.removed))


async def ensure_children(
    kube: KubeClient,
    key: Key,
    body: Mapping[str, Any],
    spec: DeepSpeedInferenceSpec,
    spec_hash: str,
    known: tuple[Mapping[str, Any] | None, AppliedChildren | None],
    targets: tuple[frozenset[int], bool] | None = None,
    *,
    first: bool = False,
) -> Applied:
    """Apply the RayService and Services of a valid spec; delete per-group children left over.

    ``known``: (the RayService the watch shows, what this process applied last), both None
    when unknown. ``targets``: (groups rendered at the spec, head rendered at the spec), from
    the rollout (:func:`dsi_operator.serving.plan.rollout_targets`); the other groups, and the
    head when False, keep the templates the current RayService carries. None: all at the
    spec. ``first``: a new resource's first pass, see :func:`children_for_pass`.
    Raises :class:`ApplyInterrupted` (saying what was written before) when a call fails.
    """
    current, applied = known
    uid = (body.get("metadata") or {}).get("uid", "")
    exists = current is not None
    written = _Written()
    try:
        capacity = previous_capacity(current, body.get("status") or {})
        kept = await _kept_templates(kube, key, spec, targets) if exists and targets else None
        children = render_children(key[1], key[0], uid, spec, capacity, kept)
        todo = children_for_pass(
            children, applied, uid, spec_hash, first=first, kept=kept is not None
        )
        await _write_children(kube, key, todo, current, written)
        # Leftovers of removed groups, or policies of a spec that turned them off. A resource
        # with no status and no RayService is new (a same-named predecessor's children belong
        # to its uid and go with it): nothing to list, two calls saved per resource in a
        # burst. (No RayService alone is not enough: right after a start, the watch may not
        # have shown it yet.) A first pass of this process's that applied the RayService
        # alone found the resource new too.
        new = applied is not None and applied.rayservice_only(uid)
        if (exists or body.get("status")) and not new:
            wanted = {c["metadata"]["name"] for c in children}
            await _remove_leftovers(kube, key, wanted, written)
    except Exception as e:
        raise ApplyInterrupted(written.result(None), e) from e
    what = "RayService" if first else "children"
    log.info("%s/%s: %s applied (spec hash %s, existed: %s)", *key, what, spec_hash, exists)
    scope = ChildrenScope.RAYSERVICE_ONLY if first else ChildrenScope.ALL
    return written.result(AppliedChildren(uid, spec_hash, scope))


async def _write_children(
    kube: KubeClient,
    key: Key,
    todo: Sequence[Mapping[str, Any]],
    current: Mapping[str, Any] | None,
    written: _Written,
) -> None:
    """Apply ``todo`` in order, noting each write in ``written``."""
    for child in todo:
        await kube.apply(child)
        if child["kind"] == L.RAYSERVICE_KIND:
            await _sync_cluster(kube, key, current, child)
            # Recorded (once the RayClusters carry it too) so the pass does not wait for the
            # watch to catch up; the watch event that follows brings the real object.
            written.rayservice = dict(child["metadata"].get("annotations") or {})
        elif child["metadata"]["labels"].get(L.LABEL_ROLE) in GROUP_CHILD_ROLES:
            written.added.add(child["metadata"]["name"])


async def _remove_leftovers(
    kube: KubeClient, key: Key, wanted: Set[str], written: _Written
) -> None:
    """Delete the DSI's per-group children that are not ``wanted``."""
    cleanups = (
        (kube.list_master_services, kube.delete_service),
        (kube.list_network_policies, kube.delete_network_policy),
    )
    for list_fn, delete_fn in cleanups:
        for child_name in await list_fn(*key):
            if child_name not in wanted:
                await delete_fn(key[0], child_name)
                written.removed.add(child_name)


async def _kept_templates(
    kube: KubeClient,
    key: Key,
    spec: DeepSpeedInferenceSpec,
    targets: tuple[frozenset[int], bool],
) -> Kept | None:
    """The templates of the groups (and head) the rollout has not moved to the spec yet, read
    from the current RayService (the watch keeps only its annotations and status)."""
    groups, head_at_target = targets
    keep = {g for g in range(spec.replicas) if g not in groups}
    if not keep and head_at_target:
        return None
    current = await kube.get_rayservice(key[0], L.rayservice_name(key[1]))
    if current is None:
        return None
    config = (current.get("spec") or {}).get("rayClusterConfig") or {}
    by_group: dict[int, list[dict[str, Any]]] = {}
    for w in config.get("workerGroupSpecs") or []:
        parsed_name = L.parse_worker_group_name(str(w.get("groupName", "")))
        if parsed_name is not None and parsed_name[0] in keep:
            by_group.setdefault(parsed_name[0], []).append(w)
    annotations = (current.get("metadata") or {}).get("annotations") or {}
    recorded = parse_group_hashes(annotations.get(L.ANNOTATION_GROUP_HASHES))
    shapes = {g: t.shape for g, t in recorded.items()}
    head = None if head_at_target else config.get("headGroupSpec")
    return Kept(head=head, groups=by_group, shapes=shapes)


async def _sync_cluster(
    kube: KubeClient, key: Key, current: Mapping[str, Any] | None, rayservice: Mapping[str, Any]
) -> None:
    """Write the RayService's worker groups and head into the running RayClusters: KubeRay
    carries neither replica counts nor (under upgradeStrategy None) templates over (see
    :mod:`dsi_operator.serving.scaling`)."""
    for cluster in cluster_names(current):
        for _ in range(3):
            rc = await kube.get_raycluster(key[0], cluster)
            ops = cluster_patch(rc, rayservice) if rc is not None else []
            if not ops:
                break
            try:
                await kube.patch_raycluster(key[0], cluster, ops)
            except ApiException as e:
                if e.status not in (409, 422):
                    raise
                # Changed in between (the resourceVersion test failed): compare again. The
                # pods a rollout deletes next must come back from these templates.
                log.info("%s/%s: RayCluster %s changed while patching; again", *key, cluster)
                continue
            log.info("%s/%s: RayCluster %s brought in step (%d op(s))", *key, cluster, len(ops))
            break
        else:
            raise RuntimeError(f"RayCluster {cluster} kept changing while being patched")


# --- status ----------------------------------------------------------------------------------


class StatusWrite(StrEnum):
    """How the status step ended."""

    UNCHANGED = "unchanged"  # the plan has no patch: nothing written
    WRITTEN = "written"
    #: Someone wrote the DSI since it was read (409): the rest of the plan must not run.
    CONFLICT = "conflict"
    #: The DSI is gone (404): nothing more to do.
    GONE = "gone"


@dataclass(frozen=True)
class StatusResult:
    """The status step's outcome, and the DSI as the API server returned it when written."""

    outcome: StatusWrite
    body: dict[str, Any] | None = None

    @property
    def proceed(self) -> bool:
        """Whether the rest of the plan (Events, pod deletions) may run."""
        return self.outcome in (StatusWrite.UNCHANGED, StatusWrite.WRITTEN)


async def write_status(
    kube: KubeClient, key: Key, body: Mapping[str, Any], p: Plan
) -> StatusResult:
    """Write the plan's status patch. A patch that records a restart is conditional on the
    resourceVersion it was planned from, so a restart is never recorded twice. Other API
    errors than 409 and 404 are raised (the pass fails and is retried)."""
    if not p.patch:
        return StatusResult(StatusWrite.UNCHANGED)
    rv = (body.get("metadata") or {}).get("resourceVersion") if p.restarts else None
    try:
        updated = await kube.patch_dsi_status(*key, p.patch, rv)
    except ApiException as e:
        if e.status == 409:
            # Someone wrote in between: the next pass plans again on the new object.
            log.info("%s/%s: status conflict; replanning", *key)
            return StatusResult(StatusWrite.CONFLICT)
        if e.status == 404:
            return StatusResult(StatusWrite.GONE)
        raise
    metrics.STATUS_WRITES.inc()
    return StatusResult(StatusWrite.WRITTEN, updated)


# --- Events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostedEvents:
    """What :func:`post_events` posted: the last message per reason of the plain Events
    (tried, whether the post succeeded or not: they are best effort), and the incidents now
    known to be posted (by this call, or found posted: 409)."""

    last: dict[str, str] = field(default_factory=dict)
    incidents: frozenset[str] = frozenset()


def already_posted(ev: EventSpec, last: Mapping[str, str], incidents: Set[str]) -> bool:
    """Whether ``ev`` was posted already: an incident by name, any other Event when it repeats
    the last one of its reason."""
    if ev.incident is not None:
        return ev.incident in incidents
    return last.get(ev.reason) == ev.message


async def post_events(
    kube: KubeClient,
    key: Key,
    body: Mapping[str, Any],
    events: Sequence[EventSpec],
    seen: tuple[Mapping[str, str], Set[str]],
) -> PostedEvents:
    """Post the Events not posted yet. ``seen``: (last message per reason, incidents posted)
    of this DSI, as the controller remembers them."""
    last, incidents = dict(seen[0]), set(seen[1])
    out_last: dict[str, str] = {}
    out_incidents: set[str] = set()
    for ev in events:
        if already_posted(ev, last, incidents):
            continue  # the same Event planned again on the next pass
        if ev.incident is not None:
            if await _post_incident(kube, key, body, ev):
                incidents.add(ev.incident)
                out_incidents.add(ev.incident)
            continue
        last[ev.reason] = out_last[ev.reason] = ev.message
        try:
            await kube.post_event(body, ev.type, ev.reason, ev.message)
        except ApiException as err:  # an Event is best effort
            log.warning("%s/%s: could not post Event %s: %s", *key, ev.reason, err.reason)
    return PostedEvents(out_last, frozenset(out_incidents))


async def _post_incident(
    kube: KubeClient, key: Key, body: Mapping[str, Any], ev: EventSpec
) -> bool:
    """Post an incident's Event under its own name, once: 409 means some process (this one
    before a restart, or another) already did. False: not posted (tried again on the next
    pass while the incident lasts)."""
    assert ev.incident is not None
    meta = body.get("metadata") or {}
    name = incident_event_name(str(meta.get("name", "")), str(meta.get("uid", "")), ev.incident)
    try:
        await kube.post_event(body, ev.type, ev.reason, ev.message, name=name)
    except ApiException as err:
        if err.status != 409:
            log.warning("%s/%s: could not post Event %s: %s", *key, ev.reason, err.reason)
            return False
    return True


def incident_event_name(dsi: str, uid: str, incident: str) -> str:
    """The Event name of one incident of one DSI object (the uid part keeps a recreated
    DSI of the same name from colliding with the old one's Events, kept for an hour)."""
    return f"{dsi}.{uid[:8]}.{incident}"


# --- pods and KubeRay ------------------------------------------------------------------------


def report_restarts(key: Key, p: Plan) -> None:
    """Count and log the restarts and re-forms the plan records (once: a restart in progress
    is planned as a ContinueRestart on later passes, not as a Restart)."""
    ns, name = key
    for r in p.restarts:
        metrics.RESTARTS.labels(namespace=ns, name=name, trigger=r.trigger).inc()
        log.warning("%s/%s: restarting group %d: %s %s", ns, name, r.group, r.trigger, r.reason)
    for rf in p.reforms:
        metrics.REFORMS.labels(namespace=ns, name=name).inc()
        log.warning("%s/%s: group %d re-forming in place: %s", ns, name, rf.group, rf.reason)


async def delete_pods(kube: KubeClient, key: Key, due: Sequence[PodDeletion]) -> list[str]:
    """Delete the pods that are due, each by UID; the UIDs of those deleted (a pod already
    gone or replaced is not). An API error other than those is raised: the status already
    records the restart, so the next pass deletes what is left."""
    deleted = []
    for d in due:
        if await kube.delete_pod(key[0], d.name, d.uid, force=d.force, grace=d.grace):
            deleted.append(d.uid)
    return deleted


async def nudge_kuberay(
    kube: KubeClient, key: Key, rayservice: Mapping[str, Any] | None, nudge: str
) -> bool:
    """Write ``nudge`` to the ``deepspeed.ai/nudge`` annotation of the RayService's
    RayClusters: the change makes KubeRay reconcile them (see
    ``plan.NUDGE_AFTER_SECONDS``). True when every cluster has it (the controller then
    does not write this value again)."""
    path = "/metadata/annotations/" + L.ANNOTATION_NUDGE.replace("/", "~1")
    for cluster in cluster_names(rayservice):
        try:
            await kube.patch_raycluster(
                key[0], cluster, [{"op": "add", "path": path, "value": nudge}]
            )
        except ApiException as err:
            log.warning("%s/%s: could not nudge RayCluster %s: %s", *key, cluster, err.reason)
            return False
        log.info("%s/%s: nudged KubeRay on RayCluster %s (%s)", *key, cluster, nudge)
    return True
