"""The chart's RBAC is sufficient and minimal, proven against the real API server.

The operator runs out of cluster with exactly the permissions the chart gives its
ServiceAccount: the test installs the chart (watching the test namespace), asks the API
server for a token of that ServiceAccount (TokenRequest, as a pod's projected token would
be), and points the operator at a loopback proxy that forwards every request with that
token and records it. (kubeconfig `as:` impersonation is not an option for this process:
neither the kubernetes Python client nor kopf honours it, so the operator would silently
run as the admin.) The operator gets the container args of the Deployment the chart
rendered, so the chart's flags are exercised too.

The scenario: apply a DeepSpeedInference -> RayService, master Services and status appear;
a rank pod is deleted -> the whole group restarts (GroupRestart Event, counters); a
scale-down deletes the removed group's master Service. Then:

- sufficient: the API server answered no request with 403, and the operator logged none;
- minimal: every (apiGroup, resource, verb) the chart grants in this mode was used, with
  `create` counted as used when a server-side apply created the object (PATCH -> 201).

The "cluster, all namespaces" rows (kopf's CRD scanning) are not exercised here: an
all-namespaces operator would also act on the other tests' resources in this shared cluster.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_localcluster.wait import wait_for
from operator_harness import all_running, dsi_manifest, free_port, get_dsi, worker_pods
from test_helm import CHART, Helm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_chart import documented_permissions  # noqa: E402

GROUP, VERSION, PLURAL = "deepspeed.ai", "v1alpha1", "deepspeedinferences"

# --- a recording reverse proxy ------------------------------------------------------------

_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "content-encoding",
}


@dataclass(frozen=True)
class Call:
    """One API request as RBAC sees it."""

    method: str
    path: str
    query: str
    status: int

    @property
    def attributes(self) -> tuple[str, str, str] | None:
        """(apiGroup, resource[/subresource], verb), or None for non-resource URLs."""
        return request_attributes(self.method, self.path, self.query)


def request_attributes(method: str, path: str, query: str) -> tuple[str, str, str] | None:
    """Map an HTTP request to RBAC attributes, as the API server's request info does."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None  # discovery, /version, /openapi, ...
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]  # namespaced resource
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), rest[2:3]
    if sub:
        resource = f"{resource}/{sub[0]}"
    watch = re.search(r"(^|&)watch=(true|1)(&|$)", query) is not None
    verb = {
        "GET": "watch" if watch else ("get" if name else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }[method]
    return group, resource, verb


class RecordingProxy:
    """Plain-HTTP loopback proxy to the API server; keeps a list of the calls it forwarded."""

    def __init__(self, upstream: str, ca_file: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=ca_file)
        self.port = free_port()
        self.calls: list[Call] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        # Watches still waiting on the API server would otherwise linger until its timeout.
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._runner.cleanup()

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        # Uncompressed both ways, so the recorded stream is passed through byte for byte.
        headers["Accept-Encoding"] = "identity"
        url = self.upstream + request.rel_url.raw_path_qs
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            async with session.request(
                request.method, url, headers=headers, data=body or None, ssl=self.ssl
            ) as up:
                self.calls.append(
                    Call(
                        request.method,
                        request.rel_url.path,
                        request.rel_url.raw_query_string,
                        up.status,
                    )
                )
                out = web.StreamResponse(
                    status=up.status,
                    headers={k: v for k, v in up.headers.items() if k.lower() not in _HOP},
                )
                await out.prepare(request)
                with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                    async for chunk in up.content.iter_any():
                        await out.write(chunk)
                    await out.write_eof()
                return out


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def chart_release(cluster: Any, namespace: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The chart installed in the test namespace, watching it. Yields (SA name, Deployment)."""
    helm = Helm(cluster.kubeconfig)
    rel = f"rbac-{uuid.uuid4().hex[:6]}"
    helm(
        "install",
        rel,
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        f"watchNamespaces={{{namespace}}}",
    )
    try:
        manifest = helm("get", "manifest", rel, "-n", namespace).stdout
        objs = [d for d in yaml.safe_load_all(manifest) if d]
        dep = next(o for o in objs if o["kind"] == "Deployment")
        sa = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]["name"]
        yield sa, dep
    finally:
        # Cluster-scoped ClusterRole/Binding must not outlive the test.
        helm("uninstall", rel, "-n", namespace, "--wait", check=False)


def operator_argv(dep: dict[str, Any], kubeconfig: Path, liveness: int, metrics: int) -> list[str]:
    """The chart's container args, with loopback ports, as a local command line."""
    args = []
    for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]:
        if a.startswith("--liveness="):
            a = f"--liveness=http://127.0.0.1:{liveness}/healthz"
        elif a.startswith("--metrics-port="):
            a = f"--metrics-port={metrics}"
        args.append(a)
    return [sys.executable, "-m", "dsi_operator", "--kubeconfig", str(kubeconfig), *args]


def sa_kubeconfig(path: Path, server: str, token: str, namespace: str) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "proxy", "cluster": {"server": server}}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "sa",
                        "context": {"cluster": "proxy", "user": "sa", "namespace": namespace},
                    }
                ],
                "current-context": "sa",
            }
        )
    )


