"""The node agent of one process-backed node: a small kubelet.

It registers its Node and renews the node's Lease, watches the pods bound to the node and
runs each in a PodWorker, keeps every pod's hosts file current from Services and
EndpointSlices, and serves the API server's kubelet calls (``kubectl logs``, ``exec`` and
``port-forward``).

One agent process per node: losing a node is SIGKILLing its agent and its pods.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import config
from ..timestamps import rfc3339
from . import dns, images, podspec, runtime, streaming
from .netns import NETNS_ETC, Network, PodNet, kill_netns_processes, netns_name
from .pods import PodWorker

log = logging.getLogger("dsi-kubelet")

LABEL = "dsi.local/process-node"
TAINT = {"key": LABEL, "value": "true", "effect": "NoSchedule"}
ALLOCATABLE = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
LEASE_NS = "kube-node-lease"
HEARTBEAT_S = 10.0
DNS_POLL_S = 1.0


def node_manifest(name: str, host_ip: str, log_port: int) -> dict[str, Any]:
    """The Node object of a process-backed node (pure)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                LABEL: "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "process",
            },
        },
        "spec": {"taints": [dict(TAINT)]},
        "status": node_status(host_ip, log_port),
    }


def node_status(host_ip: str, log_port: int) -> dict[str, Any]:
    """Capacity, addresses, the log endpoint and a Ready condition heartbeat (pure)."""
    t = rfc3339()
    return {
        "capacity": dict(ALLOCATABLE),
        "allocatable": dict(ALLOCATABLE),
        "addresses": [{"type": "InternalIP", "address": host_ip}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": log_port}},
        "nodeInfo": _node_info(),
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "dsi-localcluster process node agent is posting ready status",
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }
        ],
    }


def _node_info() -> dict[str, str]:
    return {
        "architecture": "amd64",
        "operatingSystem": "linux",
        "kubeletVersion": "v1.35.4-dsi-process",
        "kubeProxyVersion": "",
        "containerRuntimeVersion": "process://local",
        "osImage": "host",
        "kernelVersion": os.uname().release,
        "machineID": "",
        "systemUUID": "",
        "bootID": "",
    }


def image_env() -> dict[str, str]:
    """What the "image" provides: the project's virtualenv stands in for the worker image."""
    # HOME is shared with the host (a local model cache built once serves every pod), so
    # Ray's token auth is pinned off: a ~/.ray/auth_token left on the host by a local
    # ray.init() would otherwise switch it on for the head but not for the workers' checks.
    env = {
        "PATH": f"{sys.prefix}/bin:{podspec.BASE_PATH}",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "RAY_AUTH_MODE": "disabled",
    }
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # set on some hosts for a reason
        if key in os.environ:
            env[key] = os.environ[key]
    return env


