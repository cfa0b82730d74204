"""Watched objects -> plain data: what one pass observes (pure, no API calls).

The kopf indexes and watch handlers keep raw objects; these functions turn them into the
plain values :func:`dsi_operator.serving.plan.plan` reads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from dsi_operator.api import labels as L
from dsi_operator.serving.restart import NodeInfo, PodInfo
from dsi_operator.serving.status import RayServiceView
from dsi_operator.util.timefmt import parse_time

#: Label KubeRay puts on every pod with its RayCluster's name.
RAY_CLUSTER_LABEL = "ray.io/cluster"


#: The "group" pod_info gives the head pod: the rollout reads its template hash.
HEAD_GROUP = -1


def pod_info(body: Mapping[str, Any]) -> tuple[int, PodInfo] | None:
    """(group, PodInfo) of a worker pod, (HEAD_GROUP, PodInfo) of the head pod (its
    ``group_hash`` is the head template's hash); None for foreign pods."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    gr = L.group_of_pod(labels)
    if gr is None and labels.get(L.LABEL_ROLE) == L.ROLE_HEAD:
        gr = (HEAD_GROUP, 0)
    if gr is None:
        return None
    g, r = gr
    hash_key = L.ANNOTATION_HEAD_HASH if g == HEAD_GROUP else L.ANNOTATION_GROUP_HASH
    status = body.get("status") or {}
    ready_cond = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    ready = any(c.get("status") == "True" for c in ready_cond)
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return g, PodInfo(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        rank=r,
        phase=status.get("phase") or "Pending",
        ready=ready,
        restart_count=restarts,
        reason=status.get("reason"),
        node_name=(body.get("spec") or {}).get("nodeName"),
        deletion_timestamp=parse_time(meta.get("deletionTimestamp")),
        ready_changed=parse_time(ready_cond[0].get("lastTransitionTime")) if ready_cond else None,
        group_hash=(meta.get("annotations") or {}).get(hash_key),
        cluster=(meta.get("labels") or {}).get(RAY_CLUSTER_LABEL),
    )


def node_summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Node that preflight and the restart logic read."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "spec": {
            "taints": copy.deepcopy(list(spec.get("taints") or [])),
            "unschedulable": bool(spec.get("unschedulable")),
        },
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "conditions": [
                {
                    "type": "Ready",
                    "status": c.get("status"),
                    "lastTransitionTime": c.get("lastTransitionTime"),
                }
                for c in ready
            ],
        },
    }


def node_info(summary: Mapping[str, Any]) -> NodeInfo:
    """Readiness of a node summary."""
    conds = summary["status"]["conditions"]
    ready = bool(conds) and conds[0].get("status") == "True"
    since = parse_time(conds[0].get("lastTransitionTime")) if conds else None
    return NodeInfo(name=summary["metadata"]["name"], ready=ready, since=since)


def rayservice_view(body: Mapping[str, Any] | None) -> RayServiceView:
    """Is the RayService ready, and which RayClusters does it run? KubeRay >= 1.3 sets a
    Ready condition; older ones ``status.serviceStatus: Running``."""
    if body is None:
        return RayServiceView()
    status = body.get("status") or {}
    active_status = status.get("activeServiceStatus") or {}
    active = active_status.get("rayClusterName") or None
    pending = (status.get("pendingServiceStatus") or {}).get("rayClusterName") or None
    serve = serve_group_statuses(active_status)
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            ok = c.get("status") == "True"
            msg = c.get("message") or c.get("reason") or ""
            return RayServiceView(True, ok, msg, active, pending, serve)
    if status.get("serviceStatus") == "Running":
        return RayServiceView(True, True, "serviceStatus Running", active, pending, serve)
    return RayServiceView(True, False, status.get("serviceStatus") or "", active, pending, serve)


def serve_group_statuses(service_status: Mapping[str, Any]) -> dict[int, str]:
    """Group index -> Serve status of its ``group-<g>`` deployment, from a KubeRay
    ``RayServiceStatus`` (``applicationStatuses.<app>.serveDeploymentStatuses``)."""
    apps = service_status.get("applicationStatuses") or {}
    deployments = (apps.get(L.SERVE_APP_NAME) or {}).get("serveDeploymentStatuses") or {}
    out: dict[int, str] = {}
    for name, st in deployments.items():
        prefix, _, index = str(name).partition("-")
        if prefix == "group" and index.isdigit():
            out[int(index)] = str((st or {}).get("status") or "")
    return out


def select_cluster_pods(pods: list[PodInfo], rs: RayServiceView) -> list[PodInfo]:
    """The pods of the RayCluster that counts: the active one (serving), else the pending one.

    During a KubeRay blue/green upgrade two RayClusters carry pods with the same group and
    rank labels; the groups of the serving cluster are the ones kept whole.
    """
    for name in (rs.active_cluster, rs.pending_cluster):
        if name and any(p.cluster == name for p in pods):
            return [p for p in pods if p.cluster == name]
    return pods


def children_current(
    rayservice: Mapping[str, Any] | None,
    services: set[str],
    wanted_services: set[str],
    want: str,
    *,
    applied_here: bool,
) -> tuple[bool, bool]:
    """(children exist, children up to date with spec hash ``want``).

    ``applied_here``: this process applied exactly these children already; the watch may
    still lag behind its own write, so services it has not seen yet are not a difference.
    """
    exists = rayservice is not None
    current = (
        rayservice is not None
        and rayservice["metadata"]["annotations"].get(L.ANNOTATION_SPEC_HASH) == want
        and services == wanted_services
    )
    if applied_here and exists:
        current = current or services >= wanted_services
    return exists, current
