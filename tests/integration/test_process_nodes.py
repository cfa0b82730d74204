"""Process-backed nodes: pods that really run, observed through the API as a user would."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from typing import Any

import pytest
from dsi_localcluster import faults
from dsi_localcluster.wait import pod_state, wait_for

LABEL = "dsi.local/process-node"
PLACE: dict[str, Any] = {
    "nodeSelector": {LABEL: "true"},
    "tolerations": [{"key": LABEL, "operator": "Exists", "effect": "NoSchedule"}],
    "terminationGracePeriodSeconds": 5,
}
SERVER = "import http.server as h; h.ThreadingHTTPServer(('', 8000), h.SimpleHTTPRequestHandler).serve_forever()"  # noqa: E501


@pytest.fixture(autouse=True)
def _need_process_nodes(kube: Any) -> None:
    if kube.core.list_node(label_selector=f"{LABEL}=true").items:
        return
    if os.geteuid() != 0:
        pytest.skip("process-backed nodes need root (network namespaces); not root here")
    pytest.fail("the local cluster has no process-backed nodes (DSI_PROCESS_NODES=0?)")


def pod(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "venv", "command": command}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {**PLACE, "containers": [container], **spec},
    }


def wait_pod(kube: Any, ns: str, name: str, what: str, check: Any, timeout: float = 60) -> Any:
    def ready() -> Any:
        p = kube.core.read_namespaced_pod(name, ns)
        return p if check(p) else None

    return wait_for(ready, timeout, f"{name}: {what}", dump=lambda: pod_state(kube.core, ns, name))


def is_ready(p: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])


def logs(kubectl: Any, ns: str, name: str, *extra: str) -> str:
    return str(kubectl("logs", "-n", ns, name, *extra).stdout)


def web(kube: Any, namespace: str, name: str = "web") -> Any:
    """An HTTP server pod with a readiness probe, and a Service in front of it."""
    probe = {"httpGet": {"path": "/", "port": 8000}, "periodSeconds": 1}
    body = pod(name, ["python", "-c", SERVER], container={"readinessProbe": probe})
    kube.core.create_namespaced_pod(namespace, body)
    svc = {
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 8000, "targetPort": 8000}]},
    }
    kube.core.create_namespaced_service(namespace, svc)
    return wait_pod(kube, namespace, name, "Ready", is_ready)


def test_pod_runs_with_its_ip_env_volumes_and_logs(kube: Any, kubectl: Any, namespace: str) -> None:
    kube.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cm"}, "data": {"greeting": "hello"}}
    )
    kube.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "sec"}, "stringData": {"token": "s3cret"}}
    )
    script = (
        "echo IP=$POD_IP G=$GREETING T=$TOKEN CM_greeting=$CM_greeting MEM=$MEM H=$(hostname);"
        " df -k /dev/shm | tail -1; ls /tmp; echo init-saw=$(cat /work/init); sleep 3600"
    )
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "greeting"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
        {
            "name": "MEM",
            "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
        },  # noqa: E501
    ]
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "work", "mountPath": "/work"}]
    body = pod(
        "envy",
        ["sh", "-c", script],
        container={
            "env": env,
            "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
            "resources": {"limits": {"memory": "256Mi", "cpu": "1"}},
            "volumeMounts": mounts,
        },
        initContainers=[
            {
                "name": "init",
                "image": "venv",
                "command": ["sh", "-c", "echo done > /work/init"],
                "volumeMounts": mounts[1:],
            }
        ],  # fmt: skip
        volumes=[
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "work", "emptyDir": {}},
        ],
    )
    kube.core.create_namespaced_pod(namespace, body)
    p = wait_pod(kube, namespace, "envy", "Running", lambda p: p.status.phase == "Running")
    assert p.status.pod_ip.startswith("198.18.") and p.status.host_ip
    assert p.status.init_container_statuses[0].state.terminated.exit_code == 0
    out = wait_for(lambda: "init-saw" in (s := logs(kubectl, namespace, "envy")) and s, 30, "log")
    assert f"IP={p.status.pod_ip} G=hello T=s3cret CM_greeting=hello MEM=256 H=envy" in out
    assert "65536" in out  # a 64Mi tmpfs at /dev/shm, the pod's own
    assert "init-saw=done" in out  # the init container ran first, sharing the emptyDir


def test_service_names_resolve_in_pods_and_on_the_host(kube: Any, namespace: str) -> None:
    web(kube, namespace)
    fqdn = f"web.{namespace}.svc.cluster.local"
    # Names follow endpoints by polling (about a second behind, as cluster DNS and kube-proxy
    # are in a real cluster), so the client retries for a while, as real clients must.
    client = (
        "import urllib.request as u, sys, time\n"
        "for i in range(30):\n"
        "    try:\n"
        "        print(u.urlopen(sys.argv[1], timeout=5).status); break\n"
        "    except OSError as e:\n"
        "        print('retry', e, flush=True); time.sleep(0.5)\n"
        "else:\n"
        "    sys.exit(1)\n"
    )
    for url in ("http://web:8000/", f"http://{fqdn}:8000/"):
        name = "client-" + str(len(url) % 97)
        body = pod(name, ["python", "-c", client, url], restartPolicy="Never")
        kube.core.create_namespaced_pod(namespace, body)
        p = wait_pod(
            kube, namespace, name, "done", lambda p: p.status.phase in ("Succeeded", "Failed")
        )
        assert p.status.phase == "Succeeded", pod_state(kube.core, namespace, name)

    def host_answers() -> bool:
        try:
            return urllib.request.urlopen(f"http://{fqdn}:8000/", timeout=5).status == 200
        except OSError:
            return False

    wait_for(host_answers, 30, "the host resolves the Service")


def test_kill_restarts_the_container_and_never_policy_fails_the_pod(
    kube: Any, namespace: str
) -> None:
    p = web(kube, namespace)
    pid = faults.kill_container_process(kube.api, namespace, "web")
    assert p.status.container_statuses[0].container_id == f"proc://{pid}"
    p = wait_pod(
        kube,
        namespace,
        "web",
        "restarted",
        lambda p: p.status.container_statuses[0].restart_count == 1,
    )  # noqa: E501
    last = p.status.container_statuses[0].last_state.terminated
    assert last.exit_code == 137 and last.reason == "Error"
    wait_pod(kube, namespace, "web", "Ready again", is_ready)

    kube.core.create_namespaced_pod(
        namespace, pod("once", ["sh", "-c", "exit 3"], restartPolicy="Never")
    )  # noqa: E501
    p = wait_pod(kube, namespace, "once", "Failed", lambda p: p.status.phase == "Failed")
    assert p.status.container_statuses[0].state.terminated.exit_code == 3


def test_failing_liveness_probe_restarts_the_container(kube: Any, namespace: str) -> None:
    probe = {"exec": {"command": ["sh", "-c", "test ! -e /tmp/sick"]}, "periodSeconds": 1,
             "failureThreshold": 2}  # fmt: skip
    cmd = ["sh", "-c", "sleep 2; touch /tmp/sick; exec sleep 3600"]
    kube.core.create_namespaced_pod(namespace, pod("sick", cmd, container={"livenessProbe": probe}))
    p = wait_pod(kube, namespace, "sick", "restarted by liveness",
                 lambda p: (p.status.container_statuses or [None])[0] is not None
                 and p.status.container_statuses[0].restart_count >= 1, timeout=60)  # fmt: skip
    assert p.status.container_statuses[0].last_state.terminated is not None


def test_deletion_terminates_processes_and_removes_the_pod(kube: Any, namespace: str) -> None:
    p = web(kube, namespace)
    pid = int(p.status.container_statuses[0].container_id.removeprefix("proc://"))
    started = time.monotonic()
    kube.core.delete_namespaced_pod("web", namespace)

    def gone() -> bool:
        return not kube.core.list_namespaced_pod(
            namespace, field_selector="metadata.name=web"
        ).items

    wait_for(gone, 30, "pod object removed")
    assert time.monotonic() - started < 10, "SIGTERM ended the server well within its grace"
    assert not os.path.exists(f"/proc/{pid}"), "the container's process is gone"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert p.metadata.uid.replace("-", "")[:12] not in netns, "its network namespace is gone"
