"""Start, stop and inspect the local control plane.

Processes run in their own sessions (process group == pid) so they outlive the command that
started them and `down` can stop each with everything it spawned. State lives in one
directory (default `.cluster/`): kubeconfig, pki/, etcd data, kwok config, logs/ and pids/.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import build, config, manifests, pki, procnodes
from .build import log
from .kubelet import netns
from .statedir import Paths, pid_runs, read_pidfile, write_pidfile


class ClusterError(RuntimeError):
    """`up` could not bring the cluster up; the message says which part and why."""


class PortInUseError(ClusterError):
    """A port the cluster needs is taken by another program."""


# Start order; `down` stops in reverse.
PROCESS_ORDER = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kuberay-operator",
)


def binaries(cache_dir: Path) -> dict[str, Path]:
    """Executable path per process name."""
    k8s = build.KUBERNETES
    return {
        "etcd": build.ETCD.binary(cache_dir),
        "kube-apiserver": k8s.binary(cache_dir, "kube-apiserver"),
        "kube-controller-manager": k8s.binary(cache_dir, "kube-controller-manager"),
        "kube-scheduler": k8s.binary(cache_dir, "kube-scheduler"),
        "kwok": build.KWOK.binary(cache_dir),
        "kuberay-operator": build.KUBERAY.binary(cache_dir),
        "kubectl": k8s.binary(cache_dir, "kubectl"),
        "helm": build.HELM.binary(cache_dir),
    }


#: A component's command line from the config, the paths and the built binaries.
ArgsFn = Callable[[config.ClusterConfig, "Paths", dict[str, Path]], list[str]]


def process_args(
    cfg: config.ClusterConfig, paths: Paths, bins: dict[str, Path]
) -> dict[str, list[str]]:
    """The command line of every process, in start order. Pure: no side effects."""
    return {name: fn(cfg, paths, bins) for name, fn in _ARGS.items()}


def _etcd_args(cfg: config.ClusterConfig, paths: Paths, bins: dict[str, Path]) -> list[str]:
    """Command line of etcd."""
    h, p = config.HOST, cfg.ports
    etcd_url = f"http://{config.HOST}:{cfg.ports['etcd-client']}"
    return [
        str(bins["etcd"]),
        "--name=dsi-local",
        f"--data-dir={paths.etcd_data}",
        f"--listen-client-urls={etcd_url}",
        f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls=http://{h}:{p['etcd-peer']}",
        f"--initial-advertise-peer-urls=http://{h}:{p['etcd-peer']}",
        f"--initial-cluster=dsi-local=http://{h}:{p['etcd-peer']}",
        "--listen-metrics-urls=",
        # A throwaway test database: trade durability for speed on slow disks.
        "--unsafe-no-fsync=true",
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ]


def _api_args(cfg: config.ClusterConfig, paths: Paths, bins: dict[str, Path]) -> list[str]:
    """Command line of the API server."""
    h, p, pk = config.HOST, cfg.ports, paths.pki
    etcd_url = f"http://{config.HOST}:{cfg.ports['etcd-client']}"
    return [
        str(bins["kube-apiserver"]),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={h}",
        f"--advertise-address={h}",
        f"--secure-port={p['kube-apiserver']}",
        f"--tls-cert-file={pk / 'apiserver.crt'}",
        f"--tls-private-key-file={pk / 'apiserver.key'}",
        f"--client-ca-file={pk / 'ca.crt'}",
        "--anonymous-auth=false",
        "--authorization-mode=Node,RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pk / 'sa.pub'}",
        f"--service-account-signing-key-file={pk / 'sa.key'}",
        "--api-audiences=https://kubernetes.default.svc.cluster.local",
        f"--service-cluster-ip-range={config.SERVICE_CIDR}",
        "--allow-privileged=true",
        # Nothing routes to 127.0.0.1 from a pod; without pods that reach the API server
        # the `kubernetes` Service needs no endpoints (loopback ones are rejected anyway).
        "--endpoint-reconciler-type=none",
        f"--cert-dir={pk}",
        "--profiling=false",
        "--v=1",
    ]


def _kcm_args(cfg: config.ClusterConfig, paths: Paths, bins: dict[str, Path]) -> list[str]:
    """Command line of the controller manager."""
    h, p, pk, kc = config.HOST, cfg.ports, paths.pki, str(paths.kubeconfig)
    return [
        str(bins["kube-controller-manager"]),
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        f"--bind-address={h}",
        f"--secure-port={p['kube-controller-manager']}",
        "--leader-elect=false",
        "--controllers=*",
        f"--service-account-private-key-file={pk / 'sa.key'}",
        f"--root-ca-file={pk / 'ca.crt'}",
        f"--cluster-signing-cert-file={pk / 'ca.crt'}",
        f"--cluster-signing-key-file={pk / 'ca.key'}",
        f"--service-cluster-ip-range={config.SERVICE_CIDR}",
        "--use-service-account-credentials=false",
        # Notice a lost node (kwok stopped heartbeating it) within ~40 s rather than 50 s.
        "--node-monitor-grace-period=40s",
        "--node-monitor-period=5s",
        "--profiling=false",
        "--v=1",
    ]


def _sched_args(cfg: config.ClusterConfig, paths: Paths, bins: dict[str, Path]) -> list[str]:
    """Command line of the scheduler."""
    h, p, kc = config.HOST, cfg.ports, str(paths.kubeconfig)
    return [
        str(bins["kube-scheduler"]),
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        f"--bind-address={h}",
        f"--secure-port={p['kube-scheduler']}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def _kwok_args(cfg: config.ClusterConfig, paths: Paths, bins: dict[str, Path]) -> list[str]:
    """Command line of kwok (the simulated nodes)."""
    h, p, kc = config.HOST, cfg.ports, str(paths.kubeconfig)
    return [
        str(bins["kwok"]),
        f"--kubeconfig={kc}",
        f"--config={paths.kwok_config}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector="
        f"{config.KWOK_NODE_ANNOTATION}={config.KWOK_NODE_ANNOTATION_VALUE}",
        f"--cidr={config.POD_CIDR}",
        f"--server-address={h}:{p['kwok']}",
        "--node-lease-duration-seconds=40",
    ]


#: Restarts the command whenever it exits, as KubeRay's Deployment does in a real cluster:
#: KubeRay exits when it cannot renew its leader Lease (an API outage past its renew deadline).
_SUPERVISE = (
    'while true; do "$@"; echo "[supervisor] exited with $?; restarting in 1s"; sleep 1; done'
)


def _kuberay_args(cfg: config.ClusterConfig, paths: Paths, bins: dict[str, Path]) -> list[str]:
    """Command line of the KubeRay operator, under a restart loop (see :data:`_SUPERVISE`).
    Stopping the component stops the loop with it (one process group)."""
    h, p, kc = config.HOST, cfg.ports, str(paths.kubeconfig)
    return [
        "/bin/bash",
        "-c",
        _SUPERVISE,
        "kuberay-operator",
        str(bins["kuberay-operator"]),
        f"--kubeconfig={kc}",
        f"--metrics-addr={h}:{p['kuberay-metrics']}",
        f"--health-probe-bind-address={h}:{p['kuberay-probe']}",
        # As KubeRay's Helm chart does: its Lease is how the operator tells it runs.
        "--enable-leader-election=true",
        "--leader-election-namespace=kube-system",
        "--log-stdout-encoder=console",
    ]


_ARGS: dict[str, ArgsFn] = {
    "etcd": _etcd_args,
    "kube-apiserver": _api_args,
    "kube-controller-manager": _kcm_args,
    "kube-scheduler": _sched_args,
    "kwok": _kwok_args,
    "kuberay-operator": _kuberay_args,
}


# --- ports --------------------------------------------------------------------------------


def port_is_free(port: int, host: str = config.HOST) -> bool:
    """True when nothing listens on host:port (we can bind it ourselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(ports: dict[str, int], is_free: Callable[[int], bool] = port_is_free) -> None:
    """Raise PortInUseError naming the first taken port and what it was meant for."""
    taken = [(name, port) for name, port in ports.items() if not is_free(port)]
    if taken:
        desc = ", ".join(f"{port} ({name})" for name, port in taken)
        env = ", ".join(f"DSI_PORT_{name.upper().replace('-', '_')}" for name, _ in taken)
        raise PortInUseError(
            f"port {taken[0][1]} on {config.HOST} is already in use: needed for {desc}. "
            f"Stop the program using it (`ss -ltnp | grep {taken[0][1]}`) or choose another "
            f"port with {env}."
        )


def running_processes(paths: Paths) -> dict[str, int]:
    """Processes of this cluster that are alive, by name. Removes stale pid files."""
    alive = {}
    for name in PROCESS_ORDER:
        pf = paths.pidfile(name)
        rec = read_pidfile(pf)
        if rec is None:
            continue
        pid, exe = rec
        if pid_runs(pid, exe):
            alive[name] = pid
        else:
            pf.unlink(missing_ok=True)
    return alive


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(pid: int, exe: str, name: str, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL it when it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_runs(pid, exe):
                return
            time.sleep(0.1)
        if sig == signal.SIGTERM:
            log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s; killing it")


# --- health -------------------------------------------------------------------------------


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def admin_ssl_context(paths: Paths) -> ssl.SSLContext:
    """TLS context that trusts the cluster CA and presents the admin certificate."""
    ctx = ssl.create_default_context(cafile=str(paths.pki / "ca.crt"))
    ctx.load_cert_chain(str(paths.pki / "admin.crt"), str(paths.pki / "admin.key"))
    return ctx


def _insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed serving certs of kcm/scheduler on loopback
    return ctx


def health_urls(cfg: config.ClusterConfig) -> dict[str, str]:
    """The endpoint that says each process is serving."""
    h, p = config.HOST, cfg.ports
    return {
        "etcd": f"http://{h}:{p['etcd-client']}/health",
        "kube-apiserver": f"https://{h}:{p['kube-apiserver']}/readyz",
        "kube-controller-manager": f"https://{h}:{p['kube-controller-manager']}/healthz",
        "kube-scheduler": f"https://{h}:{p['kube-scheduler']}/healthz",
        "kwok": f"http://{h}:{p['kwok']}/healthz",
        "kuberay-operator": f"http://{h}:{p['kuberay-probe']}/readyz",
    }


def is_healthy(name: str, cfg: config.ClusterConfig, paths: Paths) -> tuple[bool, str]:
    """(healthy, detail) for one process's health endpoint."""
    url = health_urls(cfg)[name]
    ctx: ssl.SSLContext | None = None
    if name == "kube-apiserver":
        try:
            ctx = admin_ssl_context(paths)
        except (OSError, ssl.SSLError) as exc:
            return False, str(exc)
    elif url.startswith("https"):
        ctx = _insecure_ctx()
    code, body = _get(url, ctx)
    return code == 200, f"{code} {body.strip()[:200]}"


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- up / down / status -------------------------------------------------------------------

_lock_depth = 0


@contextlib.contextmanager
def _locked(paths: Paths) -> Iterator[None]:
    """Serialise up/down across processes (two test sessions starting the same cluster)."""
    global _lock_depth
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    # Outside the state directory (down removes that) and outside the checkout.
    digest = hashlib.sha1(str(paths.root.resolve()).encode()).hexdigest()[:12]
    lockfile = Path(tempfile.gettempdir()) / f"dsi-localcluster-{digest}.lock"
    with lockfile.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another dsi-localcluster command holds {lockfile}; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        _lock_depth = 1
        try:
            yield
        finally:
            _lock_depth = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Starter:
    """Starts processes one by one, each awaited healthy before the next."""

    def __init__(self, cfg: config.ClusterConfig, paths: Paths, argv: dict[str, list[str]]):
        self.cfg, self.paths, self.argv = cfg, paths, argv
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, timeout: float) -> None:
        argv = self.argv[name]
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.paths.kubeconfig)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        with self.paths.log(name).open("ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.paths.root,
                env=env,
                start_new_session=True,
            )
        self.procs[name] = proc
        write_pidfile(self.paths.pidfile(name), proc.pid, Path(argv[0]))
        started = time.monotonic()
        detail = ""
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                raise ClusterError(
                    f"{name} exited with code {proc.returncode} while starting; "
                    f"log {self.paths.log(name)}:\n{_log_tail(self.paths.log(name))}"
                )
            ok, detail = is_healthy(name, self.cfg, self.paths)
            if ok:
                log(f"{name} is up ({time.monotonic() - started:.1f}s, pid {proc.pid})")
                return
            time.sleep(0.25)
        raise ClusterError(
            f"{name} did not become healthy within {timeout:.0f}s (last answer: {detail}); "
            f"log {self.paths.log(name)}:\n{_log_tail(self.paths.log(name))}"
        )