# --- the test -----------------------------------------------------------------------------


def test_operator_runs_with_exactly_the_chart_permissions(
    cluster: Any,
    kube: Any,
    kubectl: Any,
    namespace: str,
    chart_release: tuple[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    sa, dep = chart_release
    token = kubectl("create", "token", sa, "-n", namespace, "--duration=3600s").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    upstream = admin["clusters"][0]["cluster"]
    with tempfile.NamedTemporaryFile("wb", suffix=".crt", delete=False) as ca:
        ca.write(base64.b64decode(upstream["certificate-authority-data"]))

    name = "rbac"
    liveness, metrics = free_port(), free_port()
    log_path = tmp_path / "operator.log"
    with RecordingProxy(upstream["server"], ca.name) as proxy:
        kc = tmp_path / "sa.kubeconfig"
        sa_kubeconfig(kc, f"http://127.0.0.1:{proxy.port}", token, namespace)
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env.update(DSI_OPERATOR_TICK_SECONDS="1", DSI_OPERATOR_FACTS_TTL="1", PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                operator_argv(dep, kc, liveness, metrics),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
        try:
            run_scenario(kube, namespace, name, liveness, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        calls = list(proxy.calls)

    log = log_path.read_text(errors="replace")
    forbidden = [c for c in calls if c.status == 403]
    assert not forbidden, f"requests the chart's RBAC forbade: {forbidden}"
    assert not re.search(r"\b403\b|Forbidden", log), log[-4000:]

    used = {c.attributes for c in calls if c.attributes and c.status < 500}
    # Server-side apply that created an object was also authorized as `create`.
    for c in calls:
        attrs = c.attributes
        if attrs and attrs[2] == "patch" and c.status == 201:
            used.add((attrs[0], attrs[1], "create"))
    doc = documented_permissions()
    granted = doc["namespaced"] | doc["cluster"]
    assert used <= granted, f"used but not granted: {used - granted}"
    assert granted - used == set(), (
        f"granted but never used in the scenario (remove them or cover them): "
        f"{sorted(granted - used)}"
    )


def run_scenario(kube: Any, namespace: str, name: str, liveness: int, log_path: Path) -> None:
    """Apply, wait for children and status, restart a group, scale down, delete."""

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])

    def healthz() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=2) as r:
            return bool(r.status == 200)

    wait_for(
        healthz, 60, "the operator's liveness endpoint (chart's --liveness flag)", dump=log_tail
    )

    body = dsi_manifest(name, tp=2, replicas=2)
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    wait_for(
        lambda: kube.custom.get_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayservices", name
        ),
        60,
        "the RayService",
        dump=log_tail,
    )
    for g in (0, 1):
        wait_for(
            lambda g=g: kube.core.read_namespaced_service(f"{name}-g{g}-master", namespace),
            60,
            f"master Service of group {g}",
            dump=log_tail,
        )
    wait_for(
        lambda: (get_dsi(kube.custom, namespace, name).get("status") or {}).get("phase"),
        60,
        "a status phase",
        dump=log_tail,
    )
    pods = wait_for(
        lambda: (lambda p: p if all_running(p, 2, 2) else None)(
            worker_pods(kube.core, namespace, name)
        ),
        180,
        "all worker pods Running",
        dump=log_tail,
    )

    # A rank dies: the operator must delete the rest of its group and say so.
    victim = pods[(0, 1)]
    kube.core.delete_namespaced_pod(victim.metadata.name, namespace)

    def restarted() -> bool:
        st = get_dsi(kube.custom, namespace, name).get("status") or {}
        events = kube.core.list_namespaced_event(
            namespace, field_selector="reason=GroupRestart"
        ).items
        return bool(st.get("restarts", 0) >= 1 and events)

    wait_for(restarted, 120, "a GroupRestart Event and status.restarts >= 1", dump=log_tail)
    survivor = pods[(0, 0)].metadata.uid

    def rank0_replaced() -> bool:
        now = worker_pods(kube.core, namespace, name)
        return (0, 0) in now and now[(0, 0)].metadata.uid != survivor

    wait_for(rank0_replaced, 120, "group 0's other rank replaced too", dump=log_tail)

    # Scale down: group 1's master Service must go.
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": 1}}
    )

    def g1_service_gone() -> bool:
        names = {s.metadata.name for s in kube.core.list_namespaced_service(namespace).items}
        return f"{name}-g1-master" not in names

    wait_for(g1_service_gone, 120, "group 1's master Service deleted", dump=log_tail)
    # Let a few reconcile ticks pass so the periodic reads (preflight facts) are recorded.
    time.sleep(3)
