"""Fixtures for tests against the local control plane (cluster fixtures: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dsi_localcluster.harness import install_crd, running_operator
from dsi_localcluster.testing import pod_manifest
from dsi_localcluster.wait import pod_state, wait_for


@pytest.fixture
def running_pod(kube: Any, namespace: str) -> Callable[..., Any]:
    """Create a pod and wait until kwok reports it Running; returns the V1Pod."""

    def make(name: str, timeout: float = 60, **kwargs: Any) -> Any:
        kube.core.create_namespaced_pod(namespace, pod_manifest(name, **kwargs))

        def running() -> Any:
            pod = kube.core.read_namespaced_pod(name, namespace)
            return pod if pod.status.phase == "Running" else None

        return wait_for(
            running,
            timeout,
            f"pod {namespace}/{name} Running",
            dump=lambda: pod_state(kube.core, namespace, name),
        )

    return make


@pytest.fixture(scope="module")
def dsi_crd(kubectl: Any) -> None:
    """The DeepSpeedInference CRD, installed from crds/."""
    install_crd(kubectl)


@pytest.fixture
def operator(cluster: Any, namespace: str, dsi_crd: None, tmp_path: Path) -> Iterator[Any]:
    """The operator watching only the test namespace (kill()/start() to restart it)."""
    with running_operator(cluster.kubeconfig, namespace, tmp_path / "operator.log") as op:
        yield op