def _api(paths: Paths) -> Any:
    from kubernetes import config as kconfig

    return kconfig.new_client_from_config(str(paths.kubeconfig))  # type: ignore[no-untyped-call]


def kubectl(
    cfg: config.ClusterConfig,
    *args: str,
    input_: str | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run the cached kubectl against this cluster's kubeconfig."""
    exe = binaries(cfg.cache_dir)["kubectl"]
    return subprocess.run(
        [str(exe), f"--kubeconfig={cfg.kubeconfig}", *args],
        input=input_,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def _create_nodes(cfg: config.ClusterConfig, api_client: Any) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    for node in manifests.nodes(cfg):
        try:
            core.create_node(node)  # type: ignore[arg-type]
        except ApiException as exc:
            if exc.status != 409:
                raise


def _wait(what: str, timeout: float, check: Callable[[], tuple[bool, str]]) -> None:
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        ok, detail = check()
        if ok:
            return
        time.sleep(0.5)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}: {detail}")


def _nodes_ready(cfg: config.ClusterConfig, api_client: Any) -> tuple[bool, str]:
    from kubernetes import client

    items = client.CoreV1Api(api_client).list_node().items
    want = {n["metadata"]["name"] for n in manifests.nodes(cfg)}
    ready = {
        n.metadata.name  # type: ignore[union-attr]
        for n in items
        if any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))  # type: ignore[union-attr]
    }
    missing = sorted(want - ready)
    return not missing, f"not Ready yet: {', '.join(missing)}"


