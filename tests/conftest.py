"""Shared fixtures: the local control plane, API clients, kubectl and per-test namespaces.

The `cluster` fixture reuses a cluster that already runs (`make cluster-up`) and leaves it
running; otherwise it starts one and stops it when the session ends (set DSI_KEEP_CLUSTER=1
to keep it). Tests under tests/integration are marked `integration` automatically.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dsi_localcluster import cluster as lc
from dsi_localcluster import config as lcconfig
from dsi_localcluster import faults

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs the control plane: mark it so."""
    integration_dir = _HERE / "integration"
    for item in items:
        if integration_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@dataclass
class LocalCluster:
    """A running local control plane."""

    config: lcconfig.ClusterConfig
    started_here: bool

    @property
    def kubeconfig(self) -> Path:
        """The admin (system:masters) kubeconfig."""
        return self.config.kubeconfig

    @property
    def gpu_nodes(self) -> list[str]:
        """Names of the simulated GPU nodes."""
        return [f"kwok-gpu-{i}" for i in range(self._saved().gpu_nodes)]

    @property
    def cpu_nodes(self) -> list[str]:
        """Names of the simulated CPU-only nodes."""
        return [f"kwok-cpu-{i}" for i in range(self._saved().cpu_nodes)]

    @property
    def gpus_per_node(self) -> int:
        """nvidia.com/gpu capacity of each GPU node."""
        return self._saved().gpus_per_node

    def _saved(self) -> lcconfig.ClusterConfig:
        return lc.running_config(self.config)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """The local control plane (reused when up, else started for this session)."""
    cfg = lcconfig.ClusterConfig.from_env()
    if lc.is_up(cfg):
        yield LocalCluster(cfg, started_here=False)
        return
    lc.up(cfg)
    try:
        yield LocalCluster(cfg, started_here=True)
    finally:
        if os.environ.get("DSI_KEEP_CLUSTER", "") not in ("1", "true", "yes"):
            lc.down(cfg)


@dataclass
class Kube:
    """Kubernetes API clients bound to the local cluster's admin kubeconfig."""

    api: Any
    core: Any = field(init=False)
    apps: Any = field(init=False)
    batch: Any = field(init=False)
    custom: Any = field(init=False)
    apiext: Any = field(init=False)
    rbac: Any = field(init=False)
    policy: Any = field(init=False)

    def __post_init__(self) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.apiext = client.ApiextensionsV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.policy = client.PolicyV1Api(self.api)


@pytest.fixture(scope="session")
def kube(cluster: LocalCluster) -> Kube:
    """API clients (kube.core, kube.apps, kube.custom, ...; kube.api is the ApiClient)."""
    from kubernetes import config as kconfig

    return Kube(kconfig.new_client_from_config(str(cluster.kubeconfig)))


class Kubectl:
    """Runs the cluster's kubectl: kubectl("get", "pods", "-n", ns).stdout."""

    def __init__(self, cfg: lcconfig.ClusterConfig):
        self.cfg = cfg
        self.exe = str(lc.binaries(cfg.cache_dir)["kubectl"])

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.exe, f"--kubeconfig={self.cfg.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def apply(self, manifest: str, namespace: str | None = None) -> str:
        """kubectl apply -f - (optionally in namespace); returns stdout."""
        ns = ["-n", namespace] if namespace else []
        return self("apply", *ns, "-f", "-", input=manifest).stdout


@pytest.fixture(scope="session")
def kubectl(cluster: LocalCluster) -> Kubectl:
    """kubectl bound to the local cluster."""
    return Kubectl(cluster.config)


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kube: Kube) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(
                name=name, labels={"localcluster.deepspeed.ai/test": "true"}
            )
        )
    )
    try:
        yield name
    finally:
        # Finalizers a test left behind (faults.stuck_terminating) would block the deletion.
        try:
            for pod in kube.core.list_namespaced_pod(name).items:
                if faults.STUCK_FINALIZER in (pod.metadata.finalizers or []):
                    faults.release_pod(kube.api, name, pod.metadata.name)
            kube.core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
