"""Pinned versions, default ports and the cluster's user-facing settings.

Everything here is pure: no processes, no network. The values are read once by the CLI and
by the pytest fixtures, so both start the same cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Pinned component versions. KubeRay 1.7.0 is tagged, but the Go module proxy answers
# "403: This module version is not available" for its module zip (checked 2026-11-23), so
# the newest release that builds from the proxy is used.
KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
KUBERAY_VERSION = "v1.6.2"
HELM_VERSION = "v3.20.2"
# Manifest linters (tests/tools/test_linters.py).
KUBECONFORM_VERSION = "v0.8.0"
KUBE_SCORE_VERSION = "v1.20.0"
CHECKOV_VERSION = "3.3.30"

# Loopback ports. They avoid the well-known defaults (2379, 6443, 10257, 8080, ...) so the
# cluster can run next to a real one on a developer machine.
DEFAULT_PORTS: dict[str, int] = {
    "etcd-client": 23790,
    "etcd-peer": 23800,
    "kube-apiserver": 16443,
    "kube-controller-manager": 20257,
    "kube-scheduler": 20259,
    "kwok": 20247,
    "kuberay-metrics": 28080,
    "kuberay-probe": 28082,
}

HOST = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"

# The annotation kwok selects the nodes it manages by (--manage-nodes-with-annotation-selector).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"

# Labels the NVIDIA GPU Operator (GPU feature discovery) puts on GPU nodes.
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TAINT_VALUE = "present"


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not an integer") from exc
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be >= 0")
    return value


def _env_bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def repo_root() -> Path:
    """The repository root: the directory holding pyproject.toml above this package.

    Falls back to the current directory when the package is installed outside a checkout.
    """
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "localcluster").is_dir():
            return parent
    return Path.cwd()


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    """Where the running cluster keeps kubeconfig, certificates, pid files and logs."""
    env = dict(os.environ) if env is None else env
    if env.get("DSI_CLUSTER_DIR"):
        return Path(env["DSI_CLUSTER_DIR"]).resolve()
    return repo_root() / ".cluster"


def default_cache_dir(env: dict[str, str] | None = None) -> Path:
    """Per-user binary cache, keyed below by component and version."""
    env = dict(os.environ) if env is None else env
    if env.get("DSI_LOCALCLUSTER_CACHE"):
        return Path(env["DSI_LOCALCLUSTER_CACHE"]).expanduser().resolve()
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dsi-localcluster"


@dataclass(frozen=True)
class ClusterConfig:
    """What `up` creates. Built from flags and DSI_* environment variables."""

    gpu_nodes: int = 4
    cpu_nodes: int = 1
    gpus_per_node: int = 8
    gpu_taint: bool = False
    # Nodes whose pods really run (root only): enough for the e2e stack (head + 2x2 ranks).
    process_nodes: int = 3
    state_dir: Path = field(default_factory=default_state_dir)
    cache_dir: Path = field(default_factory=default_cache_dir)
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> ClusterConfig:
        """Read DSI_GPU_NODES, DSI_CPU_NODES, DSI_GPUS_PER_NODE, DSI_GPU_TAINT, DSI_CLUSTER_DIR,
        DSI_LOCALCLUSTER_CACHE and DSI_PORT_<NAME> (e.g. DSI_PORT_KUBE_APISERVER); keyword
        overrides that are not None win over the environment."""
        env = dict(os.environ) if env is None else env
        ports = dict(DEFAULT_PORTS)
        for name in ports:
            ports[name] = _env_int(env, "DSI_PORT_" + name.upper().replace("-", "_"), ports[name])
        values: dict[str, object] = {
            "gpu_nodes": _env_int(env, "DSI_GPU_NODES", 4),
            "cpu_nodes": _env_int(env, "DSI_CPU_NODES", 1),
            "gpus_per_node": _env_int(env, "DSI_GPUS_PER_NODE", 8),
            "gpu_taint": _env_bool(env, "DSI_GPU_TAINT", False),
            "process_nodes": _env_int(env, "DSI_PROCESS_NODES", 3),
            "state_dir": default_state_dir(env),
            "cache_dir": default_cache_dir(env),
            "ports": ports,
        }
        for key, value in overrides.items():
            if key not in values:
                raise TypeError(f"unknown setting {key!r}")
            if value is not None:
                values[key] = value
        cfg = cls(**values)  # type: ignore[arg-type]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Reject settings that cannot produce a useful cluster."""
        if self.gpu_nodes + self.cpu_nodes < 1:
            raise ValueError("the cluster needs at least one node (DSI_GPU_NODES + DSI_CPU_NODES)")
        if self.gpu_nodes and self.gpus_per_node < 1:
            raise ValueError("DSI_GPUS_PER_NODE must be >= 1 when there are GPU nodes")
        seen: dict[int, str] = {}
        for name, port in self.ports.items():
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} for {name} is out of range")
            if port in seen:
                raise ValueError(f"port {port} is configured for both {seen[port]} and {name}")
            seen[port] = name

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig `up` writes."""
        return self.state_dir / "kubeconfig"

    @property
    def server_url(self) -> str:
        """The API server's URL on loopback."""
        return f"https://{HOST}:{self.ports['kube-apiserver']}"
