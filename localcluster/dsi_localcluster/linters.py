"""The manifest linters the tests run (docs/linters.md): where their pinned copies live.

kubeconform and kube-score are Go programs, built like the cluster's components
(build.KUBECONFORM, build.KUBE_SCORE). checkov is a Python program with some hundred pinned
dependencies (boto3, networkx, pydantic, ...) that would fight the project's own (ray,
pydantic): it gets a virtualenv of its own in the cache, made by uv on first use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from . import build, config

# Written last into the checkov virtualenv: a half-made one (interrupted install) lacks it
# and is made again.
_INSTALLED_MARK = ".installed"


def _uv() -> str:
    """The uv the Makefile installed next to the project's Python, else one on PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.exists():
        return str(beside)
    found = shutil.which("uv")
    if found is None:
        raise build.BuildError("uv is needed to install checkov (`make venv` installs it)")
    return found


def checkov_dir(cache_dir: Path, version: str = config.CHECKOV_VERSION) -> Path:
    """The virtualenv holding checkov==version."""
    return cache_dir / "tools" / f"checkov-{version}"


def checkov_path(cache_dir: Path | None = None, version: str = config.CHECKOV_VERSION) -> Path:
    """The pinned checkov executable, installed into its own virtualenv first if needed."""
    cache_dir = cache_dir or config.default_cache_dir()
    venv = checkov_dir(cache_dir, version)
    exe = venv / "bin" / "checkov"
    if (venv / _INSTALLED_MARK).exists() and exe.exists():
        return exe
    # A virtualenv cannot be renamed into place (its scripts name their own path), so an
    # unfinished one is removed and made again rather than built aside.
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    build.log(f"installing checkov {version} into {venv} (first time, about a minute)")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    uv = _uv()
    pip = [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python")]
    for argv in (
        [uv, "venv", "--quiet", "--python", python, str(venv)],
        [*pip, f"checkov=={version}"],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise build.BuildError(
                f"installing checkov failed: {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}"
            )
    (venv / _INSTALLED_MARK).write_text(version + "\n")
    return exe
