"""Keeping the running RayCluster in step with the RayService (pure): scaling by whole groups
without touching the others, and the templates of a rollout.

A scale-down keeps the removed groups in the RayService as worker groups at 0 replicas (see
:func:`dsi_operator.serving.render.group_capacity`). KubeRay compares a RayService with its
RayCluster ignoring replica counts (``GenerateHashWithoutReplicasAndWorkersToDelete``), so
such a change neither makes a new RayCluster (good: no pod of another group is replaced) nor
reaches the running one (KubeRay leaves replica counts to the autoscaler). The operator
therefore sets the replica counts of the running RayCluster itself.

The same holds for templates: under ``upgradeStrategy: None`` KubeRay carries no template
change over to the running RayCluster (only worker groups appended at the end, and only while
the RayCluster's recorded hash still matches). So the operator writes the RayService's worker
groups and head into the RayCluster itself (:func:`cluster_patch`), guarded by a ``test`` of
the RayCluster's resourceVersion: a concurrent change makes the patch fail (422) and the next
pass compares again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsi_operator.api import labels as L

_COUNTS = ("replicas", "minReplicas", "maxReplicas")


def previous_capacity(rayservice: Mapping[str, Any] | None, status: Mapping[str, Any]) -> int:
    """Groups the current RayService carries: its capacity annotation, else the groups the
    status lists (a RayService written before the annotation existed carries those)."""
    annotations = ((rayservice or {}).get("metadata") or {}).get("annotations") or {}
    try:
        recorded = int(annotations.get(L.ANNOTATION_GROUP_CAPACITY) or 0)
    except ValueError:
        recorded = 0
    return max(recorded, len(status.get("groups") or []))


def cluster_names(rayservice: Mapping[str, Any] | None) -> list[str]:
    """The RayClusters serving the RayService now: active, and pending during an upgrade."""
    st = (rayservice or {}).get("status") or {}
    names = [
        (st.get(k) or {}).get("rayClusterName")
        for k in ("activeServiceStatus", "pendingServiceStatus")
    ]
    return [n for n in names if n]


def _worker_signature(w: Mapping[str, Any]) -> tuple[Any, ...]:
    meta = (w.get("template") or {}).get("metadata") or {}
    h = (meta.get("annotations") or {}).get(L.ANNOTATION_GROUP_HASH)
    return (w.get("groupName"), h, *(w.get(k) for k in _COUNTS))


def _head_signature(head: Mapping[str, Any] | None) -> str | None:
    meta = ((head or {}).get("template") or {}).get("metadata") or {}
    return (meta.get("annotations") or {}).get(L.ANNOTATION_HEAD_HASH)


def cluster_patch(
    raycluster: Mapping[str, Any], rayservice: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """JSON patch making the RayCluster's worker groups (names, template hashes, replica
    counts) and head template those of the RayService; [] when they already are.

    Templates are compared by their hash annotations, which the operator's rendering sets on
    every template: fields the API server defaults never count as a difference.
    """
    want = rayservice["spec"]["rayClusterConfig"]
    want_workers = list(want.get("workerGroupSpecs") or [])
    spec = raycluster.get("spec") or {}
    have_workers = list(spec.get("workerGroupSpecs") or [])
    ops: list[dict[str, Any]] = []
    if [_worker_signature(w) for w in have_workers] != [_worker_signature(w) for w in want_workers]:
        op = "replace" if "workerGroupSpecs" in spec else "add"
        ops.append({"op": op, "path": "/spec/workerGroupSpecs", "value": want_workers})
    head = want.get("headGroupSpec")
    if head is not None and _head_signature(spec.get("headGroupSpec")) != _head_signature(head):
        ops.append({"op": "replace", "path": "/spec/headGroupSpec", "value": head})
    if not ops:
        return []
    rv = (raycluster.get("metadata") or {}).get("resourceVersion")
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}, *ops]
