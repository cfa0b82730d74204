"""Scaling by whole groups without touching the others (pure).

A scale-down keeps the removed groups in the RayService as worker groups at 0 replicas (see
:func:`dsi_operator.render.group_capacity`). KubeRay compares a RayService with its
RayCluster ignoring replica counts (``GenerateHashWithoutReplicasAndWorkersToDelete``), so
such a change neither makes a new RayCluster (good: no pod of another group is replaced) nor
reaches the running one (KubeRay leaves replica counts to the autoscaler). The operator
therefore sets the replica counts of the running RayCluster itself, with a JSON patch that
first tests each worker group's name at its index, so a concurrent change of the list by
KubeRay makes the patch fail (422) instead of scaling the wrong group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import labels as L

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


def replica_patch(
    raycluster: Mapping[str, Any], workers: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """JSON patch setting the RayCluster's worker-group replica counts to the rendered ones.

    Only worker groups present in both are touched; [] when nothing differs.
    """
    wanted = {w["groupName"]: w for w in workers}
    ops: list[dict[str, Any]] = []
    groups = (raycluster.get("spec") or {}).get("workerGroupSpecs") or []
    for i, current in enumerate(groups):
        name = current.get("groupName")
        w = wanted.get(name)
        if w is None or all(current.get(k) == w.get(k) for k in _COUNTS):
            continue
        ops.append({"op": "test", "path": f"/spec/workerGroupSpecs/{i}/groupName", "value": name})
        ops.extend(
            {"op": "add", "path": f"/spec/workerGroupSpecs/{i}/{k}", "value": w[k]}
            for k in _COUNTS
            if k in w
        )
    return ops
