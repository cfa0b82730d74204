"""Helpers for tests against the local control plane (fixtures live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
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
