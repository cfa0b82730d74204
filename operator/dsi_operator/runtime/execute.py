"""Carrying out a :class:`~dsi_operator.serving.plan.Plan`, and nothing else.

Every decision (which pods, forced or not, not before when) is made by the pure planner; this
module only writes, in the order that makes a crash at any point safe: children, the status
patch (it records a restart before any pod is deleted), Events, then pod deletions.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from dsi_operator.api import labels as L
from dsi_operator.runtime import failpoints, metrics
from dsi_operator.runtime.workqueue import Key
from dsi_operator.serving.plan import EventSpec, Plan
from dsi_operator.serving.render import Kept, parse_group_hashes, render_children
from dsi_operator.serving.scaling import cluster_names, cluster_patch, previous_capacity

if TYPE_CHECKING:
    from dsi_operator.runtime.controller import Controller, Parsed

log = logging.getLogger("dsi_operator")

#: Roles of the per-group children the controller tracks by name (in ``Controller.services``)
#: and deletes when their group goes away.
GROUP_CHILD_ROLES = frozenset({L.ROLE_MASTER_SERVICE, L.ROLE_NETWORK_POLICY})

#: Prefix of the spec hash recorded in ``Controller.applied`` when a pass applied a new
#: resource's RayService alone (``first``); the next pass applies the rest.
RAYSERVICE_ONLY = "rayservice-only:"


def children_for_pass(
    children: list[dict[str, Any]],
    applied: tuple[str, str] | None,
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
    if applied == (uid, RAYSERVICE_ONLY + spec_hash) and not kept:
        return children[1:]
    return children


async def ensure_children(
    ctrl: Controller,
    key: Key,
    body: Mapping[str, Any],
    parsed: Parsed,
    targets: tuple[frozenset[int], bool] | None = None,
    *,
    first: bool = False,
) -> None:
    """Apply the RayService and Services of a valid spec; delete master Services left over.

    ``targets``: (groups rendered at the spec, head rendered at the spec), from the rollout
    (:func:`dsi_operator.serving.plan.rollout_targets`); the other groups, and the head when
    False, keep the templates the current RayService carries. None: all at the spec.
    ``first``: a new resource's first pass, see :func:`children_for_pass`.
    """
    assert ctrl.kube is not None and parsed.spec is not None and parsed.spec_hash is not None
    uid = (body.get("metadata") or {}).get("uid", "")
    exists = key in ctrl.rayservices
    current = ctrl.rayservices.get(key)
    capacity = previous_capacity(current, body.get("status") or {})
    kept = await _kept_templates(ctrl, key, parsed, targets) if exists and targets else None
    children = render_children(key[1], key[0], uid, parsed.spec, capacity, kept)
    applied = ctrl.applied.get(key)
    todo = children_for_pass(
        children, applied, uid, parsed.spec_hash, first=first, kept=kept is not None
    )
    for child in todo:
        await ctrl.kube.apply(child)
        if child["kind"] == L.RAYSERVICE_KIND:
            await _sync_cluster(ctrl, key, current, child)
            # Record our own write so the pass does not wait for the watch to catch up; the
            # watch event that follows overwrites this with the real object.
            prev = ctrl.rayservices.get(key) or {}
            ctrl.rayservices[key] = {
                "metadata": {"annotations": dict(child["metadata"].get("annotations") or {})},
                "status": copy.deepcopy(prev.get("status") or {}),
            }
        elif child["metadata"]["labels"].get(L.LABEL_ROLE) in GROUP_CHILD_ROLES:
            ctrl.services.setdefault(key, set()).add(child["metadata"]["name"])
    wanted = {c["metadata"]["name"] for c in children}
    # Leftovers of removed groups, or policies of a spec that turned them off. A resource
    # with no status and no RayService is new (a same-named predecessor's children belong
    # to its uid and go with it): nothing to list, two calls saved per resource in a burst.
    # (No RayService alone is not enough: right after a start, the watch may not have
    # shown it yet.) A first pass of this process's that applied the RayService alone found
    # the resource new too.
    new = applied is not None and applied[0] == uid and applied[1].startswith(RAYSERVICE_ONLY)
    cleanups = (
        (ctrl.kube.list_master_services, ctrl.kube.delete_service),
        (ctrl.kube.list_network_policies, ctrl.kube.delete_network_policy),
    )
    for list_fn, delete_fn in cleanups if (exists or body.get("status")) and not new else ():
        for child_name in await list_fn(*key):
            if child_name not in wanted:
                await delete_fn(key[0], child_name)
                ctrl.services.get(key, set()).discard(child_name)
    ctrl.applied[key] = (uid, (RAYSERVICE_ONLY if first else "") + parsed.spec_hash)
    what = "RayService" if first else "children"
    log.info("%s/%s: %s applied (spec hash %s, existed: %s)", *key, what, parsed.spec_hash, exists)


async def _kept_templates(
    ctrl: Controller, key: Key, parsed: Parsed, targets: tuple[frozenset[int], bool]
) -> Kept | None:
    """The templates of the groups (and head) the rollout has not moved to the spec yet, read
    from the current RayService (the watch keeps only its annotations and status)."""
    assert ctrl.kube is not None and parsed.spec is not None
    groups, head_at_target = targets
    keep = {g for g in range(parsed.spec.replicas) if g not in groups}
    if not keep and head_at_target:
        return None
    current = await ctrl.kube.get_rayservice(key[0], L.rayservice_name(key[1]))
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
    ctrl: Controller, key: Key, current: Mapping[str, Any] | None, rayservice: Mapping[str, Any]
) -> None:
    """Write the RayService's worker groups and head into the running RayClusters: KubeRay
    carries neither replica counts nor (under upgradeStrategy None) templates over (see
    :mod:`dsi_operator.serving.scaling`)."""
    assert ctrl.kube is not None
    for cluster in cluster_names(current):
        for _ in range(3):
            rc = await ctrl.kube.get_raycluster(key[0], cluster)
            ops = cluster_patch(rc, rayservice) if rc is not None else []
            if not ops:
                break
            try:
                await ctrl.kube.patch_raycluster(key[0], cluster, ops)
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


async def execute(ctrl: Controller, key: Key, body: Mapping[str, Any], p: Plan) -> None:
    """Write the status patch, post new Events, delete the pods that are due."""
    ns, name = key
    if p.patch and not await _patch_status(ctrl, key, body, p):
        return
    if p.restarts:
        failpoints.hit(failpoints.AFTER_RESTART_RECORDED)
    metrics.set_phase(ns, name, p.status.get("phase"), p.status.get("readyReplicas"))
    await _post_events(ctrl, key, body, p)
    assert ctrl.kube is not None
    for r in p.restarts:
        metrics.RESTARTS.labels(namespace=ns, name=name, trigger=r.trigger).inc()
        log.warning("%s/%s: restarting group %d: %s %s", ns, name, r.group, r.trigger, r.reason)
    for rf in p.reforms:
        metrics.REFORMS.labels(namespace=ns, name=name).inc()
        log.warning("%s/%s: group %d re-forming in place: %s", ns, name, rf.group, rf.reason)
    for d in p.due():
        await ctrl.kube.delete_pod(ns, d.name, d.uid, force=d.force, grace=d.grace)
    await nudge_kuberay(ctrl, key, p)


async def nudge_kuberay(ctrl: Controller, key: Key, p: Plan) -> None:
    """Write the plan's nudge to the RayClusters' ``deepspeed.ai/nudge`` annotation, once per
    value: the change makes KubeRay reconcile them (see ``reconcile.NUDGE_AFTER_SECONDS``)."""
    if p.nudge is None or ctrl.nudged.get(key) == p.nudge or ctrl.kube is None:
        return
    path = "/metadata/annotations/" + L.ANNOTATION_NUDGE.replace("/", "~1")
    for cluster in cluster_names(ctrl.rayservices.get(key)):
        try:
            await ctrl.kube.patch_raycluster(
                key[0], cluster, [{"op": "add", "path": path, "value": p.nudge}]
            )
        except ApiException as err:
            log.warning("%s/%s: could not nudge RayCluster %s: %s", *key, cluster, err.reason)
            return
        log.info("%s/%s: nudged KubeRay on RayCluster %s (%s)", *key, cluster, p.nudge)
    ctrl.nudged[key] = p.nudge


async def _patch_status(ctrl: Controller, key: Key, body: Mapping[str, Any], p: Plan) -> bool:
    """Write the patch; False when the rest of the plan must not run (conflict, gone)."""
    assert ctrl.kube is not None and p.patch is not None
    # A patch that records a restart is conditional on the version it was planned from.
    rv = (body.get("metadata") or {}).get("resourceVersion") if p.restarts else None
    try:
        updated = await ctrl.kube.patch_dsi_status(*key, p.patch, rv)
    except ApiException as e:
        if e.status == 409:
            # Someone wrote in between: the next pass plans again on the new object.
            log.info("%s/%s: status conflict; replanning", *key)
            ctrl.kick(key, "conflict")
            return False
        if e.status == 404:
            return False
        raise
    metrics.STATUS_WRITES.inc()
    ctrl.dsis[key] = copy.deepcopy(updated)
    return True


async def _post_events(ctrl: Controller, key: Key, body: Mapping[str, Any], p: Plan) -> None:
    assert ctrl.kube is not None
    for ev in p.events:
        if ctrl.event_posted(key, ev):
            continue  # the same Event planned again on the next pass
        if ev.incident is not None:
            await _post_incident(ctrl, key, body, ev)
            continue
        ctrl.last_events[(key, ev.reason)] = ev.message
        try:
            await ctrl.kube.post_event(body, ev.type, ev.reason, ev.message)
        except ApiException as err:  # an Event is best effort
            log.warning("%s/%s: could not post Event %s: %s", *key, ev.reason, err.reason)


async def _post_incident(
    ctrl: Controller, key: Key, body: Mapping[str, Any], ev: EventSpec
) -> None:
    """Post an incident's Event under its own name, once: 409 means some process (this one
    before a restart, or another) already did."""
    assert ctrl.kube is not None and ev.incident is not None
    meta = body.get("metadata") or {}
    name = incident_event_name(str(meta.get("name", "")), str(meta.get("uid", "")), ev.incident)
    try:
        await ctrl.kube.post_event(body, ev.type, ev.reason, ev.message, name=name)
    except ApiException as err:
        if err.status != 409:
            log.warning("%s/%s: could not post Event %s: %s", *key, ev.reason, err.reason)
            return  # planned again on the next pass while the incident lasts
    ctrl.posted_incidents.setdefault(key, set()).add(ev.incident)


def incident_event_name(dsi: str, uid: str, incident: str) -> str:
    """The Event name of one incident of one DSI object (the uid part keeps a recreated
    DSI of the same name from colliding with the old one's Events, kept for an hour)."""
    return f"{dsi}.{uid[:8]}.{incident}"
