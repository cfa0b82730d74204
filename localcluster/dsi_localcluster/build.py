"""Builds the cluster's Go programs from the Go module proxy into a per-user cache.

Each component lands in ``<cache>/<component>-<version>/``. A component whose binaries are all
present is skipped, so only the first `up` on a machine pays for the builds. Builds run one
after another: the Kubernetes build alone saturates a small machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import config

GOBUILD_DIR = Path(__file__).resolve().parent.parent / "gobuild"
# Written next to the binaries: Component.build_key() of the build that made them.
BUILD_KEY_FILE = ".build-key"


class BuildError(RuntimeError):
    """A component failed to build; the message names it and carries its log's tail."""


@dataclass(frozen=True)
class Component:
    """One cached build: where its binaries go and the go command that makes them."""

    name: str
    version: str
    binaries: tuple[str, ...]
    # Either a wrapper module under gobuild/ (go build there) or a module@version (go install).
    module_dir: str | None
    packages: tuple[str, ...]
    ldflags: str
    minutes: str
    # Files copied out of the (go install) module's source: (subdirectory, glob) pairs.
    data: tuple[tuple[str, str], ...] = ()
    # module@version whose source holds the data files.
    source_module: str = ""

    def dir(self, cache_dir: Path) -> Path:
        """The cache directory holding this component's binaries."""
        return cache_dir / f"{self.name}-{self.version}"

    def binary(self, cache_dir: Path, name: str | None = None) -> Path:
        """Path of one of this component's binaries (the first by default)."""
        return self.dir(cache_dir) / (name or self.binaries[0])

    def build_key(self) -> str:
        """What the binaries were built from and with, beyond the version: a build whose
        recorded key differs (new ldflags, packages or data) is stale and is rebuilt."""
        return json.dumps(
            {
                "module_dir": self.module_dir,
                "packages": list(self.packages),
                "ldflags": self.ldflags,
                "data": [list(d) for d in self.data],
                "source_module": self.source_module,
            },
            sort_keys=True,
        )

    def is_built(self, cache_dir: Path) -> bool:
        """True when every binary exists and is executable and was built with this key."""
        if not all(os.access(self.binary(cache_dir, b), os.X_OK) for b in self.binaries):
            return False
        try:
            recorded = (self.dir(cache_dir) / BUILD_KEY_FILE).read_text()
        except OSError:
            return False
        if recorded != self.build_key():
            return False
        return all(any((self.dir(cache_dir) / sub).glob("*")) for sub, _ in self.data)

    def go_command(self, out_dir: Path) -> tuple[list[str], Path | None, dict[str, str]]:
        """The go invocation that builds into out_dir: (argv, cwd, extra environment)."""
        # -v lists each package as it is compiled: the progress lines count them.
        flags = ["-v", "-trimpath", "-buildvcs=false", "-ldflags", self.ldflags]
        if self.module_dir is not None:
            # One package: name the file (a wrapper module's binary would be named after the
            # module); several: go build wants a directory.
            out = out_dir / self.binaries[0] if len(self.packages) == 1 else out_dir
            argv = [
                "go",
                "build",
                *flags,
                "-o",
                str(out) + ("" if len(self.packages) == 1 else os.sep),
                *self.packages,
            ]
            return argv, GOBUILD_DIR / self.module_dir, {}
        argv = ["go", "install", *flags, *self.packages]
        return argv, None, {"GOBIN": str(out_dir)}


def _k8s_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    parts = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        parts += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
        ]
    parts.append("-X k8s.io/component-base/version.gitTreeState=clean")
    return " ".join(parts)


def _helm_ldflags(helm_version: str, kube_version: str) -> str:
    """helm's version, and the Kubernetes version `helm template`/`helm lint` assume without
    --kube-version. helm's release builds set the latter from its Makefile; unset, helm says
    v1.20 and refuses the chart (kubeVersion >=1.29)."""
    major, minor = kube_version.lstrip("v").split(".")[:2]
    parts = ["-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={helm_version}"]
    for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        parts += [f"-X {pkg}.k8sVersionMajor={major}", f"-X {pkg}.k8sVersionMinor={minor}"]
    return " ".join(parts)


