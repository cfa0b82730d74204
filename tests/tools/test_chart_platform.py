"""The dsi-platform umbrella chart: the optional KubeRay dependency, off by default.

Helm refuses to lint (strict) or render a chart whose Chart.yaml lists a dependency that is
not in its charts/ directory, even when the dependency's condition is false. That is why
the optional kuberay-operator dependency lives in this umbrella chart and not in
charts/dsi-operator, which must install from a plain checkout without network.

The tests have no network either, so they assemble the umbrella in a temporary directory:
the real dsi-operator chart, plus a minimal stand-in chart named kuberay-operator (a test
double of the third-party chart, which we cannot fetch). That checks the wiring: the
condition, its default, and that values reach each subchart.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_operator._version import __version__

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_chart import KUBE_VERSION, helm_exe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UMBRELLA = ROOT / "charts" / "dsi-platform"


@pytest.fixture(scope="module")
def helm() -> str:
    return helm_exe()


@pytest.fixture
def assembled(tmp_path: Path) -> Path:
    """The umbrella with its dependencies in charts/: ours for real, KubeRay's stubbed."""
    chart = yaml.safe_load((UMBRELLA / "Chart.yaml").read_text())
    kuberay = next(d for d in chart["dependencies"] if d["name"] == "kuberay-operator")
    out = tmp_path / "dsi-platform"
    shutil.copytree(UMBRELLA, out)
    shutil.copytree(ROOT / "charts" / "dsi-operator", out / "charts" / "dsi-operator")
    stub = out / "charts" / "kuberay-operator"
    (stub / "templates").mkdir(parents=True)
    (stub / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "kuberay-operator",
                "version": kuberay["version"],
                "description": "test stand-in for the KubeRay operator chart",
            }
        )
    )
    (stub / "values.yaml").write_text("image:\n  tag: stub\n")
    (stub / "templates" / "marker.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kuberay-stub-marker\n"
        "data:\n  tag: {{ .Values.image.tag | quote }}\n"
    )
    return out


def template(helm: str, chart: Path, *sets: str) -> list[dict[str, Any]]:
    args = [helm, "template", "dsi", str(chart), "--namespace", "dsi-system", *KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_umbrella_declares_the_optional_dependency() -> None:
    chart = yaml.safe_load((UMBRELLA / "Chart.yaml").read_text())
    assert chart["version"] == __version__ and chart["appVersion"] == __version__
    deps = {d["name"]: d for d in chart["dependencies"]}
    assert deps["dsi-operator"]["version"] == __version__
    assert deps["dsi-operator"]["repository"] == "file://../dsi-operator"
    assert deps["kuberay-operator"]["condition"] == "kuberay-operator.enabled"
    values = yaml.safe_load((UMBRELLA / "values.yaml").read_text())
    assert values["kuberay-operator"]["enabled"] is False


def test_kuberay_is_off_by_default(helm: str, assembled: Path) -> None:
    objs = template(helm, assembled)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("Deployment", "dsi-dsi-operator") in names
    assert ("ConfigMap", "kuberay-stub-marker") not in names


def test_kuberay_enabled_and_values_reach_both_subcharts(helm: str, assembled: Path) -> None:
    objs = template(
        helm,
        assembled,
        "kuberay-operator.enabled=true",
        "kuberay-operator.image.tag=v9",
        "dsi-operator.logLevel=debug",
    )
    marker = next(o for o in objs if o["metadata"]["name"] == "kuberay-stub-marker")
    assert marker["data"]["tag"] == "v9"
    dep = next(o for o in objs if o["kind"] == "Deployment")
    assert "--log-level=debug" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_assembled_umbrella_lints_strict(helm: str, assembled: Path) -> None:
    proc = subprocess.run(
        [helm, "lint", "--strict", str(assembled), *KUBE_VERSION],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_missing_dependency_is_reported_not_hidden(helm: str) -> None:
    """From a plain checkout (no `helm dependency build`) helm names what is missing."""
    proc = subprocess.run(
        [helm, "dependency", "list", str(UMBRELLA)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln.split()[-1] for ln in proc.stdout.splitlines()[1:] if ln.strip()}
    assert rows["kuberay-operator"] == "missing"


def test_kuberay_version_is_the_one_the_tests_run() -> None:
    """Chart dependency, NOTES hint, docs and the kind script name the KubeRay version that
    the local control plane builds and the integration tests run against."""
    from dsi_localcluster.config import KUBERAY_VERSION

    version = KUBERAY_VERSION.lstrip("v")
    chart = yaml.safe_load((UMBRELLA / "Chart.yaml").read_text())
    dep = next(d for d in chart["dependencies"] if d["name"] == "kuberay-operator")
    assert dep["version"] == version
    notes = (ROOT / "charts" / "dsi-operator" / "templates" / "NOTES.txt").read_text()
    assert f"--version {version}" in notes
    assert (
        f'KUBERAY_VERSION="${{KUBERAY_VERSION:-{version}}}"'
        in (ROOT / "hack" / "kind-e2e.sh").read_text()
    )
    assert f"--version {version}" in (ROOT / "docs" / "install.md").read_text()
