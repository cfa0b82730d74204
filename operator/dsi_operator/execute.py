"""Carrying out a :class:`~dsi_operator.reconcile.Plan`, and nothing else.

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

from . import failpoints, metrics
from . import labels as L
from .reconcile import EventSpec, Plan
from .render import render_children
from .scaling import cluster_names, previous_capacity, replica_patch
from .workqueue import Key

if TYPE_CHECKING:
    from .controller import Controller, Parsed

log = logging.getLogger("dsi_operator")

#: Roles of the per-group children the controller tracks by name (in ``Controller.services``)
#: and deletes when their group goes away.
GROUP_CHILD_ROLES = frozenset({L.ROLE_MASTER_SERVICE, L.ROLE_NETWORK_POLICY})


async def ensure_children(
    ctrl: Controller, key: Key, body: Mapping[str, Any], parsed: Parsed
) -> None:
    """Apply the RayService and Services of a valid spec; delete master Services left over."""
    assert ctrl.kube is not None and parsed.spec is not None and parsed.spec_hash is not None
    uid = (body.get("metadata") or {}).get("uid", "")
    exists = key in ctrl.rayservices
    current = ctrl.rayservices.get(key)
    capacity = previous_capacity(current, body.get("status") or {})
    children = render_children(key[1], key[0], uid, parsed.spec, capacity)
    for child in children:
        await ctrl.kube.apply(child)
        if child["kind"] == L.RAYSERVICE_KIND:
            await _sync_cluster_replicas(ctrl, key, current, child)
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
    # shown it yet.)
    cleanups = (
        (ctrl.kube.list_master_services, ctrl.kube.delete_service),
        (ctrl.kube.list_network_policies, ctrl.kube.delete_network_policy),
    )
    for list_fn, delete_fn in cleanups if exists or body.get("status") else ():
        for child_name in await list_fn(*key):
            if child_name not in wanted:
                await delete_fn(key[0], child_name)
                ctrl.services.get(key, set()).discard(child_name)
    ctrl.applied[key] = (uid, parsed.spec_hash)
    log.info("%s/%s: children applied (spec hash %s, existed: %s)", *key, parsed.spec_hash, exists)


async def _sync_cluster_replicas(
    ctrl: Controller, key: Key, current: Mapping[str, Any] | None, rayservice: Mapping[str, Any]
) -> None:
    """Set the running RayClusters' worker-group replica counts to the RayService's: KubeRay
    does not carry a replicas-only change over (see :mod:`dsi_operator.scaling`). Only for a
    RayService that carries groups scaled away (the others never differ in counts)."""
    annotations = rayservice["metadata"].get("annotations") or {}
    if L.ANNOTATION_GROUP_CAPACITY not in annotations or ctrl.kube is None:
        return
    workers = rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs") or []
    for cluster in cluster_names(current):
        rc = await ctrl.kube.get_raycluster(key[0], cluster)
        ops = replica_patch(rc, workers) if rc is not None else []
        if ops:
            await ctrl.kube.patch_raycluster(key[0], cluster, ops)
            log.info("%s/%s: RayCluster %s worker replicas set (%d op(s))", *key, cluster, len(ops))


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
    for d in p.due():
        await ctrl.kube.delete_pod(ns, d.name, d.uid, force=d.force, grace=d.grace)


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
