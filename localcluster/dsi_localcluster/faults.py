"""Failure injection: change pods and nodes the way a kubelet (or a dying node) would.

Pod faults write the pod's status through the status subresource, exactly as a kubelet
reports a container exit. kwok's default pod stages only act on Pending pods and on pods
being deleted, so a Running pod whose status we rewrite stays as written.

Node faults: set_node_not_ready marks the node with manifests.NODE_FAULT_ANNOTATION, which
the cluster's kwok node stages exclude, and then reports Ready=False (a kubelet that is alive
but unhealthy; kwok keeps renewing the Lease). lose_node removes kwok's management
annotation too and takes the node's Lease away from kwok, so nothing heartbeats the node
any more and kube-controller-manager's node lifecycle controller marks it Unknown after its
grace period (a node that vanished).

Every function takes a kubernetes ApiClient, a CoreV1Api, or a kubeconfig path.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cluster, config, manifests, procnodes
from .timestamps import rfc3339

STUCK_FINALIZER = "localcluster.deepspeed.ai/stuck-terminating"


def core_api(target: Any) -> Any:
    """CoreV1Api from an ApiClient, a CoreV1Api, a kubeconfig path, or None (.cluster)."""
    from kubernetes import client
    from kubernetes import config as kconfig

    if isinstance(target, client.CoreV1Api):
        return target
    if isinstance(target, client.ApiClient):
        return client.CoreV1Api(target)
    path = Path(target) if target is not None else config.ClusterConfig.from_env().kubeconfig
    return client.CoreV1Api(kconfig.new_client_from_config(str(path)))  # type: ignore[no-untyped-call]


def _read_raw(call: Callable[..., Any], *args: str) -> dict[str, Any]:
    # Raw JSON keeps every field (the typed models drop unknown ones on round trips).
    resp = call(*args, _preload_content=False)
    data: dict[str, Any] = json.loads(resp.data)
    return data


def _update_status(
    read: Callable[..., Any],
    replace: Callable[..., Any],
    args: tuple[str, ...],
    mutate: Callable[[dict[str, Any]], None],
    retries: int = 10,
) -> dict[str, Any]:
    """Read, mutate, replace the status subresource; retry on write conflicts."""
    from kubernetes.client.exceptions import ApiException

    for attempt in range(retries):
        obj = _read_raw(read, *args)
        mutate(obj)
        try:
            replace(*args, obj, _preload_content=False)
            return obj
        except ApiException as exc:
            if exc.status != 409 or attempt == retries - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _pod_status_call(
    core: Any, namespace: str, name: str, mutate: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    return _update_status(
        core.read_namespaced_pod_status,
        core.replace_namespaced_pod_status,
        (name, namespace),
        mutate,
    )


def _set_condition(
    conditions: list[dict[str, Any]],
    ctype: str,
    status: str,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    now = rfc3339()
    for cond in conditions:
        if cond.get("type") == ctype:
            if cond.get("status") != status:
                cond["lastTransitionTime"] = now
            cond["status"] = status
            break
    else:
        cond = {"type": ctype, "status": status, "lastTransitionTime": now}
        conditions.append(cond)
    for key, value in (("reason", reason), ("message", message)):
        if value is None:
            cond.pop(key, None)
        else:
            cond[key] = value


def _container_statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Existing container statuses, with an entry for every spec container."""
    status = pod.setdefault("status", {})
    by_name = {c["name"]: c for c in status.get("containerStatuses") or []}
    out = []
    for spec in pod["spec"]["containers"]:
        out.append(
            by_name.get(spec["name"])
            or {
                "name": spec["name"],
                "image": spec["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}},
            }
        )
    status["containerStatuses"] = out
    return out


def _check_container(pod: dict[str, Any], container: str | None) -> None:
    names = [c["name"] for c in pod["spec"]["containers"]]
    if container is not None and container not in names:
        raise ValueError(
            f"pod {pod['metadata']['name']} has no container {container!r} (has {', '.join(names)})"
        )


def fail_pod(
    api: Any,
    namespace: str,
    name: str,
    exit_code: int = 1,
    reason: str = "Error",
    message: str = "injected failure",
    container: str | None = None,
) -> dict[str, Any]:
    """Report the pod as a kubelet does when its container exited and will not restart:
    phase Failed, the container (default: all) terminated with exit_code, Ready=False."""
    core = core_api(api)

    def mutate(pod: dict[str, Any]) -> None:
        _check_container(pod, container)
        now = rfc3339()
        for cs in _container_statuses(pod):
            running = (cs.get("state") or {}).get("running") or {}
            if container is None or cs["name"] == container:
                cs["state"] = {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason,
                        "message": message,
                        "startedAt": running.get("startedAt", now),
                        "finishedAt": now,
                        **({"containerID": cs["containerID"]} if cs.get("containerID") else {}),
                    }
                }
                cs["ready"] = False
                cs["started"] = False
        status = pod["status"]
        status["phase"] = "Failed"
        conditions = status.setdefault("conditions", [])
        _set_condition(conditions, "Ready", "False", "PodFailed")
        _set_condition(conditions, "ContainersReady", "False", "PodFailed")

    return _pod_status_call(core, namespace, name, mutate)