def _install_kuberay_crds(cfg: config.ClusterConfig) -> None:
    crd_dir = build.KUBERAY.dir(cfg.cache_dir) / "crds"
    # Server-side apply: the CRDs are too large for the last-applied annotation.
    proc = kubectl(
        cfg, "apply", "--server-side", "--force-conflicts", "-f", str(crd_dir), check=False
    )
    if proc.returncode != 0:
        raise ClusterError(f"installing KubeRay CRDs failed:\n{proc.stdout}\n{proc.stderr}")


def _crds_established(api_client: Any, names: list[str]) -> tuple[bool, str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(api_client)
    pending = []
    for name in names:
        try:
            crd = ext.read_custom_resource_definition(name)
        except ApiException as exc:
            pending.append(f"{name} ({exc.status})")
            continue
        conds = (crd.status.conditions if crd.status else None) or []
        if not any(c.type == "Established" and c.status == "True" for c in conds):
            pending.append(name)
    return not pending, f"not Established: {', '.join(pending)}"


def status_report(cfg: config.ClusterConfig) -> dict[str, Any]:
    """Which processes run and answer their health checks.

    Health is checked on the ports the running cluster was started with (cluster.json), not
    on cfg's, so a caller with other settings never mistakes a healthy cluster for a broken
    one.
    """
    paths = Paths(cfg.state_dir)
    cfg = running_config(cfg)
    alive = running_processes(paths)
    procs = {}
    for name in PROCESS_ORDER:
        if name in alive:
            ok, detail = is_healthy(name, cfg, paths)
            procs[name] = {"pid": alive[name], "healthy": ok, "detail": detail}
        else:
            procs[name] = {"pid": None, "healthy": False, "detail": "not running"}
    return {
        "state_dir": str(paths.root),
        "kubeconfig": str(paths.kubeconfig),
        "processes": procs,
        "running": all(p["healthy"] for p in procs.values()),
        "any_running": bool(alive),
    }


def is_up(cfg: config.ClusterConfig) -> bool:
    """True when every process of the cluster runs and is healthy."""
    return bool(status_report(cfg)["running"]) and cfg.kubeconfig.exists()


def _settings(cfg: config.ClusterConfig) -> tuple[object, ...]:
    return (cfg.gpu_nodes, cfg.cpu_nodes, cfg.gpus_per_node, cfg.gpu_taint, cfg.ports)


def up(cfg: config.ClusterConfig) -> bool:
    """Bring the cluster up. Returns False (and does nothing) when it already runs."""
    with _locked(Paths(cfg.state_dir)):
        return _up(cfg)


def _up(cfg: config.ClusterConfig) -> bool:
    paths = Paths(cfg.state_dir)
    started = time.monotonic()
    if _reuse_running(cfg, paths):
        return False
    build.build(build.CLUSTER_COMPONENTS, cfg.cache_dir)
    check_ports(cfg.ports)
    try:
        _start_fresh(cfg, paths, binaries(cfg.cache_dir))
    except BaseException:
        log(
            "start failed; stopping what was started (logs are kept in "
            f"{cfg.state_dir.parent / '.cluster-logs'})"
        )
        down(cfg, quiet=True, keep_logs=True)
        raise
    log(
        f"cluster up in {time.monotonic() - started:.1f}s: {cfg.gpu_nodes} GPU node(s) x "
        f"{cfg.gpus_per_node} {config.GPU_RESOURCE}, {cfg.cpu_nodes} CPU node(s), KubeRay "
        f"{config.KUBERAY_VERSION}"
    )
    log(f"export KUBECONFIG={paths.kubeconfig}")
    return True


def _reuse_running(cfg: config.ClusterConfig, paths: Paths) -> bool:
    """True when a healthy cluster already runs (waiting for its nodes); otherwise clear
    what a half-running or crashed one left behind, and return False."""
    report = status_report(cfg)
    if report["any_running"] and not report["running"]:
        # A slow health answer on a loaded machine is not a broken cluster: look again.
        for _ in range(20):
            time.sleep(0.5)
            report = status_report(cfg)
            if report["running"] or not report["any_running"]:
                break
    if report["running"] and paths.kubeconfig.exists():
        running = running_config(cfg)
        if _settings(running) != _settings(cfg):
            log(
                "a cluster with other settings is running (GPU nodes "
                f"{running.gpu_nodes}, CPU nodes {running.cpu_nodes}, GPUs/node "
                f"{running.gpus_per_node}, API port {running.ports['kube-apiserver']}); "
                "reusing it - run `down` first to change them"
            )
        api_client = _api(paths)
        ok, detail = _nodes_ready(running, api_client)
        if not ok:
            log(f"cluster runs but {detail}; waiting")
            _wait("nodes Ready", 90, lambda: _nodes_ready(running, api_client))
        log(f"cluster already running (kubeconfig {paths.kubeconfig}); nothing to do")
        return True
    if report["any_running"]:
        bad = [n for n, p in report["processes"].items() if not p["healthy"]]
        log(
            f"found a half-running cluster ({', '.join(bad)} down or unhealthy); stopping it "
            "before starting afresh"
        )
        down(cfg, quiet=True)
    elif paths.root.exists():
        # Leftovers of a crash or a killed session: no process is ours any more.
        procnodes.cleanup(cfg.state_dir)
        _remove_state(paths)
    for what in procnodes.cleanup(cfg.state_dir):
        log(f"removed a crashed run's {what}")
    return False


def _start_fresh(cfg: config.ClusterConfig, paths: Paths, bins: dict[str, Path]) -> None:
    """Write the state (info, PKI, kubeconfig, kwok config) and start every component."""
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / ".gitignore").write_text("*\n")
    # Written first: status checks of a starting cluster must use its ports.
    paths.info.write_text(json.dumps(_info(cfg), indent=2) + "\n")
    # The gateway: process-node pods reach the API server there (kubelet.apirelay).
    pki.generate(paths.pki, config.SERVICE_CIDR, config.HOST, extra_ips=[netns.gateway()])
    paths.kubeconfig.write_text(pki.kubeconfig(paths.pki, cfg.server_url))
    paths.kubeconfig.chmod(0o600)
    stages = manifests.kwok_stages(build.KWOK.dir(cfg.cache_dir) / "stages")
    paths.kwok_config.write_text(manifests.kwok_config_yaml(stages))
    starter = _Starter(cfg, paths, process_args(cfg, paths, bins))
    starter.start("etcd", 60)
    starter.start("kube-apiserver", 120)
    starter.start("kube-controller-manager", 60)
    starter.start("kube-scheduler", 60)
    starter.start("kwok", 60)
    api_client = _api(paths)
    log(f"creating {cfg.gpu_nodes} GPU and {cfg.cpu_nodes} CPU kwok node(s)")
    _create_nodes(cfg, api_client)
    log(f"installing KubeRay {config.KUBERAY_VERSION} CRDs")
    _install_kuberay_crds(cfg)
    crds = [f"{p}.ray.io" for p in ("rayclusters", "rayjobs", "rayservices")]
    _wait("KubeRay CRDs Established", 60, lambda: _crds_established(api_client, crds))
    starter.start("kuberay-operator", 60)
    _wait("nodes Ready", 90, lambda: _nodes_ready(cfg, api_client))
    procnodes.start_all(cfg, api_client, log)
    _wait("the default ServiceAccount", 60, lambda: _default_sa(api_client))


