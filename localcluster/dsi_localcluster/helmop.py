"""The operator installed with the chart, running as a pod on a process-backed node.

``make run OPERATOR=helm`` and the e2e test of the chart use this: ``helm upgrade --install``
of ``charts/dsi-operator`` into a namespace of its own, with the pod placed on a process node
(whose virtualenv stands in for the operator image, entrypoint from the Dockerfile) and
watching the given namespaces. It then talks to the API server as an in-cluster client: its
ServiceAccount token, the chart's RBAC, through the node's API relay.

What a process node does not enforce: ``runAsUser``/``runAsNonRoot`` and
``readOnlyRootFilesystem`` (the pod's processes run as the agent's user, on the host's
filesystem). Probes, the token, env, volumes and the grace period are real.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from . import build, config
from .kubelet.agent import LABEL as PROCESS_NODE_LABEL

RELEASE = "dsi-operator"
CHART = config.repo_root() / "charts" / "dsi-operator"


def pod_selector(release: str = RELEASE) -> str:
    """The operator pod's labels (the chart's selector labels for the release)."""
    return f"app.kubernetes.io/name=dsi-operator,app.kubernetes.io/instance={release}"


def values(watch: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Chart values: the pod on a process node, watching ``watch`` (all namespaces if empty)."""
    return {
        "watchNamespaces": list(watch),
        "nodeSelector": {PROCESS_NODE_LABEL: "true"},
        "tolerations": [{"key": PROCESS_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
        **(extra or {}),
    }


def helm(cfg: config.ClusterConfig, *args: str, timeout: float = 360) -> str:
    """Run the cluster's helm (built on demand) and return its stdout; raise with stderr."""
    build.build(["helm"], cfg.cache_dir)
    exe = build.HELM.binary(cfg.cache_dir)
    proc = subprocess.run(
        [str(exe), f"--kubeconfig={cfg.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout


def install(
    cfg: config.ClusterConfig,
    namespace: str,
    watch: list[str],
    extra: dict[str, Any] | None = None,
    wait: str = "300s",
    release: str = RELEASE,
) -> str:
    """``helm upgrade --install`` the operator into ``namespace``, waiting until its pod is
    Ready (its readiness probe answers); an upgrade when the release exists. A release name
    that contains ``dsi-operator`` names the chart's objects (ClusterRoles included), so two
    releases need two such names."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(values(watch, extra), fh)
    try:
        return helm(
            cfg, "upgrade", "--install", release, str(CHART), "--namespace", namespace,
            "--create-namespace", "--values", fh.name, "--wait", "--timeout", wait,
        )  # fmt: skip
    finally:
        Path(fh.name).unlink(missing_ok=True)


def uninstall(cfg: config.ClusterConfig, namespace: str, release: str = RELEASE) -> str:
    """``helm uninstall`` the operator (the CRDs, and so every resource, stay)."""
    return helm(cfg, "uninstall", release, "--namespace", namespace, "--wait")
