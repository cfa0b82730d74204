"""Several ranks per pod on the real control plane with kwok GPU nodes (4 x 8 GPUs): the API
server refuses a TP that is not a multiple of ranksPerPod; TP 16 as 8-GPU pods lands one pod
per node through the real scheduler, the status counts pods and ranks, and a failed pod
restarts its whole group (both pods) and no other; a pod larger than any node is reported by
preflight."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from dsi_localcluster import faults
from dsi_localcluster.harness import dsi_manifest, get_dsi, worker_pods
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.integration

TP, PER_POD, REPLICAS = 16, 8, 2


def _status(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(get_dsi(kube.custom, namespace, name).get("status") or {})


def _dump(kube: Any, namespace: str, name: str, op: Any) -> Callable[[], str]:
    def f() -> str:
        pods = {
            k: (p.metadata.name, p.status.phase, p.spec.node_name)
            for k, p in worker_pods(kube.core, namespace, name, live_only=False).items()
        }
        st = json.dumps(_status(kube, namespace, name), indent=1)[:4000]
        return f"status: {st}\npods: {pods}\noperator log:\n{op.log_tail(40)}"

    return f


def _create(kube: Any, namespace: str, body: dict[str, Any]) -> None:
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def test_api_server_refuses_tp_not_a_multiple_of_ranks_per_pod(
    kube: Any, namespace: str, dsi_crd: None
) -> None:
    with pytest.raises(ApiException) as err:
        _create(kube, namespace, dsi_manifest("odd", tp=4, replicas=1, ranksPerPod=3))
    assert err.value.status == 422
    assert "tensorParallelSize must be a multiple of ranksPerPod" in err.value.body


def _formed(kube: Any, namespace: str, name: str, op: Any) -> dict[tuple[int, int], Any]:
    def ok() -> dict[tuple[int, int], Any] | None:
        groups = _status(kube, namespace, name).get("groups") or []
        if len(groups) != REPLICAS or not all(g.get("members") for g in groups):
            return None
        pods = worker_pods(kube.core, namespace, name)
        running = all(p.status.phase == "Running" for p in pods.values())
        return pods if len(pods) == REPLICAS * TP // PER_POD and running else None

    return wait_for(ok, 180, "both groups formed", _dump(kube, namespace, name, op))


def test_whole_node_pods_are_placed_counted_and_restarted_as_a_group(
    kube: Any, namespace: str, operator: Any
) -> None:
    name = "big"
    _create(kube, namespace, dsi_manifest(name, tp=TP, replicas=REPLICAS, ranksPerPod=PER_POD))
    dump = _dump(kube, namespace, name, operator)
    pods = _formed(kube, namespace, name, operator)
    # Pods are keyed by their first rank: ranks 0-7 and 8-15 of each group.
    assert sorted(pods) == [(0, 0), (0, 8), (1, 0), (1, 8)], dump()
    for pod in pods.values():
        limits = pod.spec.containers[0].resources.limits
        assert limits["nvidia.com/gpu"] == str(PER_POD)
    # 8 GPUs each: the real scheduler can only put one such pod on each 8-GPU node.
    nodes = [p.spec.node_name for p in pods.values()]
    assert len(set(nodes)) == len(nodes), dump()

    st = _status(kube, namespace, name)
    for g in st["groups"]:
        assert (g["ranks"], g["pods"], len(g["members"])) == (TP, TP // PER_POD, 2), dump()
    cap = next(c for c in st["conditions"] if c["type"] == "GPUCapacity")
    assert cap["status"] == "True", cap
    assert "one group needs 2 rank pod(s) x 8 nvidia.com/gpu" in cap["message"]

    before = {k: p.metadata.uid for k, p in pods.items()}
    faults.fail_pod(kube.api, namespace, pods[(1, 8)].metadata.name, exit_code=137)

    def replaced() -> dict[tuple[int, int], Any] | None:
        now = worker_pods(kube.core, namespace, name)
        if len(now) != len(before) or any(p.status.phase != "Running" for p in now.values()):
            return None
        if any(now[(1, r)].metadata.uid == before[(1, r)] for r in (0, 8)):
            return None
        g1 = _status(kube, namespace, name)["groups"][1]
        return now if g1.get("restarts") == 1 and not g1.get("restartingSince") else None

    after = wait_for(replaced, 120, "group 1 replaced whole", dump)
    # Group 0 untouched: same pods, no restart.
    assert {k: after[k].metadata.uid for k in ((0, 0), (0, 8))} == {
        k: before[k] for k in ((0, 0), (0, 8))
    }
    assert _status(kube, namespace, name)["groups"][0]["restarts"] == 0


def test_a_pod_larger_than_any_node_is_reported_by_preflight(
    kube: Any, namespace: str, operator: Any
) -> None:
    name = "huge"
    _create(kube, namespace, dsi_manifest(name, tp=16, replicas=1, ranksPerPod=16))

    def capacity() -> dict[str, Any] | None:
        for c in _status(kube, namespace, name).get("conditions") or []:
            if c["type"] == "GPUCapacity" and c["reason"] == "PodDoesNotFitANode":
                return dict(c)
        return None

    c = wait_for(
        capacity, 60, "GPUCapacity PodDoesNotFitANode", _dump(kube, namespace, name, operator)
    )
    assert c["status"] == "False"
    assert "needs 16 nvidia.com/gpu on one node" in c["message"]
    assert "largest matching node has 8" in c["message"]
