"""Running the operator as a subprocess against the local cluster, and DSI helpers.

Used by tests/integration, tests/e2e and bench/ (installed code, so bench needs no path edits).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsi_operator.api.labels import (
    CRD_NAME,
    GROUP,
    LABEL_GROUP,
    LABEL_RANK,
    PLURAL,
    RAY_GROUP,
    RAY_VERSION_API,
    VERSION,
    selector_for,
)
from dsi_worker.ports import free_port

from dsi_localcluster.builders import DSIWrapper

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / f"{CRD_NAME}.yaml"


class OperatorProcess:
    """``python -m dsi_operator`` restricted to some namespaces; can be killed and restarted."""

    def __init__(
        self,
        kubeconfig: Path,
        namespaces: list[str] | None,
        log_path: Path,
        tick_seconds: float = 1.0,
        metrics_port: int | None = None,
        facts_ttl: float = 1.0,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log_path = log_path
        self.tick_seconds = tick_seconds
        self.facts_ttl = facts_ttl
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        #: Extra environment for the next start (e.g. DSI_OPERATOR_FAILPOINTS).
        self.extra_env: dict[str, str] = {}

    def start(self) -> None:
        """Start the operator (appending to the same log)."""
        args = [sys.executable, "-m", "dsi_operator", "--kubeconfig", str(self.kubeconfig)]
        if self.namespaces:
            for ns in self.namespaces:
                args += ["--namespace", ns]
        else:
            args += ["--all-namespaces"]
        args += [
            "--metrics-port",
            str(self.metrics_port),
            "--log-level",
            os.environ.get("DSI_TEST_OPERATOR_LOG_LEVEL", "info"),
        ]
        env = dict(os.environ)
        env["DSI_OPERATOR_TICK_SECONDS"] = str(self.tick_seconds)
        env["DSI_OPERATOR_FACTS_TTL"] = str(self.facts_ttl)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies under the operator."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def pid(self) -> int:
        """Process id of the running operator."""
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        """The last n lines of the operator's output."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def metrics(self) -> dict[str, float]:
        """The operator's Prometheus samples as {'name{labels}': value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
        return out

    def wait_metrics(self, timeout: float = 30) -> None:
        """Wait until the metrics endpoint answers (the process is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"operator metrics not up:\n{self.log_tail()}")


def dsi_manifest(name: str, tp: int = 2, replicas: int = 2, **spec: Any) -> dict[str, Any]:
    """A DSI for the simulated GPU cluster, with fast restart settings (see
    :class:`~dsi_localcluster.builders.DSIWrapper`)."""
    return DSIWrapper(name).on_simulated_gpus().tp(tp).replicas(replicas).set(**spec).obj()


def get_dsi(custom: Any, namespace: str, name: str) -> dict[str, Any]:
    """The DSI object as a dict."""
    return dict(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))


def worker_pods(
    core: Any, namespace: str, name: str, live_only: bool = True
) -> dict[tuple[int, int], Any]:
    """{(group, rank): V1Pod} of the DSI's worker pods (not being deleted by default)."""
    pods = core.list_namespaced_pod(namespace, label_selector=selector_for(name)).items
    out: dict[tuple[int, int], Any] = {}
    for p in pods:
        if live_only and p.metadata.deletion_timestamp is not None:
            continue
        labels = p.metadata.labels or {}
        out[(int(labels[LABEL_GROUP]), int(labels[LABEL_RANK]))] = p
    return out


def ray_clusters(custom: Any, namespace: str, name: str) -> list[str]:
    """Names of the RayClusters KubeRay made for the DSI's RayService."""
    items = custom.list_namespaced_custom_object(
        RAY_GROUP,
        RAY_VERSION_API,
        namespace,
        "rayclusters",
        label_selector=f"ray.io/originated-from-cr-name={name}",
    )["items"]
    return sorted(c["metadata"]["name"] for c in items)


def worker_pod_count(core: Any, namespace: str, name: str) -> tuple[int, int]:
    """(live, all) worker pods of the DSI: Terminating pods still hold their GPUs."""
    pods = core.list_namespaced_pod(namespace, label_selector=selector_for(name)).items
    return sum(1 for p in pods if p.metadata.deletion_timestamp is None), len(pods)


def all_running(pods: dict[tuple[int, int], Any], tp: int, replicas: int) -> bool:
    """Every rank of every group has a Running pod."""
    want = {(g, r) for g in range(replicas) for r in range(tp)}
    return set(pods) == want and all(p.status.phase == "Running" for p in pods.values())


def formed_pods(
    custom: Any, core: Any, namespace: str, name: str, tp: int, replicas: int
) -> dict[tuple[int, int], Any] | None:
    """The worker pods once every group has formed, else None.

    Formed means the operator recorded the group's members in ``status.groups[]``, not only
    that the pods run: a pod lost before its group formed is the formation deadline's business,
    not a restart trigger, so a test that kills a pod to see a restart must wait for this.
    """
    groups = (get_dsi(custom, namespace, name).get("status") or {}).get("groups") or []
    if len(groups) != replicas or not all(g.get("members") for g in groups):
        return None
    pods = worker_pods(core, namespace, name)
    return pods if all_running(pods, tp, replicas) else None


# --- fixture bodies (each test module wraps them in its own fixtures) --------------------------


def install_crd(kubectl: Any) -> None:
    """Install the CRDs from crds/ (DeepSpeedInference and DeepSpeedBatchInference;
    idempotent, server-side apply)."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE.parent))
    kubectl("wait", "--for=condition=Established", "-f", str(CRD_FILE.parent), "--timeout=60s")


@contextlib.contextmanager
def running_operator(kubeconfig: Path, namespace: str, log_path: Path) -> Iterator[OperatorProcess]:
    """The operator watching only ``namespace``; its log tail is printed if the test fails."""
    op = OperatorProcess(kubeconfig, [namespace], log_path)
    op.start()
    try:
        op.wait_metrics()
        yield op
    except BaseException:
        print(f"--- operator log ({op.log_path}) ---\n{op.log_tail(200)}")
        raise
    finally:
        op.stop()
