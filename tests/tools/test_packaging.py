"""The images ship only what they run: the operator and worker wheels (issue 30, item 5).

Each image installs one wheel, built by the Dockerfile's ``wheel`` stage from its own
pyproject.toml: ``dsi-operator`` (operator/) and ``dsi-worker`` (worker/). No Docker engine
exists on the machines that run these tests, so no image can be built here and its file list
cannot be read: these tests build the same two wheels with ``uv build --wheel`` (what the
Dockerfile's ``pip wheel`` does, from the same directories) and check what the images would
install from them: the files (no dsi_localcluster, no test code, every first-party import
inside the wheel) and ``Requires-Dist`` (every third-party import required, no dev or test
tools). The images add only the base image and these wheels' dependencies.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from dsi_operator._version import __version__

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("dsi_operator", "dsi_worker", "dsi_localcluster")
SOURCE_DIRS = {
    "dsi_operator": "operator",
    "dsi_worker": "worker",
    "dsi_localcluster": "localcluster",
}
IMAGES = ("operator", "worker")
#: Third-party modules a wheel imports that a required distribution brings along.
PROVIDED_BY = {"fastapi": "ray", "starlette": "ray", "psutil": "deepspeed"}
#: Never in an image, whatever the dev extras say.
TEST_TOOLS = {"hypothesis", "pytest", "pytest-timeout", "schemathesis", "cryptography"}


@dataclass(frozen=True)
class Wheel:
    """A built wheel: its file names and its metadata."""

    path: Path
    files: frozenset[str]
    version: str
    requires: tuple[str, ...]

    def top_level(self) -> set[str]:
        """The top-level packages and modules it installs."""
        return {f.split("/")[0].removesuffix(".py") for f in self.files if ".dist-info/" not in f}

    def python_files(self, package: str) -> set[str]:
        """Its ``.py`` files under ``package``/."""
        return {f for f in self.files if f.startswith(f"{package}/") and f.endswith(".py")}


def dist_name(requirement: str) -> str:
    """The normalised distribution name of a requirement (``ray[serve]==2`` -> ``ray``)."""
    name = re.split(r"[<>=!~\[ ;(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def uv_exe() -> str:
    exe = Path(sys.executable).parent / "uv"
    found = str(exe) if exe.exists() else shutil.which("uv")
    assert found, "uv not installed: `make venv` installs it into .venv"
    return found


def read_wheel(path: Path) -> Wheel:
    """A built wheel's file names and metadata."""
    with zipfile.ZipFile(path) as zf:
        files = frozenset(zf.namelist())
        meta_name = next(f for f in files if f.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    return Wheel(path, files, meta["Version"], tuple(meta.get_all("Requires-Dist") or ()))


def build_wheels(src: Path, out: Path, offline: bool) -> dict[str, str]:
    """Build both wheels at once (``uv build --wheel``); the failures' output by image."""
    procs = {}
    for d in IMAGES:
        cmd = [uv_exe(), "build", "--wheel", "--quiet", "--out-dir", str(out / d), str(src / d)]
        procs[d] = subprocess.Popen(
            cmd + (["--offline"] if offline else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    outputs = {d: p.communicate(timeout=180)[0] for d, p in procs.items()}
    return {d: outputs[d] for d, p in procs.items() if p.returncode != 0}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Wheel]:
    """Both images' wheels, built from a copy of operator/ and worker/ (a build writes
    build/ and *.egg-info next to the sources; the shared tree stays clean). Offline first:
    with setuptools in uv's cache that takes seconds, not the index's round trips."""
    tmp = tmp_path_factory.mktemp("packaging")
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for d in IMAGES:
        shutil.copytree(ROOT / d, tmp / "src" / d, ignore=skip)
    if build_wheels(tmp / "src", tmp / "dist", offline=True):
        failed = build_wheels(tmp / "src", tmp / "dist", offline=False)
        assert not failed, failed
    return {d: read_wheel(next((tmp / "dist" / d).glob("*.whl"))) for d in IMAGES}


def source_files(package: str) -> set[str]:
    """The ``.py`` files of a first-party package in this tree, as wheel paths."""
    base = ROOT / SOURCE_DIRS[package]
    return {
        p.relative_to(base).as_posix()
        for p in (base / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_wheels_carry_the_project_version(wheels: dict[str, Wheel]) -> None:
    for w in wheels.values():
        assert w.version == __version__, w.path.name
        assert f"-{__version__}-" in w.path.name


def test_operator_wheel_is_the_whole_operator_and_nothing_else(wheels: dict[str, Wheel]) -> None:
    w = wheels["operator"]
    assert w.top_level() == {"dsi_operator"}
    assert w.python_files("dsi_operator") == source_files("dsi_operator")
    assert "dsi_operator/__main__.py" in w.files  # the image's ENTRYPOINT: python -m dsi_operator


def test_worker_wheel_is_the_worker_and_the_operator_modules_it_imports(
    wheels: dict[str, Wheel],
) -> None:
    w = wheels["worker"]
    assert w.top_level() == {"dsi_worker", "dsi_operator"}
    assert w.python_files("dsi_worker") == source_files("dsi_worker")
    # Ray Serve's import path and the batch job's entry point (dsi_operator.api.labels).
    assert {"dsi_worker/app.py", "dsi_worker/batch/__main__.py"} <= w.files
    # Of the operator, only the modules the worker imports (and _version, which brings the
    # package's __init__): worker/pyproject.toml lists them.
    imported = {m for m in wheel_imports(w) if m.startswith("dsi_operator.")}
    wanted = {f for m in imported if is_first_party_module(m) for f in module_files(m)}
    assert w.python_files("dsi_operator") == wanted | {"dsi_operator/_version.py"}


@pytest.mark.parametrize("image", IMAGES)
def test_no_local_cluster_or_test_code(wheels: dict[str, Wheel], image: str) -> None:
    for name in wheels[image].files:
        path = PurePosixPath(name)
        assert path.parts[0] != "dsi_localcluster", name
        assert not {"tests", "test", "testing"} & set(path.parts[:-1]), name
        assert not re.fullmatch(r"test_.*\.py|.*_test\.py|conftest\.py", path.name), name
        assert "specfuzz" not in name and "fuzz" not in path.name, name


def imported_modules(source: str) -> set[str]:
    """Every absolute module an import in ``source`` may load (``from a import b``: ``a``
    and ``a.b``), at module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, "relative imports: resolve them here first"
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
    return out


@functools.cache
def wheel_imports(w: Wheel) -> set[str]:
    """Every module the wheel's ``.py`` files import."""
    with zipfile.ZipFile(w.path) as zf:
        return {
            m for f in w.files if f.endswith(".py") for m in imported_modules(zf.read(f).decode())
        }


def is_first_party_module(module: str) -> bool:
    """Whether ``module`` is a module or package of this tree (not a name inside one)."""
    base = ROOT / SOURCE_DIRS[module.split(".")[0]] / module.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def module_files(module: str) -> set[str]:
    """The wheel files that must exist for ``module`` to import: its own and its parents'."""
    parts = module.split(".")
    parents = {"/".join(parts[:i]) + "/__init__.py" for i in range(1, len(parts))}
    own = "/".join(parts)
    is_package = (ROOT / SOURCE_DIRS[parts[0]] / own / "__init__.py").is_file()
    return parents | {own + ("/__init__.py" if is_package else ".py")}


@pytest.mark.parametrize("image", IMAGES)
def test_first_party_imports_resolve_inside_the_wheel(wheels: dict[str, Wheel], image: str) -> None:
    """A module the wheel imports (even lazily) is in the wheel, or the image fails at run
    time: e.g. a worker module that starts importing another dsi_operator module."""
    w = wheels[image]
    mods = {
        m for m in wheel_imports(w) if m.split(".")[0] in FIRST_PARTY and is_first_party_module(m)
    }
    missing = {m for m in mods if not module_files(m) <= w.files}
    assert not missing, f"{image} wheel imports modules it does not hold: {sorted(missing)}"


@pytest.mark.parametrize("image", IMAGES)
def test_third_party_imports_are_required(wheels: dict[str, Wheel], image: str) -> None:
    """Every third-party module the wheel imports comes from a distribution it requires
    (directly, or through PROVIDED_BY), so the image installs it."""
    w = wheels[image]
    required = {dist_name(r) for r in w.requires}
    dists = distributions_of_modules()
    top = {m.split(".")[0] for m in wheel_imports(w)}
    third = top - set(sys.stdlib_module_names) - set(FIRST_PARTY)
    unmet = {}
    for mod in sorted(third):
        owners = {dist_name(d) for d in dists.get(mod, [])}
        assert owners, f"{mod}: not installed in the dev venv, cannot map it to a distribution"
        if not owners & required and PROVIDED_BY.get(mod) not in required:
            unmet[mod] = owners
    assert not unmet, f"{image} wheel imports modules it does not require: {unmet}"


@functools.cache
def distributions_of_modules() -> Mapping[str, list[str]]:
    """Top-level module -> the installed distributions that provide it (the dev venv)."""
    return packages_distributions()


def root_project() -> dict[str, Any]:
    """The ``[project]`` table of the root pyproject.toml (the dev install)."""
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


@pytest.mark.parametrize("image", IMAGES)
def test_requires_dist_holds_no_dev_or_test_tools(wheels: dict[str, Wheel], image: str) -> None:
    root = root_project()
    extras = root["optional-dependencies"]
    dev_only = {dist_name(d) for k in ("dev", "eval", "localcluster") for d in extras[k]}
    runtime = {dist_name(d) for d in [*root["dependencies"], *extras["worker"]]}
    forbidden = (dev_only - runtime) | TEST_TOOLS
    required = {dist_name(r) for r in wheels[image].requires}
    assert required, "no Requires-Dist at all: the build lost the dependencies"
    assert not required & forbidden, sorted(required & forbidden)
    # No extras: the image installs the wheel as is, so everything it needs is required.
    assert not [r for r in wheels[image].requires if "extra ==" in r]


def test_operator_wheel_pulls_no_worker_stack(wheels: dict[str, Wheel]) -> None:
    required = {dist_name(r) for r in wheels["operator"].requires}
    assert not required & {"torch", "ray", "deepspeed", "transformers", "pyarrow"}
    assert {"kopf", "kubernetes", "pydantic"} <= required
    assert {"ray", "torch", "deepspeed"} <= {dist_name(r) for r in wheels["worker"].requires}


def test_dev_install_lists_the_images_dependencies() -> None:
    """The root pyproject.toml (`make venv`) repeats the two lists: they must not drift."""
    root = root_project()
    extras = root["optional-dependencies"]
    for sub, listed in (("operator", root["dependencies"]), ("worker", extras["worker"])):
        own = tomllib.loads((ROOT / sub / "pyproject.toml").read_text())["project"]
        assert own["dependencies"] == listed, f"{sub}/pyproject.toml vs the root's"
        assert own["dynamic"] == ["version"]  # from dsi_operator/_version.py, nowhere else


def test_dockerfile_builds_and_installs_only_these_wheels() -> None:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.MULTILINE)
    assert sorted(c.split()[0] for c in copies) == ["operator/", "worker/"], copies
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/operator ./operator" in text
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/worker ./worker" in text
    from_wheel = re.findall(r"^COPY --from=wheel (\S+) ", text, re.MULTILINE)
    assert from_wheel == ["/wheels/operator", "/wheels/worker"]
    assert "localcluster" not in re.sub(r"#.*", "", text)
