"""The chart against the real local control plane: server-side validation, install,
upgrade and uninstall.

kubeconform cannot fetch schemas here (no internet), so every rendered object is sent to
the API server with `kubectl apply --dry-run=server --validate=strict`: the server's own
OpenAPI schema and strict field validation judge it. The operator's pod is scheduled onto a
kwok node, which reports it running without pulling the image.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_localcluster import config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dsi-operator"


def helm_exe() -> str:
    """The pinned helm binary (dsi_localcluster.build.helm_path), as a string for argv."""
    from dsi_localcluster.build import helm_path

    return str(helm_path(config.ClusterConfig.from_env().cache_dir))


class Helm:
    """helm bound to the local cluster's admin kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        self.exe = helm_exe()
        self.kubeconfig = str(kubeconfig)

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.exe, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture(scope="module")
def helm(cluster: Any) -> Helm:
    return Helm(cluster.kubeconfig)


def release_name() -> str:
    return f"dsi-{uuid.uuid4().hex[:6]}"


def test_rendered_objects_pass_server_side_validation(
    helm: Helm, kubectl: Any, namespace: str
) -> None:
    for values in ([], ["--set", f"watchNamespaces={{{namespace}}}"]):
        rendered = helm(
            "template",
            release_name(),
            str(CHART),
            "--namespace",
            namespace,
            "--include-crds",
            "--kube-version",
            "1.35.0",
            *values,
        ).stdout
        kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
        assert {
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
        } <= kinds
        out = kubectl(
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-n",
            namespace,
            "-f",
            "-",
            input=rendered,
        ).stdout
        assert "(server dry run)" in out


def _assert_installed(helm: Helm, kube: Any, rel: str, fullname: str, namespace: str) -> None:
    dep = kube.apps.read_namespaced_deployment(fullname, namespace)
    assert dep.status.available_replicas == 1
    assert "--all-namespaces" in dep.spec.template.spec.containers[0].args
    role = kube.rbac.read_cluster_role(fullname)
    assert any("deepspeedinferences" in (r.resources or []) for r in role.rules)
    kube.rbac.read_cluster_role_binding(fullname)
    kube.core.read_namespaced_service(f"{fullname}-metrics", namespace)
    kube.apiext.read_custom_resource_definition("deepspeedinferences.deepspeed.ai")
    status = json.loads(helm("status", rel, "-n", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert "kubectl get dsi" in status["info"]["notes"]


def _upgrade_to_one_namespace(
    helm: Helm, kube: Any, rel: str, fullname: str, namespace: str
) -> None:
    """Confine the operator to ``namespace`` and turn on debug logging."""
    helm(
        "upgrade", rel, str(CHART), "--namespace", namespace, "--reuse-values",
        "--set", f"watchNamespaces={{{namespace}}}", "--set", "logLevel=debug",
        "--wait", "--timeout", "120s",
    )  # fmt: skip
    dep = kube.apps.read_namespaced_deployment(fullname, namespace)
    args = dep.spec.template.spec.containers[0].args
    assert f"--namespace={namespace}" in args and "--log-level=debug" in args
    assert "--all-namespaces" not in args
    kube.rbac.read_namespaced_role(fullname, namespace)
    kube.rbac.read_namespaced_role_binding(fullname, namespace)
    role = kube.rbac.read_cluster_role(fullname)
    assert not any("deepspeedinferences" in (r.resources or []) for r in role.rules)
    history = json.loads(helm("history", rel, "-n", namespace, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2]


def _assert_namespace_permissions(kubectl: Any, fullname: str, namespace: str) -> None:
    """The operator's permissions in the namespace, as the API server sees them."""
    sa = f"system:serviceaccount:{namespace}:{fullname}"
    can = kubectl(
        "auth", "can-i", "patch", "deepspeedinferences.deepspeed.ai", "--subresource=status",
        "-n", namespace, "--as", sa, check=False,
    )  # fmt: skip
    assert can.stdout.strip() == "yes"
    cannot = kubectl("auth", "can-i", "get", "secrets", "-n", namespace, "--as", sa, check=False)
    assert cannot.stdout.strip() == "no"


def _assert_uninstalled(kubectl: Any, kube: Any, rel: str, namespace: str) -> None:
    selector = f"app.kubernetes.io/instance={rel}"
    kinds = "deploy,svc,sa,role,rolebinding"
    leftovers = kubectl("get", kinds, "-n", namespace, "-l", selector, "-o", "name").stdout
    assert leftovers.strip() == ""
    kinds = "clusterrole,clusterrolebinding"
    assert kubectl("get", kinds, "-l", selector, "-o", "name").stdout.strip() == ""
    # Helm never deletes CRDs from crds/: the users' DeepSpeedInference objects survive.
    kube.apiext.read_custom_resource_definition("deepspeedinferences.deepspeed.ai")


def test_install_upgrade_uninstall(helm: Helm, kube: Any, kubectl: Any, namespace: str) -> None:
    rel = release_name()
    fullname = f"{rel}-dsi-operator"
    helm("install", rel, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s")
    _assert_installed(helm, kube, rel, fullname, namespace)
    _upgrade_to_one_namespace(helm, kube, rel, fullname, namespace)
    _assert_namespace_permissions(kubectl, fullname, namespace)
    helm("uninstall", rel, "--namespace", namespace, "--wait", "--timeout", "120s")
    _assert_uninstalled(kubectl, kube, rel, namespace)


def test_kind_script_resource_is_valid(kubectl: Any, namespace: str) -> None:
    """The DeepSpeedInference hack/kind-e2e.sh applies passes the API server's validation."""
    script = (ROOT / "hack" / "kind-e2e.sh").read_text()
    defaults = dict(re.findall(r'^(\w+)="\$\{\w+:-([^}]*)\}"$', script, re.MULTILINE))
    defaults.update(
        NAME="tiny", NS=namespace, WORKER_IMAGE="registry.example/worker:dev", VERSION="dev"
    )
    body = script.split("kubectl apply -f - <<EOF\n", 1)[1].split("\nEOF\n", 1)[0]
    manifest = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], body)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    out = kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest
    ).stdout
    assert "deepspeedinference.deepspeed.ai/tiny created (server dry run)" in out
