"""The Helm chart, rendered offline: lint, security settings, RBAC shape, values schema.

`helm` comes from the local control plane's build cache (`python -m dsi_localcluster build
helm`, built on first use). Nothing here needs a cluster; tests/integration/test_helm.py
sends the rendered objects to a real API server.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_localcluster import config
from dsi_operator._version import __version__

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dsi-operator"
RBAC_DOC = ROOT / "docs" / "rbac.md"
# The Kubernetes version the local control plane runs; helm's default capabilities depend on
# how helm was built, so say it explicitly.
KUBE_VERSION = ("--kube-version", "1.35.0")


def helm_exe() -> str:
    """The pinned helm binary (dsi_localcluster.build.helm_path), as a string for argv."""
    from dsi_localcluster.build import helm_path

    return str(helm_path(config.ClusterConfig.from_env().cache_dir))


@pytest.fixture(scope="module")
def helm() -> str:
    return helm_exe()


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(
    helm: str, *sets: str, values: dict[str, Any] | None = None, namespace: str = "dsi-system"
) -> list[dict[str, Any]]:
    """`helm template` the chart and return its objects (NOTES and CRDs excluded)."""
    args = ["template", "dsi", str(CHART), "--namespace", namespace, *KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    if values is not None:
        args += ["--values", "-"]
    proc = subprocess.run(
        [helm, *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=yaml.safe_dump(values) if values is not None else None,
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Flatten RBAC rules to (apiGroup, resource, verb) triples."""
    out = set()
    for r in rules:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    out.add((g, res, v))
    return out


def documented_permissions() -> dict[str, set[tuple[str, str, str]]]:
    """The permission table of docs/rbac.md: scope -> {(apiGroup, resource, verb)}.

    Scopes: "namespaced" (Role per watched namespace, or the ClusterRole when watching all),
    "cluster" (always in the ClusterRole), "cluster, all namespaces" (ClusterRole, only when
    watching all namespaces).
    """
    text = RBAC_DOC.read_text(encoding="utf-8")
    block = text.split("<!-- rbac-table:begin -->", 1)[1].split("<!-- rbac-table:end -->", 1)[0]
    table: dict[str, set[tuple[str, str, str]]] = {
        "cluster": set(),
        "cluster, all namespaces": set(),
        "namespaced": set(),
    }
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        group = cells[0].strip("`")
        group = "" if group == "core" else group
        resource = cells[1].strip("`")
        scope = cells[2]
        for verb in re.findall(r"`([a-z]+)`", cells[3]):
            table[scope].add((group, resource, verb))
    return table


# --- version and packaging ----------------------------------------------------------------


def test_chart_version_is_the_project_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == __version__
    assert chart["appVersion"] == __version__


def test_chart_crd_is_the_generated_one() -> None:
    """The chart ships the CRD generated from the pydantic models, byte for byte."""
    name = "deepspeedinferences.deepspeed.ai.yaml"
    ours = (CHART / "crds" / name).read_text()
    assert ours == (ROOT / "crds" / name).read_text()
    crd = yaml.safe_load(ours)
    assert crd["spec"]["group"] == "deepspeed.ai"
    assert crd["spec"]["names"]["shortNames"] == ["dsi"]


