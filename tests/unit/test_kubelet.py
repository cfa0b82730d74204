"""The process-backed node agent's pure parts: env, argv, volumes, DNS, status, backoff."""

from __future__ import annotations

import base64
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from dsi_localcluster.kubelet import dns, podspec, runtime, state
from dsi_localcluster.kubelet.agent import node_manifest
from dsi_localcluster.timestamps import rfc3339

DATA = {
    ("ConfigMap", "ns", "cm"): {"greeting": "hello", "who": "world"},
    ("Secret", "ns", "sec"): {"token": "s3cret"},
}


def lookup(kind: str, ns: str, name: str) -> dict[str, str] | None:
    return DATA.get((kind, ns, name))


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "u-1",
            "labels": {"ray.io/group": "g0-r1"},
        },
        "spec": {"nodeName": "proc-0", "containers": [], **spec},
        "status": {"podIP": "198.18.0.9", "hostIP": "198.18.0.1"},
    }


def env_of(container: dict[str, Any], p: dict[str, Any] | None = None) -> dict[str, str]:
    base = {"PATH": "/venv/bin:/usr/bin"}
    return podspec.container_env(p or pod(), container, lookup, {"cpu": "16"}, base)


def test_env_resolves_like_the_kubelet() -> None:
    c = {
        "name": "main",
        "resources": {"limits": {"memory": "2Gi"}, "requests": {"cpu": "500m"}},
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "A", "value": "x"},
            {"name": "B", "value": "$(A)-$(MISSING)-$$(A)"},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "GRP",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/group']"}},
            },
            {
                "name": "MEM",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            # The API server defaults divisor to "0", meaning 1; unset limits = node allocatable.
            {
                "name": "CPU",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "0"}},
            },
            {
                "name": "REQ",
                "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}},
            },
            {"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "greeting"}}},
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
            {
                "name": "O",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    env = env_of(c)
    assert env["B"] == "x-$(MISSING)-$(A)"
    assert (env["IP"], env["GRP"], env["MEM"], env["CPU"], env["REQ"]) == (
        "198.18.0.9",
        "g0-r1",
        "2048",
        "16",
        "500",
    )
    assert (env["G"], env["S"], env["CM_who"], env["HOSTNAME"]) == ("hello", "s3cret", "world", "p")
    assert "O" not in env and env["PATH"] == "/venv/bin:/usr/bin"


@pytest.mark.parametrize(
    "var, message",
    [
        ({"configMapKeyRef": {"name": "cm", "key": "nokey"}}, "ConfigMap ns/cm has no key"),
        ({"secretKeyRef": {"name": "gone", "key": "k"}}, "Secret ns/gone not found"),
        ({"fieldRef": {"fieldPath": "spec.bogus"}}, "fieldRef 'spec.bogus' is not supported"),
    ],
)
def test_env_errors_name_what_is_missing(var: dict[str, Any], message: str) -> None:
    with pytest.raises(podspec.PodSpecError, match=message):
        env_of({"name": "c", "env": [{"name": "X", "valueFrom": var}]})


def test_argv_expands_command_and_args() -> None:
    c = {"name": "c", "command": ["sh", "-c"], "args": ["echo $(A) $$(A) $A"]}
    assert podspec.argv(c, {"A": "1"}) == ["sh", "-c", "echo 1 $(A) $A"]
    with pytest.raises(podspec.PodSpecError, match="no command"):
        podspec.argv({"name": "c"}, {})


def test_mounts(tmp_path: Path) -> None:
    p = pod(
        volumes=[
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "cm", "items": [{"key": "who", "path": "w"}]}},
            {
                "name": "sa",
                "projected": {
                    "sources": [
                        {"configMap": {"name": "cm", "items": [{"key": "greeting", "path": "g"}]}},
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {"fieldPath": "metadata.namespace"},
                                    }
                                ]
                            }
                        },
                    ]
                },
            },
            {"name": "data", "persistentVolumeClaim": {"claimName": "x"}},
        ]
    )
    mounts = ["shm:/dev/shm", "scratch:/scratch", "cfg:/etc/cfg", "sa:/var/run/sa"]
    c = {
        "name": "c",
        "volumeMounts": [
            dict(zip(("name", "mountPath"), m.split(":"), strict=True)) for m in mounts
        ],
    }
    shm, scratch, cfg, sa = podspec.mounts(p, c, tmp_path, lookup)
    assert (shm.target, shm.tmpfs_bytes) == ("/dev/shm", 256 * 2**20)
    assert scratch.tmpfs_bytes is None and scratch.source == tmp_path / "volumes" / "scratch"
    assert cfg.files == (("w", "world"),) and cfg.read_only
    assert sa.files == (("g", "hello"), ("namespace", "ns"))
    c["volumeMounts"].append({"name": "data", "mountPath": "/data"})
    with pytest.raises(podspec.PodSpecError, match="'data'.*persistentVolumeClaim"):
        podspec.mounts(p, c, tmp_path, lookup)


def test_secret_decode_backoff_and_restart_policy() -> None:
    raw = {"k": base64.b64encode(b"v").decode()}
    assert podspec.decode_secret(raw) == {"k": "v"}
    assert [podspec.backoff_seconds(n) for n in (0, 1, 2, 3, 10)] == [0, 10, 20, 40, 300]
    assert podspec.should_restart("Always", 0) and podspec.should_restart("OnFailure", 1)
    assert not podspec.should_restart("OnFailure", 0) and not podspec.should_restart("Never", 1)


def svc(name: str, headless: bool = False, not_ready: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": "None" if headless else "10.96.0.10"}
    if not_ready:
        spec["publishNotReadyAddresses"] = True
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec}