class NodeAgent:
    """Registers one node and runs the pods bound to it."""

    def __init__(
        self, api: Any, node: str, state_dir: Path, log_port: int, api_relay_port: int = 0
    ) -> None:
        from kubernetes import client

        self.api = api
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.node = node
        self.state_dir = state_dir / "nodes" / node
        self.network = Network(state_dir)
        self.host_ip = self.network.ensure_bridge()
        self.log_port = log_port
        self.api_relay_port = api_relay_port
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.dns_table: dns.Table = {}
        self.stop = threading.Event()
        # The project's images' entrypoints, for containers that name no command.
        self.images: Mapping[str, images.Entrypoint] = images.project_images(config.repo_root())

    # -- what pod workers call --------------------------------------------------------------

    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        """ConfigMap data or decoded Secret data; None when missing."""
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "ServiceAccountToken":
                req = {"spec": {"audiences": [], "expirationSeconds": 86400}}
                out = self.core.create_namespaced_service_account_token(name, namespace, req)  # type: ignore[arg-type]
                return {"token": out.status.token}  # type: ignore[dict-item, union-attr]
            if kind == "ConfigMap":
                return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
            sec = self.core.read_namespaced_secret(name, namespace)
            return podspec.decode_secret(dict(sec.data or {}))  # type: ignore[arg-type]
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def env_for(self, pod: dict[str, Any], c: dict[str, Any], net: PodNet) -> dict[str, str]:
        """The container's environment, with the pod's IPs filled in as the kubelet does."""
        status = dict(pod.get("status") or {})
        status.update(podIP=net.ip, podIPs=[{"ip": net.ip}], hostIP=self.host_ip)
        status["hostIPs"] = [{"ip": self.host_ip}]
        full = {**pod, "status": status}
        base = {**image_env(), **self.api_env()}
        return podspec.container_env(full, c, self.lookup, ALLOCATABLE, base)

    def api_env(self) -> dict[str, str]:
        """What a kubelet tells every container about the API server (the `kubernetes`
        Service's variables), pointing at this node's relay to it on the pods' gateway
        (:mod:`.apirelay`), so in-cluster clients (``load_incluster_config``) work."""
        if not self.api_relay_port:
            return {}
        port = str(self.api_relay_port)
        return {
            "KUBERNETES_SERVICE_HOST": self.host_ip,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
        }

    def confirm_deleted(self, pod: dict[str, Any]) -> None:
        """The kubelet's last word on a deleted pod: delete it with grace 0 (UID-checked)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        meta = pod["metadata"]
        body = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
        )
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("deleting %s: %s", meta["name"], e.reason)

    def forget(self, uid: str) -> None:
        """A pod worker finished."""
        with self.lock:
            self.workers.pop(uid, None)

    # -- node registration ---------------------------------------------------------------

    def register(self) -> None:
        """Create (or refresh) the Node and its Lease."""
        from kubernetes.client.exceptions import ApiException

        body = node_manifest(self.node, self.host_ip, self.log_port)
        try:
            self.core.create_node(body)  # type: ignore[arg-type]
        except ApiException as e:
            if e.status != 409:
                raise
            self.core.patch_node(self.node, {"metadata": {"labels": body["metadata"]["labels"]}})
        self.core.patch_node_status(self.node, {"status": body["status"]})
        self.renew_lease()

    def renew_lease(self) -> None:
        """Create or renew the node's Lease (what the node lifecycle controller watches)."""
        from kubernetes.client.exceptions import ApiException

        t = rfc3339(micro=True)
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": t}
        try:
            self.coord.patch_namespaced_lease(self.node, LEASE_NS, {"spec": spec})
        except ApiException as e:
            if e.status != 404:
                raise
            meta = {"name": self.node, "namespace": LEASE_NS}
            self.coord.create_namespaced_lease(LEASE_NS, {"metadata": meta, "spec": spec})  # type: ignore[arg-type]

    def heartbeat_loop(self) -> None:
        """Renew the Lease and the Ready condition every HEARTBEAT_S."""
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.renew_lease()
                st = node_status(self.host_ip, self.log_port)
                self.core.patch_node_status(self.node, {"status": {"conditions": st["conditions"]}})
            except Exception as e:  # noqa: BLE001 - the API server may be restarting
                log.warning("heartbeat: %s", e)

    # -- DNS ------------------------------------------------------------------------------

    def refresh_dns(self) -> None:
        """Recompute the Service table and rewrite changed hosts files of this node's pods."""
        svcs = self.api.sanitize_for_serialization(self.core.list_service_for_all_namespaces())
        sls = self.discovery.list_endpoint_slice_for_all_namespaces()
        slices = self.api.sanitize_for_serialization(sls)
        self.dns_table = dns.table(svcs["items"], slices["items"])
        # Every agent keeps the host's block current (so it survives the loss of any one
        # node); the lock keeps two agents from interleaving their rewrites.
        lock_path = self.state_dir.parent.parent / "hosts.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            dns.update_host(dns.host_block(self.dns_table))
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            if w.net is not None:
                w.write_hosts()

    def dns_loop(self) -> None:
        """Follow Services and EndpointSlices (polled: a local cluster has few)."""
        while not self.stop.wait(DNS_POLL_S):
            try:
                self.refresh_dns()
            except Exception as e:  # noqa: BLE001
                log.warning("dns: %s", e)

    # -- pods -----------------------------------------------------------------------------

    def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        """A watch event for a pod bound to this node."""
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker is not None:
                    worker.gone.set()
                return
            if worker is None:
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    return  # finished before this agent started: nothing to run
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
                return
        worker.update(pod)

    def watch_pods(self) -> None:
        """List then watch the pods with spec.nodeName = this node, forever."""
        from kubernetes import watch

        selector = f"spec.nodeName={self.node}"
        while not self.stop.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces(field_selector=selector)
                for p in listed.items:
                    self.on_pod("ADDED", self.api.sanitize_for_serialization(p))
                rv = listed.metadata.resource_version  # type: ignore[union-attr]
                for ev in watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=rv,
                    timeout_seconds=300,
                ):
                    pod = self.api.sanitize_for_serialization(ev["object"])
                    self.on_pod(ev["type"], pod)
            except Exception as e:  # noqa: BLE001 - 410 Gone or a restarting API server
                log.info("pod watch restarts: %s", e)
                time.sleep(1)