def test_helm_lint_strict(helm: str) -> None:
    for extra in (
        [],
        ["--set", "watchNamespaces={team-a,team-b}"],
        ["--set", "metrics.serviceMonitor.enabled=true"],
    ):
        proc = run_helm(helm, "lint", "--strict", str(CHART), *KUBE_VERSION, *extra, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 chart(s) failed" in proc.stdout


# --- the Deployment -------------------------------------------------------------------------


def test_deployment_defaults(helm: str) -> None:
    objs = render(helm)
    dep = one(objs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (ctr,) = pod["containers"]
    assert ctr["image"] == f"ghcr.io/deepspeed-inference-operator/operator:{__version__}"
    sc = ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert ctr["resources"]["requests"] == {
        "cpu": "100m",
        "memory": "128Mi",
        "ephemeral-storage": "128Mi",
    }
    assert {"cpu", "memory", "ephemeral-storage"} <= ctr["resources"]["limits"].keys()
    assert ctr["imagePullPolicy"] == "Always"
    probe = ctr["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}
    # Readiness is not the liveness probe again: the metrics endpoint the Service sends to.
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    args = ctr["args"]
    assert "--all-namespaces" in args
    assert "--standalone" in args
    assert "--liveness=http://0.0.0.0:8080/healthz" in args
    assert "--metrics-port=9090" in args
    assert "--log-level=info" in args
    # Selector labels must be a subset of the pod labels, and stable (no version in them).
    sel = spec["selector"]["matchLabels"]
    assert sel.items() <= spec["template"]["metadata"]["labels"].items()
    assert not any("version" in k for k in sel)


def test_deployment_values(helm: str) -> None:
    objs = render(
        helm,
        "watchNamespaces={team-a,team-b}",
        "logLevel=debug",
        "image.repository=registry.example/ops/operator",
        "image.tag=dev",
        "metrics.enabled=false",
        "liveness.port=18080",
        "extraArgs={--foo}",
    )
    ctr = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = ctr["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace=")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--log-level=debug" in args
    assert "--metrics-port=0" in args
    assert "--liveness=http://0.0.0.0:18080/healthz" in args
    assert args[-1] == "--foo"
    assert ctr["image"] == "registry.example/ops/operator:dev"
    assert [p["name"] for p in ctr["ports"]] == ["health"]
    assert not by_kind(objs, "Service")


def test_image_digest_wins_over_tag(helm: str) -> None:
    digest = "sha256:" + "a" * 64
    objs = render(helm, f"image.digest={digest}", "image.tag=ignored")
    ctr = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert ctr["image"] == f"ghcr.io/deepspeed-inference-operator/operator@{digest}"


def test_every_object_is_labelled_and_namespaced(helm: str) -> None:
    for obj in render(helm, "watchNamespaces={team-a}"):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "dsi"
        assert labels["app.kubernetes.io/version"] == __version__
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            assert "namespace" not in obj["metadata"]
        elif obj["kind"] not in ("Role", "RoleBinding"):
            assert obj["metadata"]["namespace"] == "dsi-system"


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_service_and_optional_servicemonitor(helm: str) -> None:
    objs = render(helm)
    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    dep = one(objs, "Deployment")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert not by_kind(objs, "ServiceMonitor")

    objs = render(
        helm, "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom"
    )
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


# --- RBAC -------------------------------------------------------------------------------------


def test_rbac_all_namespaces_matches_the_documented_table(helm: str) -> None:
    objs = render(helm)
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")
    role = one(objs, "ClusterRole")
    binding = one(objs, "ClusterRoleBinding")
    sa = one(objs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "dsi-system"}
    ]
    doc = documented_permissions()
    assert rule_set(role["rules"]) == (
        doc["cluster"] | doc["cluster, all namespaces"] | doc["namespaced"]
    )


def test_rbac_listed_namespaces_get_roles_only_there(helm: str) -> None:
    objs = render(helm, "watchNamespaces={team-a,team-b}")
    doc = documented_permissions()
    cluster_role = one(objs, "ClusterRole")
    # Cluster-wide, only the cluster-scoped reads remain.
    assert rule_set(cluster_role["rules"]) == doc["cluster"]
    roles = by_kind(objs, "Role")
    bindings = by_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert rule_set(role["rules"]) == doc["namespaced"]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == "dsi-system"


def test_rbac_has_no_wildcards_and_cluster_scope_is_read_only(helm: str) -> None:
    doc = documented_permissions()
    everything = doc["cluster"] | doc["cluster, all namespaces"] | doc["namespaced"]
    for group, resource, verb in everything:
        assert "*" not in (group, resource, verb)
    assert {v for _, _, v in doc["cluster"] | doc["cluster, all namespaces"]} <= {
        "get",
        "list",
        "watch",
    }
    # No update (every write is a patch), nothing that reads Secrets or escalates cluster-wide.
    assert "update" not in {v for _, _, v in everything}
    resources = {r for _, r, _ in everything}
    assert not resources & {"secrets", "clusterroles", "clusterrolebindings", "pods/exec"}
    # The batch kind's namespaced RBAC objects (a Role on one progress ConfigMap and its
    # binding) are written, never read, bound or escalated; ConfigMaps are never listed.
    rbac_verbs = {v for g, r, v in everything if r in {"roles", "rolebindings", "serviceaccounts"}}
    assert rbac_verbs == {"create", "patch"}
    assert {v for _, r, v in everything if r == "configmaps"} == {"get", "create", "patch"}


def test_rbac_can_be_disabled(helm: str) -> None:
    objs = render(
        helm, "rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=my-sa"
    )
    kinds = {o["kind"] for o in objs}
    assert kinds.isdisjoint(
        {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}
    )
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "my-sa"


# --- values schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("logLevel=verbose", "logLevel"),
        ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("liveness.port=0", "port"),
        ("noSuchValue=1", "noSuchValue"),
    ],
)
def test_values_schema_rejects(helm: str, setting: str, message: str) -> None:
    proc = run_helm(
        helm, "template", "dsi", str(CHART), *KUBE_VERSION, "--set", setting, check=False
    )
    assert proc.returncode != 0
    assert message in proc.stderr


def test_values_schema_is_valid_json_schema() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_values_yaml_documents_every_key() -> None:
    """Every leaf key of values.yaml has a comment (directly above it or above its parent)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
        if not m or m.group(1):  # top-level keys only; nested keys sit under a comment block
            continue
        j = i - 1
        if j < 0 or not lines[j].lstrip().startswith("#"):
            # A block whose first child is commented counts (image:, serviceAccount:, ...).
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not nxt.lstrip().startswith("#"):
                undocumented.append(m.group(2))
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"
