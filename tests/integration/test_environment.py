"""The local control plane is real: schemas, scheduling, GPUs, garbage collection, KubeRay."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from dsi_localcluster.testing import pod_manifest
from dsi_localcluster.wait import namespace_state, pod_state, wait_for
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.integration


def test_nodes_look_like_gpu_operator_nodes(cluster: Any, kube: Any) -> None:
    nodes = {n.metadata.name: n for n in kube.core.list_node().items}
    for name in cluster.gpu_nodes:
        node = nodes[name]
        assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
        assert node.metadata.labels["nvidia.com/gpu.product"]
        assert node.metadata.labels["nvidia.com/gpu.count"] == str(cluster.gpus_per_node)
        assert node.status.allocatable["nvidia.com/gpu"] == str(cluster.gpus_per_node)
    for name in cluster.cpu_nodes:
        assert "nvidia.com/gpu" not in (nodes[name].status.allocatable or {})
        assert "nvidia.com/gpu.present" not in nodes[name].metadata.labels
    for name in cluster.gpu_nodes + cluster.cpu_nodes:
        ready = [c for c in nodes[name].status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True", name


def test_crd_schema_rejects_invalid_object(kube: Any, namespace: str) -> None:
    group = "envtest.localcluster.deepspeed.ai"
    plural = f"widgets{uuid.uuid4().hex[:6]}"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "plural": plural,
                "singular": plural[:-1] + "x",
                "kind": "Widget" + plural[-6:].upper().replace("0", "Z"),
                "listKind": "WidgetList" + plural[-6:].upper().replace("0", "Z"),
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas"],
                                    "properties": {"replicas": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    kube.apiext.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            got = kube.apiext.read_custom_resource_definition(crd["metadata"]["name"])
            return any(
                c.type == "Established" and c.status == "True" for c in got.status.conditions or []
            )

        wait_for(established, 30, "CRD Established")
        kind = crd["spec"]["names"]["kind"]

        def create(spec: dict[str, Any]) -> Any:
            body = {
                "apiVersion": f"{group}/v1",
                "kind": kind,
                "metadata": {"name": f"w{uuid.uuid4().hex[:6]}"},
                "spec": spec,
            }
            return kube.custom.create_namespaced_custom_object(group, "v1", namespace, plural, body)

        # The new resource may take a moment to be served after Established.
        wait_for(lambda: create({"replicas": 2}), 30, "a valid object to be accepted")
        for bad, expect in (
            ({"replicas": 0}, "should be greater than or equal to 1"),
            ({"replicas": "two"}, "must be of type integer"),
            ({}, "Required value"),
        ):
            with pytest.raises(ApiException) as err:
                create(bad)
            assert err.value.status == 422, err.value.body
            assert expect in err.value.body, err.value.body
    finally:
        kube.apiext.delete_custom_resource_definition(crd["metadata"]["name"])


def test_kuberay_crd_rejects_invalid_rayservice(kubectl: Any, namespace: str) -> None:
    proc = kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        check=False,
        input="""
apiVersion: ray.io/v1
kind: RayService
metadata: {name: bad}
spec:
  rayClusterConfig:
    headGroupSpec:
      rayStartParams: {}
      template: {spec: {containers: [{name: ray-head, image: x}]}}
    workerGroupSpecs:
    - groupName: g
      replicas: "many"
      rayStartParams: {}
      template: {spec: {containers: [{name: w, image: x}]}}