def restart_container(
    api: Any,
    namespace: str,
    name: str,
    container: str | None = None,
    exit_code: int = 1,
    reason: str = "Error",
) -> dict[str, Any]:
    """Report that a container exited and the kubelet restarted it: restartCount + 1,
    lastState terminated with exit_code, state running again. Default: the first container."""
    core = core_api(api)

    def mutate(pod: dict[str, Any]) -> None:
        _check_container(pod, container)
        target = container or pod["spec"]["containers"][0]["name"]
        now = rfc3339()
        for cs in _container_statuses(pod):
            if cs["name"] != target:
                continue
            running = (cs.get("state") or {}).get("running") or {}
            cs["lastState"] = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason,
                    "startedAt": running.get("startedAt", now),
                    "finishedAt": now,
                    **({"containerID": cs["containerID"]} if cs.get("containerID") else {}),
                }
            }
            cs["state"] = {"running": {"startedAt": now}}
            cs["restartCount"] = int(cs.get("restartCount") or 0) + 1
            cs["ready"] = True
            cs["started"] = True

    return _pod_status_call(core, namespace, name, mutate)


def evict_pod(api: Any, namespace: str, name: str) -> None:
    """Evict through the Eviction API (what `kubectl drain` and node-pressure eviction use);
    honours PodDisruptionBudgets."""
    from kubernetes import client

    core = core_api(api)
    body = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=namespace))
    core.create_namespaced_pod_eviction(name, namespace, body)


def delete_pod(api: Any, namespace: str, name: str, grace_seconds: int | None = None) -> None:
    """Delete a pod (kwok finishes the deletion as a kubelet would)."""
    core_api(api).delete_namespaced_pod(name, namespace, grace_period_seconds=grace_seconds)


def stuck_terminating(api: Any, namespace: str, name: str) -> None:
    """Delete the pod but keep it in Terminating (deletionTimestamp set, object present),
    as when the kubelet of a partitioned node never confirms. Undo with release_pod."""
    core = core_api(api)
    core.patch_namespaced_pod(
        name,
        namespace,
        [{"op": "add", "path": "/metadata/finalizers/-", "value": STUCK_FINALIZER}]
        if _read_raw(core.read_namespaced_pod, name, namespace)["metadata"].get("finalizers")
        else [{"op": "add", "path": "/metadata/finalizers", "value": [STUCK_FINALIZER]}],
    )
    core.delete_namespaced_pod(name, namespace)


