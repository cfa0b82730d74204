"""The operator against the real local control plane: apply, columns, preflight, updates,
deletion, validation, and the no-write idle loop. Restart triggers: test_operator_restarts.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from dsi_localcluster.harness import all_running, dsi_manifest, get_dsi, worker_pods
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.integration


def create(kube: Any, namespace: str, body: dict[str, Any]) -> None:
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def status(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(get_dsi(kube.custom, namespace, name).get("status") or {})


def conditions(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in st.get("conditions") or []}


def dump(kube: Any, namespace: str, name: str, op: Any) -> Any:
    def f() -> str:
        try:
            st = json.dumps(status(kube, namespace, name), indent=1)[:4000]
        except ApiException as e:
            st = f"DSI unreadable: {e.status}"
        pods = {
            k: (p.metadata.name, p.status.phase, p.spec.node_name)
            for k, p in worker_pods(kube.core, namespace, name, live_only=False).items()
        }
        return f"status: {st}\npods: {pods}\noperator log:\n{op.log_tail(40)}"

    return f


def has_kopf_keys(meta: Any) -> list[str]:
    keys = list((meta.annotations or {}).keys()) + list((meta.labels or {}).keys())
    keys += list(meta.finalizers or [])
    return [k for k in keys if "kopf" in k]


def test_apply_creates_rayservice_services_and_gpu_pods(
    kube: Any, kubectl: Any, namespace: str, operator: Any, cluster: Any
) -> None:
    name = "demo"
    create(kube, namespace, dsi_manifest(name, tp=2, replicas=2))
    d = dump(kube, namespace, name, operator)

    rs = wait_for(lambda: _get_rs(kube, namespace, name), 60, "RayService created", d)
    owner = rs["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "DeepSpeedInference" and owner["name"] == name
    assert not [k for k in rs["metadata"].get("annotations", {}) if "kopf" in k]

    def master_services() -> dict[int, Any] | None:
        svcs = {s.metadata.name: s for s in kube.core.list_namespaced_service(namespace).items}
        found = {g: svcs.get(f"{name}-g{g}-master") for g in (0, 1)}
        return found if all(found.values()) else None

    services = wait_for(master_services, 30, "master Services created", d)
    for g in (0, 1):
        svc = services[g]
        assert svc.spec.selector["deepspeed.ai/group"] == str(g)
        assert svc.spec.selector["deepspeed.ai/rank"] == "0"
        assert svc.spec.publish_not_ready_addresses is True
        assert svc.metadata.owner_references[0].name == name
        assert not has_kopf_keys(svc.metadata)

    pods = wait_for(
        lambda: (lambda p: p if all_running(p, 2, 2) else None)(
            worker_pods(kube.core, namespace, name)
        ),
        120,
        "4 worker pods Running",
        d,
    )
    for (g, r), pod in pods.items():
        assert pod.spec.node_name in cluster.gpu_nodes, pod.spec.node_name
        env = {e.name: e.value for e in pod.spec.containers[0].env if e.value is not None}
        assert env["RANK"] == str(r)
        assert env["WORLD_SIZE"] == "2"
        assert env["LOCAL_RANK"] == "0"
        assert env["MASTER_ADDR"] == f"{name}-g{g}-master.{namespace}.svc.cluster.local"
        assert env["MASTER_PORT"] == "29500"
        assert env["DSI_GROUP"] == str(g)
        limits = pod.spec.containers[0].resources.limits
        assert limits["nvidia.com/gpu"] == "1"
        assert not has_kopf_keys(pod.metadata)

    st = wait_for(
        lambda: (lambda s: s if s.get("phase") == "Forming" else None)(
            status(kube, namespace, name)
        ),
        60,
        "phase Forming",
        d,
    )
    assert "waiting for Ray Serve" in st["message"]
    assert st["ready"] == "0/2" and st["readyReplicas"] == 0
    assert st["endpoint"] == f"http://{name}-api.{namespace}.svc.cluster.local:8000"
    c = conditions(st)
    assert c["KubeRayAvailable"]["status"] == "True"
    assert c["GPUCapacity"]["status"] == "True"
    assert c["RayServiceReady"]["status"] == "False"
    assert c["GroupsFormed"]["status"] == "False"
    assert [g["readyRanks"] for g in st["groups"]] == [2, 2]
    dsi = get_dsi(kube.custom, namespace, name)
    assert not [k for k in dsi["metadata"].get("annotations", {}) if "kopf" in k]
    assert not dsi["metadata"].get("finalizers")

    out = kubectl("get", "dsi", "-n", namespace).stdout
    header = out.splitlines()[0].split()
    for col in ("NAME", "PHASE", "READY", "TP", "RESTARTS", "ENDPOINT", "AGE"):
        assert col in header, out
    row = out.splitlines()[1]
    assert "Forming" in row and "0/2" in row and f"{name}-api" in row, out


def _get_rs(kube: Any, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return dict(
            kube.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", name)
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_idle_operator_writes_nothing(kube: Any, namespace: str, operator: Any) -> None:
    name = "idle"
    create(kube, namespace, dsi_manifest(name, tp=1, replicas=1))
    d = dump(kube, namespace, name, operator)
    wait_for(lambda: status(kube, namespace, name).get("phase") == "Forming", 120, "Forming", d)
    time.sleep(3)  # let the last watch events settle

    def writes() -> float:
        m = operator.metrics()
        return sum(
            v
            for k, v in m.items()
            if k.startswith("dsi_operator_api_requests_total")
            and any(f'verb="{w}"' in k for w in ("patch", "apply", "create", "delete"))
        )

    before = writes()
    rv = get_dsi(kube.custom, namespace, name)["metadata"]["resourceVersion"]
    time.sleep(10)  # ten ticker passes at 1 s
    assert writes() == before, operator.log_tail()
    assert get_dsi(kube.custom, namespace, name)["metadata"]["resourceVersion"] == rv


def test_spec_update_rerenders_and_scale_down_cleans(
    kube: Any, namespace: str, operator: Any
) -> None:
    """A spec change re-renders the RayService (every worker template carries it, with a new
    group hash) without counting a restart; scaling down removes group 1's Service and pods.

    Rolling the pods onto the new template is KubeRay's job (a RayService with upgrade
    strategy NewCluster starts a new RayCluster and switches over once Serve is healthy). In
    the simulated cluster no Ray runs, KubeRay's RayService reconcile stops at the Serve
    step and never prepares the new cluster, so the pod roll itself is not observable here;
    the operator's part of it (re-form on the new cluster without counting a failure) is
    covered by tests/unit/test_status.py::test_kuberay_cluster_switch_is_a_roll_not_a_failure.
    """
    name = "roll"
    create(kube, namespace, dsi_manifest(name, tp=2, replicas=2))
    d = dump(kube, namespace, name, operator)
    wait_for(lambda: status(kube, namespace, name).get("phase") == "Forming", 120, "Forming", d)
    hashes_before = [g["hash"] for g in status(kube, namespace, name)["groups"]]

    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"spec": {"env": [{"name": "EXTRA", "value": "1"}]}},
    )

    def rerendered() -> bool:
        rs = _get_rs(kube, namespace, name) or {}
        workers = rs.get("spec", {}).get("rayClusterConfig", {}).get("workerGroupSpecs", [])
        return len(workers) == 4 and all(
            {"name": "EXTRA", "value": "1"} in w["template"]["spec"]["containers"][0]["env"]
            for w in workers
        )

    wait_for(rerendered, 60, "RayService re-rendered with the new env", d)
    gen = get_dsi(kube.custom, namespace, name)["metadata"]["generation"]
    st = wait_for(
        lambda: (lambda s: s if s.get("observedGeneration") == gen else None)(
            status(kube, namespace, name)
        ),
        60,
        "status observes the new generation",
        d,
    )
    assert [g["hash"] for g in st["groups"]] != hashes_before
    assert st["restarts"] == 0, "a spec change is not a failure restart"

    # Scale down: the operator deletes group 1's master Service and stops reporting it; group
    # 1's worker groups stay at 0 replicas (removing them would make KubeRay build a second
    # RayCluster and replace group 0's pods too).
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": 1}}
    )

    def scaled() -> bool:
        svcs = {s.metadata.name for s in kube.core.list_namespaced_service(namespace).items}
        st = status(kube, namespace, name)
        return (
            f"{name}-g1-master" not in svcs
            and f"{name}-g0-master" in svcs
            and st.get("replicas") == 1
            and len(st.get("groups") or []) == 1
        )

    wait_for(scaled, 60, "group 1 removed", d)
    rs = _get_rs(kube, namespace, name) or {}
    groups = {
        w["groupName"]: w["replicas"] for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    assert groups == {"g0-r0": 1, "g0-r1": 1, "g1-r0": 0, "g1-r1": 0}
    assert rs["metadata"]["annotations"]["deepspeed.ai/group-capacity"] == "2"


def test_deletion_leaves_nothing_behind(kube: Any, namespace: str, operator: Any) -> None:
    name = "gone"
    create(kube, namespace, dsi_manifest(name, tp=2, replicas=1))
    d = dump(kube, namespace, name, operator)
    wait_for(lambda: all_running(worker_pods(kube.core, namespace, name), 2, 1), 120, "pods", d)
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def empty() -> bool:
        sel = f"deepspeed.ai/inference={name}"
        pods = kube.core.list_namespaced_pod(namespace, label_selector=sel).items
        svcs = kube.core.list_namespaced_service(namespace, label_selector=sel).items
        rs = kube.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayservices")[
            "items"
        ]
        rc = kube.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters")[
            "items"
        ]
        return not pods and not svcs and not rs and not rc

    wait_for(empty, 120, "every child garbage-collected", d)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"tensorParallelSize": 0}, "spec.tensorParallelSize"),
        ({"replicas": -1}, "spec.replicas"),
        ({"model": {"dtype": "float8"}}, "spec.model.dtype"),
        ({"restartPolicy": {"maxRestarts": -2}}, "spec.restartPolicy.maxRestarts"),
        ({"serve": {"apiKeySecret": {"name": "Bad_Name"}}}, "spec.serve.apiKeySecret.name"),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "spec.env[1]"),
    ],
)
def test_invalid_specs_are_rejected_naming_the_field(
    kubectl: Any, namespace: str, dsi_crd: None, patch: dict[str, Any], field: str
) -> None:
    body = dsi_manifest("bad", **patch)
    proc = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body), check=False)
    assert proc.returncode != 0
    assert field in proc.stderr, proc.stderr


def test_too_few_gpus_is_reported(kube: Any, namespace: str, operator: Any) -> None:
    name = "huge"
    # 16 GPUs per rank: no simulated node has that many, so not even one rank fits.
    create(kube, namespace, dsi_manifest(name, tp=2, replicas=1, resources={"gpus": 16}))
    d = dump(kube, namespace, name, operator)

    def insufficient() -> dict[str, Any] | None:
        st = status(kube, namespace, name)
        c = conditions(st).get("GPUCapacity")
        return st if c and c["status"] == "False" else None

    st = wait_for(insufficient, 60, "GPUCapacity False", d)
    c = conditions(st)["GPUCapacity"]
    assert c["reason"] == "Insufficient"
    assert "needs 2 rank pod(s) x 16 nvidia.com/gpu" in c["message"]
    assert st["phase"] in ("Provisioning", "Pending")
    assert "insufficient GPUs" in st["message"]

    # The operator patches status before it posts Events, so the Event may come a bit later.
    def preflight_event() -> bool:
        events = kube.core.list_namespaced_event(namespace).items
        return any(e.reason == "Preflight" and "GPUCapacity=False" in e.message for e in events)

    assert wait_for(preflight_event, 30, "Preflight Event naming GPUCapacity=False", d)
