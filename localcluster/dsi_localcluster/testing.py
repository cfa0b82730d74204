"""Small manifest builders for tests against the local cluster."""

from __future__ import annotations

from typing import Any


def pod_manifest(
    name: str,
    *,
    gpus: int = 0,
    node: str | None = None,
    restart_policy: str = "Always",
    labels: dict[str, str] | None = None,
    tolerate_gpu_taint: bool = True,
) -> dict[str, Any]:
    """A one-container pod; with gpus > 0 it requests nvidia.com/gpu and selects GPU nodes."""
    resources: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    spec: dict[str, Any] = {
        "restartPolicy": restart_policy,
        "terminationGracePeriodSeconds": 5,
        "containers": [
            {"name": "main", "image": "registry.invalid/sim:latest", "resources": resources}
        ],
    }
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
        spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        if tolerate_gpu_taint:
            spec["tolerations"] = [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": spec,
    }