KUBERNETES = Component(
    name="kubernetes",
    version=config.KUBERNETES_VERSION,
    binaries=("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
    module_dir="kubernetes",
    packages=tuple(
        f"k8s.io/kubernetes/cmd/{c}"
        for c in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
    ),
    ldflags=_k8s_ldflags(config.KUBERNETES_VERSION),
    minutes="10-20",
)
ETCD = Component(
    name="etcd",
    version=config.ETCD_VERSION,
    binaries=("etcd",),
    module_dir="etcd",
    packages=(".",),
    ldflags="-s -w",
    minutes="2-5",
)
KWOK = Component(
    name="kwok",
    version=config.KWOK_VERSION,
    binaries=("kwok",),
    module_dir=None,
    packages=(f"sigs.k8s.io/kwok/cmd/kwok@{config.KWOK_VERSION}",),
    ldflags="-s -w",
    minutes="3-6",
    data=(
        ("stages", "kustomize/stage/node/fast/node-initialize.yaml"),
        ("stages", "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml"),
        ("stages", "kustomize/stage/pod/fast/pod-*.yaml"),
    ),
    source_module=f"sigs.k8s.io/kwok@{config.KWOK_VERSION}",
)
KUBERAY = Component(
    name="kuberay",
    version=config.KUBERAY_VERSION,
    binaries=("ray-operator",),
    # A wrapper module (gobuild/kuberay), not `go install ...@version`: see its go.mod.
    module_dir="kuberay",
    packages=("github.com/ray-project/kuberay/ray-operator",),
    ldflags="-s -w",
    minutes="3-6",
    data=(("crds", "config/crd/bases/*.yaml"),),
    source_module=f"github.com/ray-project/kuberay/ray-operator@{config.KUBERAY_VERSION}",
)
HELM = Component(
    name="helm",
    version=config.HELM_VERSION,
    binaries=("helm",),
    module_dir=None,
    packages=(f"helm.sh/helm/v3/cmd/helm@{config.HELM_VERSION}",),
    ldflags=_helm_ldflags(config.HELM_VERSION, config.KUBERNETES_VERSION),
    minutes="3-6",
)
# Manifest linters (tests/tools/test_linters.py, docs/linters.md); not needed by `up`.
KUBECONFORM = Component(
    name="kubeconform",
    version=config.KUBECONFORM_VERSION,
    binaries=("kubeconform",),
    module_dir=None,
    packages=(f"github.com/yannh/kubeconform/cmd/kubeconform@{config.KUBECONFORM_VERSION}",),
    ldflags=f"-s -w -X main.version={config.KUBECONFORM_VERSION}",
    minutes="1-2",
)
KUBE_SCORE = Component(
    name="kube-score",
    version=config.KUBE_SCORE_VERSION,
    binaries=("kube-score",),
    module_dir=None,
    packages=(f"github.com/zegl/kube-score/cmd/kube-score@{config.KUBE_SCORE_VERSION}",),
    ldflags=f"-s -w -X main.version={config.KUBE_SCORE_VERSION}",
    minutes="1-3",
)

COMPONENTS: dict[str, Component] = {
    c.name: c for c in (ETCD, KUBERNETES, KWOK, KUBERAY, HELM, KUBECONFORM, KUBE_SCORE)
}
# What `up` needs; helm is only for the chart tests and users, the linters only for tests.
CLUSTER_COMPONENTS = ("etcd", "kubernetes", "kwok", "kuberay")


def log(msg: str) -> None:
    """Progress line on stderr (stdout stays clean for `env`)."""
    print(f"[dsi-localcluster] {msg}", file=sys.stderr, flush=True)


def check_go() -> str:
    """Return `go version`'s output, or raise with what to install."""
    go = shutil.which("go")
    if go is None:
        raise BuildError(
            "the `go` command is not on PATH; Go >= 1.26 is needed to build the cluster's "
            "components (https://go.dev/dl/)"
        )
    out = subprocess.run([go, "version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def build_component(comp: Component, cache_dir: Path, force: bool = False) -> bool:
    """Build one component unless cached. Returns True when it built something."""
    target = comp.dir(cache_dir)
    if comp.is_built(cache_dir) and not force:
        return False
    cache_dir.mkdir(parents=True, exist_ok=True)
    logs = cache_dir / "logs"
    logs.mkdir(exist_ok=True)
    logfile = logs / f"{comp.name}-{comp.version}.log"
    # Build into a scratch directory and rename, so an interrupted build never looks cached.
    scratch = cache_dir / f".{comp.name}-{comp.version}.building-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    argv, cwd, extra_env = comp.go_command(scratch)
    env = dict(os.environ, **extra_env)
    log(
        f"building {comp.name} {comp.version} ... (first time, {comp.minutes} minutes; "
        f"log: {logfile})"
    )
    started = time.monotonic()
    with logfile.open("w") as fh:
        fh.write("$ " + " ".join(argv) + f"\n# cwd: {cwd or '.'}\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            _wait_with_progress(proc, comp, logfile, started)
        except BaseException:
            proc.kill()
            proc.wait()
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise BuildError(
            f"building {comp.name} {comp.version} failed (exit {proc.returncode}, "
            f"{elapsed:.0f}s)\ncommand: {' '.join(argv)}\nlog: {logfile}\n"
            f"--- last lines of the log ---\n{_tail(logfile)}"
        )
    missing = [b for b in comp.binaries if not (scratch / b).exists()]
    if missing:
        shutil.rmtree(scratch, ignore_errors=True)
        raise BuildError(f"building {comp.name} produced no {', '.join(missing)}; log: {logfile}")
    if comp.data:
        _copy_module_data(comp, scratch, env)
    (scratch / BUILD_KEY_FILE).write_text(comp.build_key())
    if target.exists():
        shutil.rmtree(target)
    scratch.rename(target)
    log(f"built {comp.name} {comp.version} in {elapsed:.0f}s")
    _record_timing(cache_dir, comp, elapsed)
    return True


PROGRESS_EVERY_S = 60.0


def _wait_with_progress(
    proc: subprocess.Popen[bytes], comp: Component, logfile: Path, started: float
) -> None:
    """Wait for the build, printing a line a minute so a long first build shows life."""
    next_report = started + PROGRESS_EVERY_S
    while proc.poll() is None:
        time.sleep(1.0)
        now = time.monotonic()
        if now >= next_report:
            next_report = now + PROGRESS_EVERY_S
            try:
                lines = logfile.read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            # With -v, go prints one line per package it compiles (downloads say "go: ...").
            pkgs = [ln for ln in lines[2:] if ln and not ln.startswith(("go: ", "#", "$"))]
            last = pkgs[-1] if pkgs else "(resolving modules)"
            log(
                f"  still building {comp.name}: {(now - started) / 60:.0f} min, "
                f"{len(pkgs)} packages compiled, last {last}"
            )


def _record_timing(cache_dir: Path, comp: Component, seconds: float) -> None:
    path = cache_dir / "build-times.json"
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[f"{comp.name}-{comp.version}"] = round(seconds, 1)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_module_data(comp: Component, out: Path, env: dict[str, str]) -> None:
    """Copy manifests shipped in the module's source (KubeRay CRDs, kwok stages) to out."""
    proc = subprocess.run(
        ["go", "mod", "download", "-json", comp.source_module],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise BuildError(
            f"go mod download {comp.source_module} failed:\n{proc.stdout}\n{proc.stderr}"
        )
    root = Path(json.loads(proc.stdout)["Dir"])
    for sub, pattern in comp.data:
        dst = out / sub
        dst.mkdir(exist_ok=True)
        found = sorted(root.glob(pattern))
        if not found:
            raise BuildError(f"{comp.name}: nothing matches {pattern} under {root}")
        for src in found:
            shutil.copyfile(src, dst / src.name)


def kuberay_crds(cache_dir: Path) -> list[Path]:
    """The KubeRay CRD manifests copied at build time."""
    return sorted((KUBERAY.dir(cache_dir) / "crds").glob("*.yaml"))


def build(
    names: Sequence[str] = CLUSTER_COMPONENTS, cache_dir: Path | None = None, force: bool = False
) -> None:
    """Build the named components (sequentially), skipping cached ones."""
    cache_dir = cache_dir or config.default_cache_dir()
    todo = [COMPONENTS[n] for n in names]
    pending = [c for c in todo if force or not c.is_built(cache_dir)]
    if not pending:
        return
    log(f"using {check_go()}; cache {cache_dir}")
    for comp in pending:
        build_component(comp, cache_dir, force=force)


def tool_path(name: str, cache_dir: Path | None = None) -> Path:
    """The pinned binary of component `name` (helm, kubeconform, kube-score), built into the
    cache first if it is not there yet."""
    cache_dir = cache_dir or config.default_cache_dir()
    build([name], cache_dir)
    return COMPONENTS[name].binary(cache_dir)


def helm_path(cache_dir: Path | None = None) -> Path:
    """The pinned helm binary, built into the cache first if it is not there yet."""
    return tool_path("helm", cache_dir)