""",
    )
    assert proc.returncode != 0
    assert "replicas" in proc.stderr, proc.stderr


def _deployment(name: str, replicas: int) -> dict[str, Any]:
    pod = pod_manifest(name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod["spec"]},
        },
    }


def test_deployment_pods_are_scheduled_and_run(kube: Any, namespace: str) -> None:
    kube.apps.create_namespaced_deployment(namespace, _deployment("web", 3))

    def all_running() -> list[Any] | None:
        pods = kube.core.list_namespaced_pod(namespace, label_selector="app=web").items
        ok = len(pods) == 3 and all(p.status.phase == "Running" for p in pods)
        return pods if ok else None

    pods = wait_for(
        all_running, 60, "3 web pods Running", dump=lambda: namespace_state(kube.core, namespace)
    )
    node_names = {n.metadata.name for n in kube.core.list_node().items}
    for pod in pods:
        assert pod.spec.node_name in node_names
        assert pod.status.pod_ip, "kwok assigns pod IPs"
        ready = {c.type: c.status for c in pod.status.conditions}
        assert ready["Ready"] == "True"
    events = kube.core.list_namespaced_event(namespace, field_selector="reason=Scheduled").items
    assert len(events) >= 3
    assert all(
        e.reporting_component == "default-scheduler"
        or (e.source and e.source.component == "default-scheduler")
        for e in events
    )

    def deployment_available() -> bool:
        dep = kube.apps.read_namespaced_deployment("web", namespace)
        return dep.status.available_replicas == 3

    wait_for(deployment_available, 30, "Deployment available replicas = 3")


def test_gpu_pods_bind_to_gpu_nodes_and_overcommit_stays_pending(
    cluster: Any, kube: Any, namespace: str, running_pod: Any
) -> None:
    fits = running_pod("fits", gpus=cluster.gpus_per_node)
    assert fits.spec.node_name in cluster.gpu_nodes

    too_big = cluster.gpus_per_node + 1
    kube.core.create_namespaced_pod(namespace, pod_manifest("too-big", gpus=too_big))

    def failed_scheduling() -> Any:
        evs = kube.core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=too-big,reason=FailedScheduling"
        )
        return evs.items

    evs = wait_for(
        failed_scheduling,
        60,
        "FailedScheduling event for too-big",
        dump=lambda: pod_state(kube.core, namespace, "too-big"),
    )
    assert "nvidia.com/gpu" in evs[0].message, evs[0].message

    # The scheduler posts the event and the PodScheduled condition in separate writes.
    def scheduled_condition() -> Any:
        pod = kube.core.read_namespaced_pod("too-big", namespace)
        conds = {c.type: c for c in pod.status.conditions or []}
        return (pod, conds["PodScheduled"]) if "PodScheduled" in conds else None

    pod, cond = wait_for(
        scheduled_condition,
        30,
        "PodScheduled condition on too-big",
        dump=lambda: pod_state(kube.core, namespace, "too-big"),
    )
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None
    assert (cond.status, cond.reason) == ("False", "Unschedulable")


def test_deleting_owner_garbage_collects_children(kube: Any, namespace: str) -> None:
    owner = kube.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owner"}, "data": {"k": "v"}}
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    kube.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}}
    )
    kube.apps.create_namespaced_deployment(namespace, _deployment("gc", 2))

    def pods_running() -> bool:
        pods = kube.core.list_namespaced_pod(namespace, label_selector="app=gc").items
        return len(pods) == 2 and all(p.status.phase == "Running" for p in pods)

    wait_for(
        pods_running, 60, "gc pods Running", dump=lambda: namespace_state(kube.core, namespace)
    )

    kube.core.delete_namespaced_config_map("owner", namespace)
    kube.apps.delete_namespaced_deployment("gc", namespace, propagation_policy="Background")

    def child_gone() -> bool:
        try:
            kube.core.read_namespaced_config_map("child", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    def deployment_children_gone() -> bool:
        rs = kube.apps.list_namespaced_replica_set(namespace, label_selector="app=gc").items
        pods = kube.core.list_namespaced_pod(namespace, label_selector="app=gc").items
        return not rs and not pods

    wait_for(child_gone, 60, "the owned ConfigMap to be garbage-collected")
    wait_for(
        deployment_children_gone,
        60,
        "ReplicaSet and pods to be garbage-collected",
        dump=lambda: namespace_state(kube.core, namespace),
    )


RAYSERVICE = """
apiVersion: ray.io/v1
kind: RayService
metadata:
  name: tiny
