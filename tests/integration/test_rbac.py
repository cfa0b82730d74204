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

The "cluster, all namespaces" rows (kopf's CRD scanning) are covered by a second, smaller
test: a full all-namespaces operator would also act on the other tests' resources in this
shared cluster, so that one runs with the cluster-scoped rules only and checks that kopf
lists and watches CRDs successfully.
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
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_localcluster.harness import dsi_manifest, formed_pods, get_dsi, worker_pods
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import BATCH_PLURAL, GROUP, PLURAL, VERSION
from dsi_worker.ports import free_port
from test_batch_api import batch_manifest
from test_helm import CHART, Helm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from test_chart import documented_permissions  # noqa: E402

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
            # aiohttp would label a body without Content-Type as octet-stream (the API server
            # answers 415); the client's request goes through as it was sent.
            async with session.request(
                request.method,
                url,
                headers=headers,
                data=body or None,
                ssl=self.ssl,
                skip_auto_headers=("Content-Type", "User-Agent"),
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


# --- running the operator as a ServiceAccount --------------------------------------------


@dataclass
class Running:
    """An operator process behind the recording proxy."""

    proxy: RecordingProxy
    proc: subprocess.Popen[bytes]
    log_path: Path
    liveness: int
    metrics: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return "\n".join(self.log().splitlines()[-60:])


@contextlib.contextmanager
def operator_as(
    cluster: Any, token: str, dep: dict[str, Any], namespace: str, tmp_path: Path
) -> Iterator[Running]:
    """Run `python -m dsi_operator` with the Deployment's args, authenticated by ``token``."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    upstream = admin["clusters"][0]["cluster"]
    ca = tmp_path / "ca.crt"
    ca.write_bytes(base64.b64decode(upstream["certificate-authority-data"]))
    liveness, metrics = free_port(), free_port()
    log_path = tmp_path / "operator.log"
    with RecordingProxy(upstream["server"], str(ca)) as proxy:
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
        running = Running(proxy, proc, log_path, liveness, metrics)
        try:
            wait_for(
                lambda: healthz(liveness),
                60,
                "the operator's liveness endpoint (the chart's --liveness flag)",
                dump=running.log_tail,
            )
            yield running
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def healthz(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
        return bool(r.status == 200)


def used_permissions(calls: list[Call]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of the authorized calls. A server-side apply that created
    its object (PATCH -> 201) was authorized as `create` too."""
    used = {c.attributes for c in calls if c.attributes and c.status not in (401, 403)}
    for c in calls:
        attrs = c.attributes
        if attrs and attrs[2] == "patch" and c.status == 201:
            used.add((attrs[0], attrs[1], "create"))
    return {u for u in used if u is not None}


# --- the tests ----------------------------------------------------------------------------


def test_operator_runs_with_exactly_the_chart_permissions(
    cluster: Any,
    kube: Any,
    kubectl: Any,
    namespace: str,
    chart_release: tuple[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Namespaced mode, the whole scenario: sufficient (no 403) and minimal (all used)."""
    sa, dep = chart_release
    token = kubectl("create", "token", sa, "-n", namespace, "--duration=3600s").stdout.strip()
    with operator_as(cluster, token, dep, namespace, tmp_path) as op:
        run_scenario(kube, namespace, "rbac", op.log_tail)
        run_batch_scenario(kube, namespace, "rbac-batch", op.log_tail)
        # The chart's --metrics-port flag serves Prometheus metrics, restart counted.
        with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert re.search(r'^dsi_operator_group_restarts_total\{.*name="rbac".*\} [1-9]', text, re.M)
        calls = list(op.proxy.calls)
    log = op.log()

    forbidden = [c for c in calls if c.status in (401, 403)]
    assert not forbidden, f"requests the chart's RBAC refused: {forbidden}"
    assert not re.search(r"\b403\b|Forbidden", log), log[-4000:]

    used = used_permissions(calls)
    print("requests by (apiGroup, resource, verb):", sorted(used))
    doc = documented_permissions()
    granted = doc["namespaced"] | doc["cluster"]
    assert used <= granted, f"used but not granted: {used - granted}"
    assert granted - used == set(), (
        f"granted but never used in the scenario (remove them or cover them): "
        f"{sorted(granted - used)}"
    )


def test_all_namespaces_mode_uses_its_extra_rows(
    cluster: Any, kube: Any, kubectl: Any, namespace: str, tmp_path: Path
) -> None:
    """All-namespaces mode needs the "cluster, all namespaces" rows (kopf's CRD scanning).

    An all-namespaces operator with the chart's full ClusterRole would also act on every
    other test's resources in this shared cluster. So this one runs with the chart's
    cluster-scoped rules only: it can reconcile nothing (the namespaced lists are refused,
    which is expected here), but shows that kopf lists and watches CRDs, with success.
    """
    from kubernetes import client

    helm = Helm(cluster.kubeconfig)
    rendered = helm(
        "template", "rbac-all", str(CHART), "--namespace", namespace, "--kube-version", "1.35.0"
    ).stdout
    objs = [d for d in yaml.safe_load_all(rendered) if d]
    dep = next(o for o in objs if o["kind"] == "Deployment")
    assert "--all-namespaces" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    role = next(o for o in objs if o["kind"] == "ClusterRole")
    doc = documented_permissions()
    cluster_rows = doc["cluster"] | doc["cluster, all namespaces"]
    cluster_rules = [
        r
        for r in role["rules"]
        if {(g, res) for g in r["apiGroups"] for res in r["resources"]}
        <= {(g, res) for g, res, _ in cluster_rows}
    ]
    name = f"dsi-rbac-all-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
    )
    kube.rbac.create_cluster_role(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": cluster_rules,
        }
    )
    kube.rbac.create_cluster_role_binding(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        }
    )
    try:
        token = kubectl("create", "token", name, "-n", namespace).stdout.strip()
        with operator_as(cluster, token, dep, namespace, tmp_path) as op:
            crd_calls = lambda: {  # noqa: E731
                c.attributes[2]
                for c in op.proxy.calls
                if c.attributes
                and c.attributes[1] == "customresourcedefinitions"
                and c.status == 200
            }
            wait_for(
                lambda: {"list", "watch"} <= crd_calls(),
                60,
                "kopf's CRD list and watch",
                dump=op.log_tail,
            )
            calls = list(op.proxy.calls)
    finally:
        kube.rbac.delete_cluster_role_binding(name)
        kube.rbac.delete_cluster_role(name)
    namespaced = {(g, r) for g, r, _ in doc["namespaced"]}
    for c in calls:
        if c.status in (401, 403):
            assert c.attributes and c.attributes[:2] in namespaced, (
                f"a cluster-scoped request was refused: {c}"
            )


def _children_and_formed_pods(
    kube: Any, namespace: str, name: str, log_tail: Callable[[], str]
) -> dict[tuple[int, int], Any]:
    """The RayService, the master Services and a status; then both groups' formed pods."""
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
    return wait_for(
        lambda: formed_pods(kube.custom, kube.core, namespace, name, 2, 2),
        180,
        "both groups formed (members recorded)",
        dump=log_tail,
    )


def _restart_a_group(
    kube: Any,
    namespace: str,
    name: str,
    log_tail: Callable[[], str],
    pods: dict[tuple[int, int], Any],
) -> None:
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


def _roll_out(kube: Any, namespace: str, name: str, log_tail: Callable[[], str]) -> None:
    """A worker-only change replaces both groups' pods."""
    # A rollout (a worker-only change): a stale group's templates are read from the
    # RayService, the new ones written into the RayCluster, the groups' pods replaced one by one.
    before = {p.metadata.uid for p in worker_pods(kube.core, namespace, name).values()}
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"gpu": {"sharedMemorySize": "2Gi"}}}
    )

    def rolled_out() -> bool:
        st = get_dsi(kube.custom, namespace, name).get("status") or {}
        done = any(
            c.get("type") == "Progressing" and c.get("reason") == "RolloutComplete"
            for c in st.get("conditions") or []
        )
        now = {p.metadata.uid for p in worker_pods(kube.core, namespace, name).values()}
        return done and len(now) == 4 and not now & before

    wait_for(rolled_out, 120, "both groups replaced by the rollout", dump=log_tail)


def _scale_down(kube: Any, namespace: str, name: str, log_tail: Callable[[], str]) -> None:
    """Scale down: group 1's master Service and NetworkPolicy go."""
    # Scale down: group 1's master Service must go.
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": 1}}
    )

    def g1_service_gone() -> bool:
        names = {s.metadata.name for s in kube.core.list_namespaced_service(namespace).items}
        return f"{name}-g1-master" not in names

    wait_for(g1_service_gone, 120, "group 1's master Service deleted", dump=log_tail)

    def g1_policy_gone() -> bool:
        from kubernetes import client

        pols = client.NetworkingV1Api(kube.api).list_namespaced_network_policy(namespace)
        return f"{name}-g1-ranks" not in {p.metadata.name for p in pols.items}

    wait_for(g1_policy_gone, 120, "group 1's NetworkPolicy deleted", dump=log_tail)


def run_scenario(kube: Any, namespace: str, name: str, log_tail: Callable[[], str]) -> None:
    """Apply (with per-group NetworkPolicies), wait for children and status, restart a
    group, roll out a change, scale down."""
    body = dsi_manifest(name, tp=2, replicas=2, networkPolicy={"enabled": True})
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    pods = _children_and_formed_pods(kube, namespace, name, log_tail)
    _restart_a_group(kube, namespace, name, log_tail, pods)
    _roll_out(kube, namespace, name, log_tail)
    _scale_down(kube, namespace, name, log_tail)
    # Let a few reconcile ticks pass so the periodic reads (preflight facts) are recorded.
    time.sleep(3)


@pytest.mark.parametrize(
    ("method", "path", "query", "want"),
    [
        ("GET", "/api/v1/namespaces/ns/pods", "labelSelector=a", ("", "pods", "list")),
        ("GET", "/api/v1/namespaces/ns/pods", "watch=true&rv=1", ("", "pods", "watch")),
        ("GET", "/api/v1/nodes", "watch=1", ("", "nodes", "watch")),
        ("DELETE", "/api/v1/namespaces/ns/pods/p", "", ("", "pods", "delete")),
        ("POST", "/api/v1/namespaces/ns/events", "", ("", "events", "create")),
        (
            "PATCH",
            "/apis/deepspeed.ai/v1alpha1/namespaces/ns/deepspeedinferences/x/status",
            "",
            ("deepspeed.ai", "deepspeedinferences/status", "patch"),
        ),
        (
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rayservices.ray.io",
            "",
            ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
        ),
        ("GET", "/api/v1/namespaces/ns", "", ("", "namespaces", "get")),
        ("GET", "/apis", "", None),
        ("GET", "/apis/ray.io/v1", "", None),
        ("GET", "/version", "", None),
    ],
)
def test_request_attributes(
    method: str, path: str, query: str, want: tuple[str, str, str] | None
) -> None:
    """The proxy's request -> RBAC attribute mapping the minimality check relies on."""
    assert request_attributes(method, path, query) == want


def run_batch_scenario(kube: Any, namespace: str, name: str, log_tail: Callable[[], str]) -> None:
    """A batch run: its children (RayJob, rendezvous Services, progress ConfigMap, Role,
    RoleBinding, ServiceAccount) appear, and progress written into the ConfigMap reaches the
    status (the operator reads the ConfigMap by name)."""
    body = batch_manifest(name, tp=1, replicas=1)
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, BATCH_PLURAL, body)

    def status() -> dict[str, Any]:
        obj = kube.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, BATCH_PLURAL, name
        )
        return dict(obj.get("status") or {})

    wait_for(lambda: status().get("observedGeneration"), 60, "batch status", dump=log_tail)
    kube.core.patch_namespaced_config_map(
        f"{name}-progress", namespace, {"data": {"rowsDone": "5", "rowsTotal": "10"}}
    )
    wait_for(lambda: status().get("progress") == "5/10 (50%)", 30, "batch progress", dump=log_tail)
