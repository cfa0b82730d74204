"""Scaling by whole groups on the real control plane (kwok GPU nodes, real KubeRay):
`kubectl scale dsi` up, down and up again adds or removes one group's pods and leaves the other
groups' pods (same UIDs) and the one RayCluster alone; an HPA targeting the scale subresource
is accepted and acts (the real HPA controller raises replicas to its minReplicas)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from dsi_localcluster.harness import dsi_manifest, formed_pods, get_dsi, ray_clusters, worker_pods
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration

TP = 2


def _clusters(kube: Any, namespace: str, name: str) -> list[str]:
    return ray_clusters(kube.custom, namespace, name)


def _dump(kube: Any, namespace: str, name: str, op: Any) -> Callable[[], str]:
    def f() -> str:
        pods = {
            k: (p.metadata.name, p.status.phase)
            for k, p in worker_pods(kube.core, namespace, name).items()
        }
        st = json.dumps(get_dsi(kube.custom, namespace, name).get("status") or {})[:3000]
        clusters = _clusters(kube, namespace, name)
        return f"pods {pods}\nclusters {clusters}\nstatus {st}\n{op.log_tail(40)}"

    return f


def _scale(kube: Any, namespace: str, name: str, replicas: int) -> None:
    """What `kubectl scale dsi NAME --replicas N` does: write the scale subresource."""
    kube.custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": replicas}}
    )


def _uids(kube: Any, namespace: str, name: str) -> dict[tuple[int, int], str]:
    return {k: p.metadata.uid for k, p in worker_pods(kube.core, namespace, name).items()}


def _settled(
    kube: Any, namespace: str, name: str, replicas: int, dump: Callable[[], str]
) -> dict[tuple[int, int], str]:
    def ok() -> dict[tuple[int, int], str] | None:
        if formed_pods(kube.custom, kube.core, namespace, name, TP, replicas) is None:
            return None
        uids = _uids(kube, namespace, name)
        return uids if {g for g, _ in uids} == set(range(replicas)) else None

    return wait_for(ok, 180, f"{replicas} groups formed and no others", dump)


def test_scale_up_down_up_touches_only_the_scaled_group(
    kube: Any, namespace: str, operator: Any
) -> None:
    name = "scaled"
    body = dsi_manifest(name, tp=TP, replicas=2)
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    dump = _dump(kube, namespace, name, operator)
    two = _settled(kube, namespace, name, 2, dump)
    clusters = _clusters(kube, namespace, name)
    assert len(clusters) == 1, dump()

    _scale(kube, namespace, name, 3)
    three = _settled(kube, namespace, name, 3, dump)
    assert {k: three[k] for k in two} == two, "groups 0-1 pods replaced by a scale-up"

    _scale(kube, namespace, name, 2)
    down = _settled(kube, namespace, name, 2, dump)
    assert down == two, "groups 0-1 pods replaced by a scale-down"

    _scale(kube, namespace, name, 3)
    again = _settled(kube, namespace, name, 3, dump)
    assert {k: again[k] for k in two} == two, "groups 0-1 pods replaced by scaling back up"
    assert {again[(2, r)] for r in range(TP)}.isdisjoint({three[(2, r)] for r in range(TP)})
    # One RayCluster throughout: never a second, GPU-doubling one.
    assert _clusters(kube, namespace, name) == clusters, dump()
    st = get_dsi(kube.custom, namespace, name)["status"]
    assert [g["restarts"] for g in st["groups"]] == [0, 0, 0], dump()


def test_an_hpa_targeting_the_scale_subresource_acts(
    kube: Any, namespace: str, operator: Any
) -> None:
    from kubernetes import client

    name = "hpa"
    body = dsi_manifest(name, tp=TP, replicas=1)
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    dump = _dump(kube, namespace, name, operator)
    one = _settled(kube, namespace, name, 1, dump)
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "DeepSpeedInference",
                "name": name,
            },
            "minReplicas": 2,
            "maxReplicas": 4,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 80},
                    },
                }
            ],
        },
    }
    client.AutoscalingV2Api(kube.api).create_namespaced_horizontal_pod_autoscaler(namespace, hpa)
    # No metrics server here: the HPA controller still enforces minReplicas through the scale
    # subresource (it clamps before it reads metrics).
    two = _settled(kube, namespace, name, 2, dump)
    assert get_dsi(kube.custom, namespace, name)["spec"]["replicas"] == 2
    assert {k: two[k] for k in one} == one, "group 0 pods replaced by the HPA's scale-up"
