"""Pure builders for what `up` writes into the cluster: kwok nodes and kwok's stage config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from . import config

# A node carrying this annotation is left alone by kwok's node stages, so a status written by
# faults.set_node_not_ready stays as written; kwok keeps renewing its Lease, as a kubelet that
# reports NotReady would.
NODE_FAULT_ANNOTATION = "localcluster.deepspeed.ai/node-not-ready"

GPU_NODE_PREFIX = "kwok-gpu-"
CPU_NODE_PREFIX = "kwok-cpu-"

_GPU_NODE_CAPACITY = {"cpu": "96", "memory": "1Ti", "pods": "110", "ephemeral-storage": "2Ti"}
_CPU_NODE_CAPACITY = {"cpu": "64", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}


def _node(
    name: str, labels: dict[str, str], capacity: dict[str, str], taints: list[dict[str, str]]
) -> dict[str, Any]:
    base_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                config.KWOK_NODE_ANNOTATION: config.KWOK_NODE_ANNOTATION_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": {**base_labels, **labels},
        },
        "spec": {"taints": taints} if taints else {},
        # kwok's node-initialize stage keeps capacity/allocatable as given here.
        "status": {"capacity": dict(capacity), "allocatable": dict(capacity)},
    }


def gpu_node(index: int, gpus: int, taint: bool) -> dict[str, Any]:
    """A simulated GPU node labelled as the NVIDIA GPU Operator labels real ones."""
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": config.GPU_PRODUCT,
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.family": "hopper",
        "nvidia.com/cuda.driver.major": "570",
        "node.kubernetes.io/instance-type": "sim.gpu.8xh100",
    }
    taints = (
        [{"key": config.GPU_TAINT_KEY, "value": config.GPU_TAINT_VALUE, "effect": "NoSchedule"}]
        if taint
        else []
    )
    capacity = {**_GPU_NODE_CAPACITY, config.GPU_RESOURCE: str(gpus)}
    return _node(f"{GPU_NODE_PREFIX}{index}", labels, capacity, taints)


def cpu_node(index: int) -> dict[str, Any]:
    """A simulated CPU-only node (Ray heads, the operator, anything without GPUs)."""
    labels = {"node.kubernetes.io/instance-type": "sim.cpu.64"}
    return _node(f"{CPU_NODE_PREFIX}{index}", labels, _CPU_NODE_CAPACITY, [])


def nodes(cfg: config.ClusterConfig) -> list[dict[str, Any]]:
    """Every node `up` creates for cfg, GPU nodes first."""
    out = [gpu_node(i, cfg.gpus_per_node, cfg.gpu_taint) for i in range(cfg.gpu_nodes)]
    out += [cpu_node(i) for i in range(cfg.cpu_nodes)]
    return out


#: kwok stages left out. The status heartbeat fires on a timer of 10-20 minutes set while the
#: node still matched its selector, and kwok does not check the selector again when it fires:
#: a node lost (faults.lose_node) in that window came back Ready with every condition
#: rewritten, took new pods, and was lost again 40 s later (CI, 2026-12-07: two restarts for
#: one node_lost). The node Lease that kwok renews is what keeps a node Ready (kubelets post
#: their status every 5 minutes at most too), so nothing needs that heartbeat.
DROPPED_STAGES = frozenset({"node-heartbeat-with-lease"})


def kwok_stages(stage_dir: Path) -> list[dict[str, Any]]:
    """kwok's own default stages (copied from its module at build time) but the
    ``DROPPED_STAGES``, with node stages taught to skip nodes under an injected fault."""
    stages = []
    for path in sorted(stage_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Stage" and doc["metadata"]["name"] not in DROPPED_STAGES:
                stages.append(doc)
    if not stages:
        raise FileNotFoundError(f"no kwok Stage manifests under {stage_dir}")
    return [guard_node_stage(s) for s in stages]


def guard_node_stage(stage: dict[str, Any]) -> dict[str, Any]:
    """Return stage with a selector that excludes nodes carrying NODE_FAULT_ANNOTATION.

    Pod stages are returned unchanged.
    """
    if stage["spec"]["resourceRef"].get("kind") != "Node":
        return stage
    out = copy.deepcopy(stage)
    selector = out["spec"].setdefault("selector", {})
    exprs = selector.setdefault("matchExpressions", [])
    exprs.append(
        {
            "key": f'.metadata.annotations["{NODE_FAULT_ANNOTATION}"]',
            "operator": "DoesNotExist",
        }
    )
    return out


def kwok_config_yaml(stages: list[dict[str, Any]]) -> str:
    """The multi-document file passed to `kwok --config`."""
    return yaml.safe_dump_all(stages, sort_keys=False)
