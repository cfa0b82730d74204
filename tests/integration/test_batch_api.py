"""DeepSpeedBatchInference on the real control plane with the real KubeRay.

The operator renders the RayJob (KubeRay then makes its RayCluster and pods on the kwok GPU
nodes), the rendezvous Services and the progress ConfigMap with its RBAC. The job's driver
cannot run on kwok nodes, so the test plays it: it gets a token for the run's ServiceAccount
(TokenRequest, as the head pod's projected token) and writes progress with it, which also
proves the Role lets the driver write that ConfigMap and nothing else.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from dsi_localcluster.builders import DSIWrapper
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import API_VERSION, BATCH_KIND, BATCH_PLURAL, GROUP, VERSION
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.integration


def batch_manifest(name: str, tp: int = 2, replicas: int = 2, **spec: Any) -> dict[str, Any]:
    """A batch run on the simulated GPU nodes: the cluster fields of the serving tests'
    resource (minus its serving-only ones) plus input and output."""
    base = DSIWrapper(name).on_simulated_gpus().tp(tp).replicas(replicas).spec()
    base.pop("restartPolicy", None)
    return {
        "apiVersion": API_VERSION,
        "kind": BATCH_KIND,
        "metadata": {"name": name},
        "spec": {
            **base,
            "input": {"claimName": "prompts", "path": "in/", "format": "jsonl"},
            "output": {"claimName": "results", "path": "run1"},
            **spec,
        },
    }


def _get(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(
        kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, BATCH_PLURAL, name)
    )


def _refusal(kube: Any, namespace: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as info:
        kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, BATCH_PLURAL, body)
    assert info.value.status == 422, info.value.body
    return str(info.value.body)


def test_bad_batch_specs_are_refused_naming_the_field(
    kube: Any, namespace: str, dsi_crd: None
) -> None:
    body = batch_manifest("bad")
    body["spec"]["input"] = {"path": "relative/without/claim"}
    assert "path is relative to the volume with claimName, absolute without" in _refusal(
        kube, namespace, body
    )
    body = batch_manifest("bad", replicas=0)
    assert "spec.replicas" in _refusal(kube, namespace, body)
    body = batch_manifest("bad")
    body["spec"]["output"]["path"] = "a/../../etc"
    assert "'..'" in _refusal(kube, namespace, body)
    body = batch_manifest("bad")
    body["spec"]["generation"] = {"temperature": 5}
    assert "spec.generation.temperature" in _refusal(kube, namespace, body)


def test_spec_is_immutable(kube: Any, namespace: str, dsi_crd: None) -> None:
    body = batch_manifest("frozen")
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, BATCH_PLURAL, body)
    with pytest.raises(ApiException) as info:
        kube.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, BATCH_PLURAL, "frozen", {"spec": {"batchSize": 3}}
        )
    assert info.value.status == 422
    assert "spec is immutable" in str(info.value.body)


def _driver_client(kube: Any, namespace: str, account: str) -> client.CoreV1Api:
    """A client that authenticates as ServiceAccount ``account`` (what the head pod has)."""
    req = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    )
    token = kube.core.create_namespaced_service_account_token(account, namespace, req).status.token
    base = kube.api.configuration
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert, cfg.verify_ssl = base.host, base.ssl_ca_cert, base.verify_ssl
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.CoreV1Api(client.ApiClient(cfg))


def _children_ready(kube: Any, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        rayjob = kube.custom.get_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayjobs", name
        )
    except ApiException:
        return None
    status = _get(kube, namespace, name).get("status") or {}
    return rayjob if status.get("observedGeneration") else None


def test_batch_run_renders_a_rayjob_and_reports_progress(
    kube: Any, namespace: str, operator: Any
) -> None:
    name = "sweep"
    body = batch_manifest(name, tp=2, replicas=2)
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, BATCH_PLURAL, body)
    rayjob = wait_for(
        lambda: _children_ready(kube, namespace, name), 60, "RayJob and status", operator.log_tail
    )
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        BATCH_KIND,
        name,
        True,
    )
    assert rayjob["spec"]["entrypoint"] == "python -m dsi_worker.batch"
    assert rayjob["spec"]["backoffLimit"] == 2
    groups = [w["groupName"] for w in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert groups == ["g0-r0", "g0-r1", "g1-r0", "g1-r1"]
    services = {s.metadata.name for s in kube.core.list_namespaced_service(namespace).items}
    assert {f"{name}-g0-rdzv", f"{name}-g1-rdzv"} <= services

    # KubeRay builds the cluster: 4 rank pods, labelled as batch pods (the serving
    # controller's pod index must never see them).
    def rank_pods() -> list[Any] | None:
        pods = kube.core.list_namespaced_pod(
            namespace, label_selector=f"deepspeed.ai/batch={name},deepspeed.ai/role=worker"
        ).items
        return pods if len(pods) == 4 else None

    pods = wait_for(rank_pods, 120, "KubeRay created the 4 rank pods", operator.log_tail)
    assert all("deepspeed.ai/inference" not in (p.metadata.labels or {}) for p in pods)
    env = {e.name: e.value for e in pods[0].spec.containers[0].env}
    assert env["MASTER_ADDR"].startswith(f"{name}-g") and "-rdzv." in env["MASTER_ADDR"]

    driver = _driver_client(kube, namespace, f"{name}-batch")
    data = {
        "rowsDone": "900",
        "rowsTotal": "2000",
        "rowsPerSecond": "12.34",
        "groupsAlive": "2",
        "shardsDone": "9",
        "shardsTotal": "20",
        "progressUpdatedAt": "2026-12-05T10:00:00Z",
    }
    driver.patch_namespaced_config_map(f"{name}-progress", namespace, {"data": data})
    with pytest.raises(ApiException) as info:
        driver.patch_namespaced_config_map("kube-root-ca.crt", namespace, {"data": {"x": "y"}})
    assert info.value.status == 403

    def progressed() -> dict[str, Any] | None:
        st = _get(kube, namespace, name).get("status") or {}
        return st if st.get("progress") == "900/2000 (45%)" else None

    st = wait_for(progressed, 30, "status shows the driver's progress", operator.log_tail)
    assert (st["rowsDone"], st["rowsTotal"], st["rowsPerSecond"]) == (900, 2000, "12.3")
    assert (st["groupsAlive"], st["shardsDone"], st["shardsTotal"]) == (2, 9, 20)
    assert st["phase"] in ("Pending", "Running")


def test_batch_run_finishing_is_reported_with_events(
    kube: Any, namespace: str, operator: Any
) -> None:
    """What KubeRay writes when the Ray job ends (jobDeploymentStatus Complete, jobStatus
    SUCCEEDED): phase Succeeded, condition Complete, a JobSucceeded Event. The test writes
    those status fields itself: the job cannot really run on kwok nodes."""
    name = "done"
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, BATCH_PLURAL, batch_manifest(name, tp=1, replicas=1)
    )
    wait_for(lambda: _children_ready(kube, namespace, name), 60, "RayJob", operator.log_tail)
    rj = kube.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name)
    status = copy.deepcopy(rj.get("status") or {})
    status.update(
        jobDeploymentStatus="Complete",
        jobStatus="SUCCEEDED",
        jobId="job-123",
        startTime="2026-12-05T10:00:00Z",
        endTime="2026-12-05T10:05:00Z",
    )
    kube.custom.patch_namespaced_custom_object_status(
        "ray.io", "v1", namespace, "rayjobs", name, {"status": status}
    )

    def succeeded() -> dict[str, Any] | None:
        st = _get(kube, namespace, name).get("status") or {}
        return st if st.get("phase") == "Succeeded" else None

    st = wait_for(succeeded, 30, "phase Succeeded", operator.log_tail)
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Complete"]["status"] == "True" and cond["Failed"]["status"] == "False"
    assert st["jobId"] == "job-123" and st["completionTime"] == "2026-12-05T10:05:00Z"

    def event() -> list[Any] | None:
        evs = kube.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}"
        ).items
        hits = [e for e in evs if e.reason == "JobSucceeded"]
        return hits or None

    hits = wait_for(event, 30, "JobSucceeded Event", operator.log_tail)
    assert hits[0].involved_object.kind == BATCH_KIND
