"""Standard manifest linters over what this project ships and renders (docs/linters.md).

- kubeconform: schema validation, strict (unknown fields are errors), offline: the schemas
  are generated from the Kubernetes OpenAPI document and the DSI and KubeRay CRDs
  (dsi_localcluster.jsonschemas).
- kube-score and checkov: best-practice checks; every finding is fixed in the chart or
  ignored by name in .kube-score.yaml / .checkov.yaml with its reason in docs/linters.md.

The manifests: the chart with its CRD, rendered with its default values and with
watchNamespaces set, and what the operator renders (RayService + Services) from each
examples/*.yaml.
The tools are pinned and built or installed into the cache on first use; no cluster.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_localcluster import build, config, jsonschemas, linters
from dsi_operator.api import labels as L
from dsi_operator.batch.render import render_batch_body
from dsi_operator.serving.render import render_body

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dsi-operator"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CHECKOV_CONFIG = ROOT / ".checkov.yaml"
KUBE_SCORE_CONFIG = ROOT / ".kube-score.yaml"
LINTERS_DOC = ROOT / "docs" / "linters.md"
NAMESPACE = "dsi-system"
# The sets of manifests kube-score judges separately (the keys of .kube-score.yaml).
CHART_SET, RAYSERVICE_SET = "chart", "rayservice"


def cache_dir() -> Path:
    return config.ClusterConfig.from_env().cache_dir


def run(
    argv: list[str], timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def helm_template(*args: str) -> str:
    """`helm template` of the chart with the pinned helm (no --kube-version: the build sets
    helm's default Kubernetes version)."""
    helm = str(build.tool_path("helm", cache_dir()))
    proc = run([helm, "template", "dsi", str(CHART), "--namespace", NAMESPACE, *args])
    assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def rendered_rayservices() -> list[dict[str, Any]]:
    """What the operator creates for each example (DeepSpeedInference: the RayService and
    Services first; DeepSpeedBatchInference: its RayJob, Services, ConfigMap and RBAC)."""
    out: list[dict[str, Any]] = []
    for path in EXAMPLES:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
        body["metadata"].update(namespace="dsi-demo", uid="00000000-0000-0000-0000-000000000001")
        out += render_batch_body(body) if body["kind"] == L.BATCH_KIND else render_body(body)
    return out


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Set name -> directory of rendered manifests."""
    root = tmp_path_factory.mktemp("manifests")
    chart, rayservice = root / CHART_SET, root / RAYSERVICE_SET
    chart.mkdir()
    rayservice.mkdir()
    (chart / "default.yaml").write_text(helm_template("--include-crds"))
    (chart / "watch-namespaces.yaml").write_text(
        helm_template("--set", "watchNamespaces={team-a,team-b}")
    )
    (rayservice / "rendered.yaml").write_text(yaml.safe_dump_all(rendered_rayservices()))
    return {CHART_SET: chart, RAYSERVICE_SET: rayservice}


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schemas")
    # The KubeRay CRDs are copied out of its module when it is built (a no-op when cached).
    build.build(["kuberay"], cache_dir())
    crds = [*sorted((ROOT / "crds").glob("*.yaml")), *build.kuberay_crds(cache_dir())]
    jsonschemas.write_schemas(out, jsonschemas.kubernetes_openapi_path(), crds)
    return out


def kubeconform(schemas: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    exe = str(build.tool_path("kubeconform", cache_dir()))
    location = jsonschemas.location_template(schemas)
    # Only the generated schemas (no default location: that one is on GitHub), strict.
    return run([exe, "-strict", "-summary", "-output", "json", "-schema-location", location,
                *map(str, files)])  # fmt: skip


# --- helm: the build's default Kubernetes version --------------------------------------------


def test_helm_template_works_without_kube_version() -> None:
    kinds = {d["kind"] for d in yaml.safe_load_all(helm_template()) if d}
    assert {"Deployment", "ServiceAccount", "NetworkPolicy"} <= kinds


def test_helm_ldflags_set_the_kubernetes_version_and_key_the_cache(tmp_path: Path) -> None:
    major, minor = config.KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        assert f"-X {pkg}.k8sVersionMajor={major}" in build.HELM.ldflags
        assert f"-X {pkg}.k8sVersionMinor={minor}" in build.HELM.ldflags
    # A cached build made with other flags is stale and gets rebuilt.
    exe = build.HELM.binary(tmp_path)
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert not build.HELM.is_built(tmp_path)
    (exe.parent / build.BUILD_KEY_FILE).write_text(build.HELM.build_key())
    assert build.HELM.is_built(tmp_path)
    (exe.parent / build.BUILD_KEY_FILE).write_text(build.HELM.build_key().replace("-s -w", "-s"))
    assert not build.HELM.is_built(tmp_path)


# --- kubeconform -------------------------------------------------------------------------------


def test_kubeconform_accepts_the_chart_the_rendered_rayservice_and_the_examples(
    manifests: dict[str, Path], schemas: Path
) -> None:
    files = [*manifests.values(), *EXAMPLES]
    proc = kubeconform(schemas, *files)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, json.dumps(report["resources"], indent=1)
    summary = report["summary"]
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0, summary
    kinds = set()
    for f in files:
        paths = sorted(f.glob("*.yaml")) if f.is_dir() else [f]
        for p in paths:
            kinds |= {d["kind"] for d in yaml.safe_load_all(p.read_text()) if d}
    assert {"CustomResourceDefinition", "Deployment", "NetworkPolicy", "RayService"} <= kinds
    assert "DeepSpeedInference" in kinds and summary["valid"] >= len(EXAMPLES) + 10


def test_kubeconform_rejects_unknown_fields(schemas: Path, tmp_path: Path) -> None:
    """The schemas are strict and found: a misspelt field in a RayService pod template and in
    a DeepSpeedInference spec are errors (a schema kubeconform cannot load would be too)."""
    rayservice = rendered_rayservices()[0]
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "imagePullPolicyy"
    ] = "Always"
    dsi = yaml.safe_load(EXAMPLES[0].read_text())
    dsi["spec"]["tensorParallelSise"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([rayservice, dsi]))
    proc = kubeconform(schemas, bad)
    assert proc.returncode != 0
    errors = [r["msg"] for r in json.loads(proc.stdout)["resources"]]
    assert any("imagePullPolicyy" in e for e in errors), errors
    assert any("tensorParallelSise" in e for e in errors), errors


# --- kube-score --------------------------------------------------------------------------------


def kube_score_ignored() -> dict[str, list[str]]:
    data: dict[str, list[str]] = yaml.safe_load(KUBE_SCORE_CONFIG.read_text(encoding="utf-8"))
    return data


def kube_score(directory: Path, ignored: list[str]) -> tuple[int, list[str]]:
    """kube-score's exit status and its findings (critical and warning lines)."""
    exe = str(build.tool_path("kube-score", cache_dir()))
    argv = [exe, "score", "--output-format", "ci", "--exit-one-on-warning"]
    for test in ignored:
        argv += ["--ignore-test", test]
    proc = run([*argv, *map(str, sorted(directory.glob("*.yaml")))])
    findings = [ln for ln in proc.stdout.splitlines() if ln.startswith(("[CRITICAL]", "[WARNING]"))]
    return proc.returncode, findings


@pytest.mark.parametrize("manifest_set", [CHART_SET, RAYSERVICE_SET])
def test_kube_score_has_no_unexplained_findings(
    manifests: dict[str, Path], manifest_set: str
) -> None:
    rc, findings = kube_score(manifests[manifest_set], kube_score_ignored()[manifest_set])
    assert findings == [] and rc == 0, "\n".join(findings)


@pytest.mark.parametrize("manifest_set", [CHART_SET, RAYSERVICE_SET])
def test_kube_score_ignores_are_all_needed(manifests: dict[str, Path], manifest_set: str) -> None:
    """Without the ignore list, exactly the ignored tests fire: no stale entry."""
    exe = str(build.tool_path("kube-score", cache_dir()))
    files = [str(p) for p in sorted(manifests[manifest_set].glob("*.yaml"))]
    proc = run([exe, "score", "--output-format", "json", "--exit-one-on-warning", *files])
    fired = set()
    for obj in json.loads(proc.stdout):
        for check in obj["checks"]:
            # kube-score's grades: 1 critical, 5 warning, 7 almost OK, 10 all OK.
            if check["grade"] <= 5 and not check["skipped"]:
                fired.add(check["check"]["id"])
    assert fired == set(kube_score_ignored()[manifest_set])


# --- checkov -----------------------------------------------------------------------------------


def checkov(directory: Path, *args: str) -> dict[str, Any]:
    """checkov's JSON report for the kubernetes framework over `directory`."""
    exe = str(linters.checkov_path(cache_dir()))
    # Run from the manifests' directory: checkov also reads a .checkov.yaml in its working
    # directory, and the repository's must apply only where it is named.
    argv = [exe, "--directory", str(directory), "--output", "json", *args]
    proc = run(argv, timeout=600, cwd=directory)
    assert proc.returncode in (0, 1), f"checkov failed:\n{proc.stdout[-3000:]}\n{proc.stderr}"
    report = json.loads(proc.stdout)
    # One framework gives one report; checkov prints a list when it ran several.
    result: dict[str, Any] = report[0] if isinstance(report, list) else report
    assert result["check_type"] == "kubernetes"
    return result


def checkov_skipped() -> set[str]:
    return set(yaml.safe_load(CHECKOV_CONFIG.read_text(encoding="utf-8"))["skip-check"])


def test_checkov_has_no_unexplained_findings(manifests: dict[str, Path]) -> None:
    report = checkov(manifests[CHART_SET].parent, "--config-file", str(CHECKOV_CONFIG))
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 50 and report["summary"]["parsing_errors"] == 0


def test_checkov_skips_are_all_needed(manifests: dict[str, Path]) -> None:
    """Without the skip list (same framework, offline), exactly the skipped checks fail."""
    report = checkov(
        manifests[CHART_SET].parent, "--framework", "kubernetes", "--quiet", "--skip-download"
    )
    assert {c["check_id"] for c in report["results"]["failed_checks"]} == checkov_skipped()


def test_every_ignored_check_is_explained_in_docs() -> None:
    doc = LINTERS_DOC.read_text(encoding="utf-8")
    names = checkov_skipped() | {t for tests in kube_score_ignored().values() for t in tests}
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert missing == [], f"docs/linters.md does not explain {missing}"
