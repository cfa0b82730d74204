"""Starting, losing, restoring and cleaning up the process-backed nodes of the cluster.

Each node is one agent process (``python -m dsi_localcluster.kubelet``) with a pid file
like the cluster's other processes. Its pods' processes are recorded by pid under
``<state>/process-nodes/nodes/<node>/pods/<uid>/pids``, so they can be killed even when
the agent itself died.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import config
from .kubelet import dns, runtime
from .kubelet.agent import LABEL
from .kubelet.netns import Network, kill_netns_processes, netns_name
from .statedir import Paths, read_pidfile, write_pidfile

NODE_PREFIX = "proc-"
LOG_PORT_BASE = 20310
#: Node i relays the API server to its pods on <gateway>:API_RELAY_PORT_BASE + i.
API_RELAY_PORT_BASE = 20330


def node_names(count: int) -> list[str]:
    """proc-0, proc-1, ..."""
    return [f"{NODE_PREFIX}{i}" for i in range(count)]


def is_root() -> bool:
    """Process nodes need root (network namespaces, veth, mounts)."""
    return os.geteuid() == 0


def agent_argv(cfg: config.ClusterConfig, index: int) -> list[str]:
    """The command line of node index's agent (pure)."""
    return [
        sys.executable,
        "-m",
        "dsi_localcluster.kubelet",
        "--node",
        node_names(index + 1)[index],
        "--kubeconfig",
        str(cfg.kubeconfig),
        "--state-dir",
        str(cfg.state_dir),
        "--log-port",
        str(LOG_PORT_BASE + index),
        "--api-relay-port",
        str(API_RELAY_PORT_BASE + index),
    ]


def start_agent(cfg: config.ClusterConfig, index: int) -> int:
    """Start (or restart) one node agent detached; returns its pid."""
    paths = Paths(cfg.state_dir)
    name = node_names(index + 1)[index]
    paths.logs.mkdir(parents=True, exist_ok=True)
    with paths.log(name).open("ab") as fh:
        proc = subprocess.Popen(
            agent_argv(cfg, index),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(cfg.state_dir),
        )
    write_pidfile(paths.pidfile(name), proc.pid, Path(sys.executable))
    return proc.pid


def nodes_ready(core: Any, names: list[str]) -> tuple[bool, str]:
    """Whether every named node reports Ready=True."""
    ready = set()
    for n in core.list_node(label_selector=f"{LABEL}=true").items:
        if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or []):
            ready.add(n.metadata.name)
    missing = sorted(set(names) - ready)
    return not missing, f"not Ready yet: {', '.join(missing)}"


def start_all(cfg: config.ClusterConfig, api_client: Any, log: Any) -> None:
    """Start cfg.process_nodes agents and wait for their nodes (one line and none without
    root: the kwok-only cluster still works)."""
    from kubernetes import client

    if cfg.process_nodes == 0:
        return
    if not is_root():
        log("process nodes need root (network namespaces); starting the kwok-only cluster")
        return
    for i in range(cfg.process_nodes):
        start_agent(cfg, i)
    core = client.CoreV1Api(api_client)
    names = node_names(cfg.process_nodes)
    deadline = time.monotonic() + 60
    while True:
        ok, detail = nodes_ready(core, names)
        if ok:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"process nodes: {detail} (logs: {cfg.state_dir / 'logs'})")
        time.sleep(0.5)
    log(f"{cfg.process_nodes} process-backed node(s) Ready: {', '.join(names)}")


def kill_node_pods(state_dir: Path, node: str) -> list[int]:
    """SIGKILL every process of every pod of node (recorded pids and namespace members)."""
    killed: list[int] = []
    pods = state_dir / "process-nodes" / "nodes" / node / "pods"
    for d in pods.glob("*") if pods.is_dir() else []:
        netns = netns_name(d.name)
        killed += runtime.kill_recorded(d, netns)
        kill_netns_processes(netns)
    return killed


def agents_running() -> bool:
    """Whether any node agent (of any local cluster) runs on this host."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"dsi_localcluster.kubelet" in cmdline and proc.name != str(os.getpid()):
            return True
    return False


def cleanup(state_dir: Path) -> list[str]:
    """Kill this cluster's pod processes and remove their namespaces; when no node agent
    runs on the host any more, also every other dsi-* namespace, veth, the bridge and the
    hosts block (what a crashed run left). Another cluster's live pods are never touched."""
    if not is_root():
        return []
    nodes = state_dir / "process-nodes" / "nodes"
    for node in nodes.glob("*") if nodes.is_dir() else []:
        kill_node_pods(state_dir, node.name)
    net = Network(state_dir / "process-nodes")
    removed = net.delete_recorded()
    if not agents_running():
        removed += net.cleanup_all()
        if dns.update_host(""):
            removed.append("/etc/hosts block")
    return removed


def lose(cfg: config.ClusterConfig, node: str) -> None:
    """The node vanishes: its agent and every process of its pods are SIGKILLed."""
    rec = read_pidfile(Paths(cfg.state_dir).pidfile(node))
    if rec is not None:
        try:
            os.killpg(rec[0], signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_node_pods(cfg.state_dir, node)


def restore(cfg: config.ClusterConfig, node: str) -> int:
    """Bring a lost node back: a fresh agent (it cleans what the old one left)."""
    return start_agent(cfg, int(node.removeprefix(NODE_PREFIX)))
