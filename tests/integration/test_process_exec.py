"""``kubectl exec`` and ``kubectl port-forward`` into pods on process-backed nodes.

kubectl talks WebSocket to the API server, which speaks SPDY/3.1 to the node agent
(dsi_localcluster.kubelet.streaming): these run the real kubectl against a real pod. The
first tests check the node's SPDY framing and exec status on their own (no cluster).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dsi_localcluster.kubelet import spdy, streaming
from dsi_localcluster.wait import pod_state, wait_for

LABEL = "dsi.local/process-node"
PLACE: dict[str, Any] = {
    "nodeSelector": {LABEL: "true"},
    "tolerations": [{"key": LABEL, "operator": "Exists", "effect": "NoSchedule"}],
    "terminationGracePeriodSeconds": 2,
}
# The container writes a marker into its private /tmp (visible only in its mount
# namespace), records its pid (the shell's $$, which exec makes the Python server's; "$$$$"
# because Kubernetes turns "$$" in a command into "$"), and serves HTTP on 127.0.0.1 only
# (reachable only from inside its network namespace).
SCRIPT = (
    "echo from-container > marker && echo $$$$ > pid && "
    "exec python -m http.server 8000 --bind 127.0.0.1"
)


def test_spdy_dictionary_is_the_one_go_uses() -> None:
    # moby/spdystream's headerDictionary: 1423 bytes, zlib dictionary id (adler32) e3c6a7c2.
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2


def test_spdy_connection_replies_echoes_pings_and_half_closes() -> None:
    server_end, client_end = socket.socketpair()
    conn = spdy.Connection(server_end, server_end.recv)
    threading.Thread(target=conn.serve, daemon=True).start()
    client = spdy.Connection(client_end, client_end.recv)  # its reader parses the replies
    z = zlib.compressobj(9, zdict=spdy.DICTIONARY)
    block = spdy.encode_headers({"streamType": ["data"], "port": ["8000"]})
    block = z.compress(block) + z.flush(zlib.Z_SYNC_FLUSH)
    syn = struct.pack(">IIBB", 1, 0, 0, 0) + block
    client_end.sendall(spdy.control_frame(spdy.SYN_STREAM, 0, syn))
    stream = spdy.wait_streams(conn, 1, 5)["data"]
    assert stream.header("port") == "8000"
    kind, _, reply = client.read_frame()
    assert kind == spdy.SYN_REPLY and struct.unpack_from(">I", reply)[0] == 1
    assert (
        spdy.decode_headers(zlib.decompressobj(zdict=spdy.DICTIONARY).decompress(reply[4:])) == {}
    )
    client_end.sendall(spdy.data_frame(1, b"in") + spdy.data_frame(1, b"", fin=True))
    assert stream.read(5) == b"in" and stream.read(5) == b""
    client_end.sendall(spdy.control_frame(spdy.PING, 0, struct.pack(">I", 7)))
    assert client.read_frame() == (spdy.PING, 0, struct.pack(">I", 7))
    stream.write(b"out")
    stream.close()
    assert client.read_frame() == (None, 0, struct.pack(">I", 1) + b"out")
    assert client.read_frame() == (None, spdy.FLAG_FIN, struct.pack(">I", 1))
    client_end.close()
    assert conn.closed.wait(5)


def test_exec_status_and_stream_options() -> None:
    assert streaming.exit_status(0)["status"] == "Success"
    failed = streaming.exit_status(3)
    assert failed["reason"] == "NonZeroExitCode"
    assert failed["details"] == {"causes": [{"reason": "ExitCode", "message": "3"}]}
    tty = streaming.ExecOptions.from_query({"input": ["1"], "output": ["1"], "error": ["1"],
                                            "tty": ["1"]})  # fmt: skip
    assert not tty.stderr and tty.stream_count() == 4  # error, stdin, stdout, resize
    offered = ["v5.channel.k8s.io, v4.channel.k8s.io", "v3.channel.k8s.io"]
    assert streaming.negotiate(offered, streaming.EXEC_PROTOCOLS) == "v4.channel.k8s.io"


@pytest.fixture(scope="module")
def target(kube: Any) -> Iterator[tuple[str, str, str]]:
    """(namespace, pod name, pod IP) of one running pod on a process node."""
    if not kube.core.list_node(label_selector=f"{LABEL}=true").items:
        if os.geteuid() != 0:
            pytest.skip("process-backed nodes need root (network namespaces); not root here")
        pytest.fail("the local cluster has no process-backed nodes (DSI_PROCESS_NODES=0?)")
    ns = f"t-exec-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace(
        {"metadata": {"name": ns, "labels": {"localcluster.deepspeed.ai/test": "true"}}}
    )
    container = {
        "name": "main",
        "image": "venv",
        "command": ["sh", "-c", SCRIPT],
        "workingDir": "/tmp/wd",
        "env": [
            {"name": "GREETING", "value": "hello from the pod spec"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
    }
    body = {"metadata": {"name": "box"}, "spec": {**PLACE, "containers": [container]}}
    kube.core.create_namespaced_pod(ns, body)
    try:
        p = wait_for(
            lambda: (p := kube.core.read_namespaced_pod("box", ns)).status.phase == "Running" and p,
            60,
            "pod box Running",
            dump=lambda: pod_state(kube.core, ns, "box"),
        )
        yield ns, "box", p.status.pod_ip
    finally:
        kube.core.delete_namespace(ns)


def test_exec_returns_output_and_exit_code(kubectl: Any, target: tuple[str, str, str]) -> None:
    ns, pod, _ = target
    ok = kubectl("exec", "-n", ns, pod, "--", "echo", "hello", "world")
    assert ok.returncode == 0 and ok.stdout == "hello world\n"
    # stdout and stderr stay apart, and a non-zero exit comes back as kubectl's own.
    bad = kubectl("exec", "-n", ns, pod, "--", "sh", "-c", "echo out; echo err >&2; exit 3",
                  check=False)  # fmt: skip
    assert bad.returncode == 3, bad
    assert bad.stdout == "out\n" and "err" in bad.stderr
    missing = kubectl("exec", "-n", ns, pod, "--", "no-such-command", check=False)
    assert missing.returncode != 0
    # stdin reaches the command and its end ends the command.
    cat = kubectl("exec", "-i", "-n", ns, pod, "--", "sh", "-c", "cat; echo done",
                  input="line 1\nline 2\n")  # fmt: skip
    assert cat.stdout == "line 1\nline 2\ndone\n"
    big = kubectl("exec", "-n", ns, pod, "--", "python", "-c", "print('x' * 300000)")
    assert big.stdout == "x" * 300000 + "\n"  # many frames, in order


def test_exec_sees_the_pods_env_network_and_files(
    kubectl: Any, target: tuple[str, str, str]
) -> None:
    ns, pod, pod_ip = target
    script = 'echo "G=$GREETING IP=$POD_IP H=$(hostname) PWD=$(pwd) M=$(cat marker)"; ip -o -4 addr'
    out = kubectl("exec", "-n", ns, pod, "--", "sh", "-c", script).stdout
    first = out.splitlines()[0]
    assert first == f"G=hello from the pod spec IP={pod_ip} H={pod} PWD=/tmp/wd M=from-container"
    # The pod's own network namespace: its IP on eth0, and none of the host's interfaces.
    assert re.search(rf"eth0\s+inet {re.escape(pod_ip)}/", out), out
    assert "dsi-br0" not in out
    # The server listens on the pod's loopback only, and the exec reaches it there.
    fetch = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/marker').read())"
    got = kubectl("exec", "-n", ns, pod, "--", "python", "-c", fetch).stdout
    assert "from-container" in got


def test_py_spy_dump_through_exec(kubectl: Any, target: tuple[str, str, str]) -> None:
    # The dev extra installs it (pyproject.toml): missing is a broken venv, not a skip.
    assert shutil.which("py-spy", path=str(Path(sys.prefix) / "bin")), "py-spy not in the venv"
    ns, pod, _ = target
    out = kubectl("exec", "-n", ns, pod, "--", "sh", "-c", "py-spy dump --pid $(cat pid)",
                  timeout=60).stdout  # fmt: skip
    assert "serve_forever" in out, out


def test_port_forward_reaches_the_pods_loopback(kubectl: Any, target: tuple[str, str, str]) -> None:
    ns, pod, _ = target
    cmd = [kubectl.exe, f"--kubeconfig={kubectl.cfg.kubeconfig}", "port-forward", "-n", ns,
           f"pod/{pod}", ":8000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 8000"
        m = re.search(r"127\.0\.0\.1:(\d+) -> 8000", line)
        assert m, (line, proc.poll())
        for _ in range(3):  # each request is a new forwarded connection
            with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/marker", timeout=10) as r:
                assert r.read() == b"from-container\n"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