def eps(name: str, *endpoints: tuple[str, bool, str | None]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": name}},
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": r}, **({"hostname": h} if h else {})}
            for a, r, h in endpoints
        ],
    }


def test_dns_table_follows_service_kinds_and_skips_unreachable_addresses() -> None:
    services = [svc("web"), svc("master", headless=True, not_ready=True), svc("kwok")]
    slices = [
        eps(
            "web",
            ("198.18.0.5", True, None),
            ("198.18.0.4", True, None),
            ("198.18.0.3", False, None),
        ),
        eps("master", ("198.18.0.7", False, "rank0"), ("198.18.0.8", True, None)),
        eps("kwok", ("10.244.0.5", True, None)),  # a kwok pod: nothing answers there
    ]
    tab = dns.table(services, slices)
    assert tab[("ns", "web")] == ["198.18.0.4"]  # ClusterIP: one ready backend
    assert tab[("ns", "master")] == ["198.18.0.7", "198.18.0.8"]  # headless: all (not ready too)
    assert tab[("ns", "rank0.master")] == ["198.18.0.7"]
    assert ("ns", "kwok") not in tab
    text = dns.render(tab, own_ns="ns", own=("198.18.0.9", "p"))
    assert "198.18.0.9\tp\n" in text
    assert "198.18.0.4\tweb.ns.svc.cluster.local web.ns.svc web.ns web\n" in text
    other = dns.render(tab, own_ns="elsewhere")
    assert "web.ns.svc.cluster.local web.ns.svc web.ns\n" in other  # no short name


def test_host_block_is_spliced_in_and_out() -> None:
    hosts = "127.0.0.1 localhost\n"
    block = dns.host_block({("ns", "web"): ["198.18.0.4"]})
    once = dns.splice(hosts, block)
    assert once.startswith(hosts) and once.count(dns.BEGIN) == 1
    assert dns.splice(once, block) == once  # idempotent
    assert dns.splice(once, "") == hosts


def test_pod_status_phases_and_readiness() -> None:
    init = state.ContainerRecord({"name": "init"}, init=True)
    main = state.ContainerRecord({"name": "main", "image": "img"})
    st = state.pod_status([init, main], "198.18.0.9", "198.18.0.1", 0.0, False, False, "Always")
    assert st["phase"] == "Pending" and st["initContainerStatuses"][0]["name"] == "init"
    main.pid, main.running, main.started_at = 42, True, 1.0
    st = state.pod_status([init, main], "198.18.0.9", "198.18.0.1", 0.0, True, False, "Always")
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert (st["phase"], conds["Ready"], conds["Initialized"]) == ("Running", "True", "True")
    assert st["containerStatuses"][0]["containerID"] == "proc://42"
    main.running, main.terminated = False, state.terminated(3, 1.0, 2.0)
    st = state.pod_status([main], "198.18.0.9", "198.18.0.1", 0.0, True, False, "Never")
    assert st["phase"] == "Failed"
    assert st["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    main.terminated = state.terminated(0, 1.0, 2.0)
    assert state.pod_status([main], "x", "y", 0.0, True, False, "OnFailure")["phase"] == "Succeeded"


def test_node_is_tainted_and_labelled() -> None:
    n = node_manifest("proc-0", "198.18.0.1", 20310)
    assert n["metadata"]["labels"]["dsi.local/process-node"] == "true"
    assert n["spec"]["taints"] == [
        {"key": "dsi.local/process-node", "value": "true", "effect": "NoSchedule"}
    ]
    assert n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 20310


def test_only_process_groups_still_in_the_pod_are_killed() -> None:
    # 101 exited long ago and its number now belongs to another pod's process: not ours.
    recorded = [101, 202, 303]
    assert runtime.pgids_to_kill(recorded, [202, 202, 999]) == [202]
    assert runtime.pgids_to_kill(recorded, []) == []


def test_api_relay_pumps_bytes_both_ways() -> None:
    """The relay a node agent runs for its pods' in-cluster clients (kubelet.apirelay)."""
    import socket
    import socketserver

    from dsi_localcluster.kubelet import apirelay
    from dsi_worker.ports import free_port

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(1024):
                self.request.sendall(data.upper())

    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    relay = apirelay.serve("127.0.0.1", port, upstream.server_address)
    try:
        for _ in range(2):  # two connections, one after the other
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"hello")
                assert c.recv(1024) == b"HELLO"
    finally:
        relay.shutdown()
        upstream.shutdown()


def test_timestamps_are_rfc3339_utc_like_the_apis() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00Z"
    assert rfc3339(86400.25, micro=True) == "1970-01-02T00:00:00.250000Z"
    assert state.stamp(None) is None and state.stamp(1.9) == "1970-01-01T00:00:01Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rfc3339())


def test_conditions_carry_their_last_transition_time_like_a_kubelets() -> None:
    from dsi_localcluster.kubelet.state import stamp, stamp_transitions

    ready = {
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "Initialized", "status": "True"},
        ]
    }
    first = stamp_transitions(ready, None, 100.0)
    assert [c["lastTransitionTime"] for c in first["conditions"]] == [stamp(100.0)] * 2
    same = stamp_transitions(ready, first, 200.0)
    assert same == first  # unchanged: nothing to patch
    down = {
        "conditions": [
            {"type": "Ready", "status": "False"},
            {"type": "Initialized", "status": "True"},
        ]
    }
    flipped = stamp_transitions(down, same, 300.0)
    assert [c["lastTransitionTime"] for c in flipped["conditions"]] == [stamp(300.0), stamp(100.0)]