spec:
  serveConfigV2: |
    applications:
    - name: app
      import_path: dsi_worker.app:build_app
      route_prefix: /
  rayClusterConfig:
    rayVersion: "2.60.0"
    headGroupSpec:
      rayStartParams:
        num-cpus: "0"
      template:
        spec:
          containers:
          - name: ray-head
            image: rayproject/ray:2.60.0
            resources:
              requests: {cpu: "1", memory: 2Gi}
              limits: {cpu: "1", memory: 2Gi}
    workerGroupSpecs:
    - groupName: gpu
      replicas: 2
      minReplicas: 2
      maxReplicas: 2
      rayStartParams: {}
      template:
        spec:
          nodeSelector:
            nvidia.com/gpu.present: "true"
          tolerations:
          - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
          containers:
          - name: ray-worker
            image: rayproject/ray:2.60.0
            resources:
              requests: {cpu: "1", memory: 2Gi}
              limits: {cpu: "1", memory: 2Gi, nvidia.com/gpu: "1"}
"""


def test_rayservice_yields_running_head_and_worker_pods(
    cluster: Any, kube: Any, kubectl: Any, namespace: str
) -> None:
    kubectl.apply(RAYSERVICE, namespace)

    def raycluster() -> Any:
        items = kube.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters")[
            "items"
        ]
        owned = [
            rc
            for rc in items
            if any(
                o["kind"] == "RayService" and o["name"] == "tiny"
                for o in rc["metadata"].get("ownerReferences", [])
            )
        ]
        return owned[0] if owned else None

    rc = wait_for(
        raycluster,
        60,
        "KubeRay to create the RayCluster of RayService tiny",
        dump=lambda: (
            kubectl("get", "rayservice", "tiny", "-n", namespace, "-o", "yaml", check=False).stdout
        ),
    )
    rc_name = rc["metadata"]["name"]

    def pods_running() -> list[Any] | None:
        pods = kube.core.list_namespaced_pod(
            namespace, label_selector=f"ray.io/cluster={rc_name}"
        ).items
        heads = [p for p in pods if p.metadata.labels.get("ray.io/node-type") == "head"]
        workers = [p for p in pods if p.metadata.labels.get("ray.io/node-type") == "worker"]
        ok = (
            len(heads) == 1 and len(workers) == 2 and all(p.status.phase == "Running" for p in pods)
        )
        return pods if ok else None

    pods = wait_for(
        pods_running,
        120,
        f"head and 2 worker pods of {rc_name} Running",
        dump=lambda: namespace_state(kube.core, namespace),
    )
    for pod in pods:
        if pod.metadata.labels["ray.io/node-type"] == "worker":
            assert pod.spec.node_name in cluster.gpu_nodes
            limits = pod.spec.containers[0].resources.limits
            assert limits["nvidia.com/gpu"] == "1"
        else:
            assert pod.spec.node_name in cluster.gpu_nodes + cluster.cpu_nodes
    # KubeRay also created the head Service the Serve endpoint hangs off.
    services = {s.metadata.name for s in kube.core.list_namespaced_service(namespace).items}
    assert any(s.endswith("head-svc") for s in services), services


def test_second_up_is_a_noop(cluster: Any) -> None:
    from dsi_localcluster import cluster as lc

    started = time.monotonic()
    assert lc.up(cluster.config) is False
    assert time.monotonic() - started < 15


def test_impersonated_service_account_is_subject_to_rbac(
    cluster: Any, kube: Any, kubectl: Any, namespace: str
) -> None:
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": "bot"}})
    sa = f"system:serviceaccount:{namespace}:bot"
    denied = kubectl("auth", "can-i", "list", "pods", "-n", namespace, f"--as={sa}", check=False)
    assert denied.stdout.strip() == "no"
    kube.rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
    )
    kube.rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "bot-reads-pods"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": namespace}],
        },
    )
    wait_for(
        lambda: (
            kubectl(
                "auth", "can-i", "list", "pods", "-n", namespace, f"--as={sa}", check=False
            ).stdout.strip()
            == "yes"
        ),
        30,
        "RBAC to allow bot",
    )
    # Token signing works: the API server issues a token for the account.
    token = kube.core.create_namespaced_service_account_token(
        "bot",
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
        ),
    )
    assert token.status.token.count(".") == 2