def _default_sa(api_client: Any) -> tuple[bool, str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(api_client).read_namespaced_service_account("default", "default")
    except ApiException as exc:
        return False, f"{exc.status} {exc.reason}"
    return True, ""


def _info(cfg: config.ClusterConfig) -> dict[str, Any]:
    return {
        "server": cfg.server_url,
        "kubeconfig": str(cfg.kubeconfig),
        "gpu_nodes": cfg.gpu_nodes,
        "cpu_nodes": cfg.cpu_nodes,
        "gpus_per_node": cfg.gpus_per_node,
        "gpu_taint": cfg.gpu_taint,
        "process_nodes": cfg.process_nodes,
        "ports": cfg.ports,
        "versions": {c.name: c.version for c in build.COMPONENTS.values()},
    }


def running_config(cfg: config.ClusterConfig) -> config.ClusterConfig:
    """The settings (ports, node counts) the cluster in cfg.state_dir was started with; cfg
    itself when no cluster was started there."""
    paths = Paths(cfg.state_dir)
    try:
        info = json.loads(paths.info.read_text())
    except (OSError, ValueError):
        return cfg
    return config.ClusterConfig(
        gpu_nodes=info["gpu_nodes"],
        cpu_nodes=info["cpu_nodes"],
        gpus_per_node=info["gpus_per_node"],
        gpu_taint=info["gpu_taint"],
        process_nodes=info.get("process_nodes", 0),
        state_dir=cfg.state_dir,
        cache_dir=cfg.cache_dir,
        ports=dict(info["ports"]),
    )


def stop_component(cfg: config.ClusterConfig, name: str) -> None:
    """Stop one component of the running cluster (SIGTERM, then SIGKILL), keeping its state
    (etcd's data, the PKI), so :func:`start_component` brings it back as it was."""
    if name not in PROCESS_ORDER:
        raise ValueError(f"unknown component {name!r}; one of {', '.join(PROCESS_ORDER)}")
    paths = Paths(cfg.state_dir)
    rec = read_pidfile(paths.pidfile(name))
    if rec is None:
        raise ClusterError(f"{name} is not running")
    stop_process(rec[0], rec[1], name)
    paths.pidfile(name).unlink(missing_ok=True)
    log(f"{name} stopped")


def start_component(cfg: config.ClusterConfig, name: str, timeout: float = 120.0) -> None:
    """Start one stopped component of the running cluster with its usual command line, and
    wait until it is healthy."""
    running = running_config(cfg)
    paths = Paths(running.state_dir)
    if name in running_processes(paths):
        raise ClusterError(f"{name} is already running")
    argv = process_args(running, paths, binaries(running.cache_dir))
    _Starter(running, paths, argv).start(name, timeout)


def _remove_state(paths: Paths) -> None:
    import shutil

    shutil.rmtree(paths.root, ignore_errors=True)


def down(cfg: config.ClusterConfig, quiet: bool = False, keep_logs: bool = False) -> bool:
    """Stop every process by pid (whole process group) and remove the state directory.

    With keep_logs the logs move to `<state_dir>-logs/` first. Returns True when anything
    was running.
    """
    with _locked(Paths(cfg.state_dir)):
        return _down(cfg, quiet, keep_logs)


def _down(cfg: config.ClusterConfig, quiet: bool, keep_logs: bool) -> bool:
    import shutil

    paths = Paths(cfg.state_dir)
    stopped = False
    # Programs started against this cluster by other tools (e.g. the operator that `make run`
    # starts) leave pid files here too; they go first, before the API they talk to.
    extra = sorted(p.stem for p in paths.pids.glob("*.pid") if p.stem not in PROCESS_ORDER)
    for name in [*extra, *reversed(PROCESS_ORDER)]:
        rec = read_pidfile(paths.pidfile(name))
        if rec is None:
            continue
        pid, exe = rec
        if pid_runs(pid, exe):
            stop_process(pid, exe, name)
            stopped = True
            if not quiet:
                log(f"stopped {name} (pid {pid})")
        paths.pidfile(name).unlink(missing_ok=True)
    for what in procnodes.cleanup(cfg.state_dir):
        if not quiet:
            log(f"removed {what}")
    if keep_logs and paths.logs.is_dir():
        dest = paths.root.parent / (paths.root.name + "-logs")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(paths.logs, dest)
        (dest / ".gitignore").write_text("*\n")
    _remove_state(paths)
    if not quiet:
        log(
            "cluster stopped and state removed"
            if stopped
            else "no cluster was running; state removed"
        )
    return stopped