def release_pod(api: Any, namespace: str, name: str) -> None:
    """Remove the finalizer stuck_terminating added, letting the deletion finish."""
    from kubernetes.client.exceptions import ApiException

    core = core_api(api)
    try:
        pod = _read_raw(core.read_namespaced_pod, name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    finalizers = pod["metadata"].get("finalizers") or []
    if STUCK_FINALIZER in finalizers:
        idx = finalizers.index(STUCK_FINALIZER)
        core.patch_namespaced_pod(
            name,
            namespace,
            [
                {"op": "test", "path": f"/metadata/finalizers/{idx}", "value": STUCK_FINALIZER},
                {"op": "remove", "path": f"/metadata/finalizers/{idx}"},
            ],
        )


def _node_status(core: Any, node: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    _update_status(core.read_node_status, core.replace_node_status, (node,), mutate)


def _annotate_node(core: Any, node: str, key: str, value: str | None) -> None:
    core.patch_node(node, {"metadata": {"annotations": {key: value}}})


def set_node_not_ready(
    api: Any,
    node: str,
    reason: str = "KubeletNotReady",
    message: str = "injected: container runtime is down",
) -> None:
    """Report Ready=False for node as its kubelet would, and keep it so (kwok's node stages
    skip nodes with the fault annotation). kube-controller-manager then taints the node
    node.kubernetes.io/not-ready and marks its pods NotReady. Undo with set_node_ready."""
    core = core_api(api)
    _annotate_node(core, node, manifests.NODE_FAULT_ANNOTATION, "true")

    def mutate(obj: dict[str, Any]) -> None:
        conditions = obj.setdefault("status", {}).setdefault("conditions", [])
        _set_condition(conditions, "Ready", "False", reason, message)
        for cond in conditions:
            if cond.get("type") == "Ready":
                cond["lastHeartbeatTime"] = rfc3339()

    _node_status(core, node, mutate)


def set_node_ready(api: Any, node: str) -> None:
    """Undo set_node_not_ready / lose_node: kwok manages and heartbeats the node again and
    it reports Ready=True."""
    core = core_api(api)
    core.patch_node(
        node,
        {
            "metadata": {
                "annotations": {
                    manifests.NODE_FAULT_ANNOTATION: None,
                    config.KWOK_NODE_ANNOTATION: config.KWOK_NODE_ANNOTATION_VALUE,
                }
            }
        },
    )
    _set_lease_holder(core, node, None)

    def mutate(obj: dict[str, Any]) -> None:
        conditions = obj.setdefault("status", {}).setdefault("conditions", [])
        _set_condition(
            conditions, "Ready", "True", "KubeletReady", "kubelet is posting ready status"
        )
        for cond in conditions:
            if cond.get("type") == "Ready":
                cond["lastHeartbeatTime"] = rfc3339()

    _node_status(core, node, mutate)
    _ready_pods_again(core, node)


#: Taints the node lifecycle controller keeps on a node it sees as not ready; while one is
#: there it also marks pods bound to the node Ready=False, new ones included.
_NOT_READY_TAINTS = frozenset({"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})


def _ready_pods_again(core: Any, node: str, timeout: float = 30.0) -> None:
    """What the node's kubelet does once it is back: report its running pods Ready again.

    The node lifecycle controller set them Ready=False while the node was down, and kwok's
    stages only ready Pending pods, so without this they would stay unready for good. Waits
    until the controller has seen the node Ready (its not-ready taints gone), so it marks no
    pod unready after this.
    """
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        taints = core.read_node(node).spec.taints or []
        if not any(t.key in _NOT_READY_TAINTS for t in taints):
            break
        time.sleep(0.5)
    selector = f"spec.nodeName={node},status.phase=Running"
    for pod in core.list_pod_for_all_namespaces(field_selector=selector).items:
        ready = [c for c in pod.status.conditions or [] if c.type == "Ready"]
        if pod.metadata.deletion_timestamp or (ready and ready[0].status == "True"):
            continue

        def mutate(obj: dict[str, Any]) -> None:
            conditions = obj.setdefault("status", {}).setdefault("conditions", [])
            _set_condition(conditions, "Ready", "True")
            _set_condition(conditions, "ContainersReady", "True")

        try:
            _pod_status_call(core, pod.metadata.namespace, pod.metadata.name, mutate)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to ready
                raise


LOST_NODE_HOLDER = "localcluster.deepspeed.ai/lost-node"


def _set_lease_holder(api: Any, node: str, holder: str | None) -> None:
    """Set the node Lease's holder. kwok renews a Lease only while it holds it (or nobody
    does), so a foreign holder with a long duration stops its renewals; None hands it back."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    coord = client.CoordinationV1Api(api.api_client)
    for attempt in range(10):
        lease = coord.read_namespaced_lease(node, "kube-node-lease")
        current = lease.spec.holder_identity  # type: ignore[union-attr]
        if holder is None and current != LOST_NODE_HOLDER:
            return  # not ours to hand back
        lease.spec.holder_identity = holder  # type: ignore[union-attr]
        if holder is not None:
            lease.spec.lease_duration_seconds = 86400  # type: ignore[union-attr]
        else:
            lease.spec.lease_duration_seconds = 40  # type: ignore[union-attr]
        try:
            coord.replace_namespaced_lease(node, "kube-node-lease", lease)
            return
        except ApiException as exc:
            if exc.status != 409 or attempt == 9:
                raise
            time.sleep(0.05)


def lose_node(api: Any, node: str) -> None:
    """Make node vanish as far as the control plane can tell: no more status heartbeats
    (kwok's node stages skip it) and no more Lease renewals (the Lease is taken from kwok).
    The node lifecycle controller then marks it Ready=Unknown after
    --node-monitor-grace-period (40 s here), taints it node.kubernetes.io/unreachable and
    marks its pods NotReady. Undo with set_node_ready.

    Unlike a real dead kubelet, kwok still finishes deletions of pods bound to the node; use
    stuck_terminating for pods that must hang in Terminating.
    """
    core = core_api(api)
    _annotate_node(core, node, manifests.NODE_FAULT_ANNOTATION, "lost")
    _set_lease_holder(core, node, LOST_NODE_HOLDER)


def kill_container_process(target: Any, namespace: str, name: str, container: int = 0) -> int:
    """``kill -9`` of a container's main process on a process-backed node (the container
    exits with 137 and its node agent restarts it); returns the pid killed."""
    pod = core_api(target).read_namespaced_pod(name, namespace)
    cid = pod.status.container_statuses[container].container_id or ""
    if not cid.startswith("proc://"):
        raise ValueError(f"pod {namespace}/{name} does not run on a process-backed node: {cid!r}")
    pid = int(cid.removeprefix("proc://"))
    os.kill(pid, signal.SIGKILL)
    return pid


def lose_process_node(node: str, cfg: config.ClusterConfig | None = None) -> None:
    """A process-backed node vanishes: its agent and all its pods' processes are SIGKILLed.
    Nothing renews its Lease, so the node lifecycle controller marks it Unknown."""
    cfg = cluster.running_config(cfg or config.ClusterConfig.from_env())
    procnodes.lose(cfg, node)


def restore_process_node(node: str, cfg: config.ClusterConfig | None = None) -> None:
    """Start a fresh agent for a lost process-backed node (it cleans what was left)."""
    cfg = cluster.running_config(cfg or config.ClusterConfig.from_env())
    procnodes.restore(cfg, node)


def stop_component(name: str, cfg: config.ClusterConfig | None = None) -> None:
    """A control-plane component goes away: etcd, kube-apiserver, kube-controller-manager,
    kube-scheduler, kwok or kuberay-operator is stopped (its state kept)."""
    cluster.stop_component(cluster.running_config(cfg or config.ClusterConfig.from_env()), name)


def start_component(name: str, cfg: config.ClusterConfig | None = None) -> None:
    """Bring a component stopped by :func:`stop_component` back, healthy."""
    cluster.start_component(cfg or config.ClusterConfig.from_env(), name)
