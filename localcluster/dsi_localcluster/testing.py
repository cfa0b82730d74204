"""Small manifest builders for tests against the local cluster, and running ranks in spawned
processes (free ports: :func:`dsi_worker.ports.free_port`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def run_spawned(
    target: Callable[..., None], args: Sequence[tuple[Any, ...]], timeout: float = 240
) -> list[Any]:
    """Run ``target(*a, queue)`` in one spawned process per ``a`` (e.g. one per rank) and
    return what each put on the queue, sorted (put ``(rank, ...)`` tuples). A process that
    outlives its result by 30 s is killed, so a hung rank fails the test instead of the run.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, q)) for a in args]
    for p in procs:
        p.start()
    try:
        return sorted((q.get(timeout=timeout) for _ in procs), key=lambda x: x[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