def clean_leftovers(state_dir: Path, node: str) -> None:
    """Kill the processes and remove the namespaces a crashed agent of this node left."""
    pods_dir = state_dir / "nodes" / node / "pods"
    if not pods_dir.is_dir():
        return
    net = Network(state_dir)
    for d in pods_dir.iterdir():
        name = netns_name(d.name)
        if (NETNS_ETC / name).exists() or Path("/var/run/netns", name).exists():
            runtime.kill_recorded(d, name)
            kill_netns_processes(name)
        net.delete(d.name)
        runtime.unmount_all(d)


def log_resolver(agent: NodeAgent) -> Any:
    """Map (namespace, pod, container, previous) to a log file of this node's pods."""

    def resolve(ns: str, pod: str, container: str, previous: bool) -> Any:
        with agent.lock:
            workers = list(agent.workers.values())
        for w in workers:
            if (w.namespace, w.name) != (ns, pod):
                continue
            for rec in w.records:
                if rec.name != container:
                    continue
                n = rec.restart_count - 1 if previous else rec.restart_count
                path = w.dir / "logs" / f"{rec.name}.{n}.log"
                if n < 0 or not path.exists():
                    return None
                return path, lambda r=rec: r.running
        return None

    return resolve


def _worker(agent: NodeAgent, ns: str, pod: str) -> PodWorker | None:
    with agent.lock:
        workers = list(agent.workers.values())
    return next((w for w in workers if (w.namespace, w.name) == (ns, pod)), None)


def exec_resolver(agent: NodeAgent) -> streaming.ExecResolver:
    """Map (namespace, pod, container) to the running container an exec enters."""

    def resolve(ns: str, pod: str, container: str) -> streaming.Target | str:
        w = _worker(agent, ns, pod)
        if w is None:
            return f"pod {ns}/{pod} is not running on node {agent.node}"
        rec = next((r for r in w.records if r.name == container), None)
        if rec is None:
            return f'container not found ("{container}")'
        if not rec.running or rec.pid is None:
            return f"container {container} is not running"
        return streaming.Target(rec.pid, dict(rec.env), rec.spec.get("workingDir"))

    return resolve


def netns_resolver(agent: NodeAgent) -> streaming.NetnsResolver:
    """Map (namespace, pod) to the pod's network namespace (port-forward dials in it)."""

    def resolve(ns: str, pod: str) -> str | None:
        w = _worker(agent, ns, pod)
        return w.net.netns if w is not None and w.net is not None else None

    return resolve
