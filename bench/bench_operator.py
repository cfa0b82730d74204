"""Operator benchmark on the local control plane; prints a table of medians and p99.

    .venv/bin/python bench/bench_operator.py [--sizes 1,100,500] [--rss-sizes 100,500]
        [--failures 10] [--apply-samples 30] [--idle-seconds 60]

Needs a running local cluster (`python -m dsi_localcluster up`). Creates its own namespace
(deleted at the end), installs the DSI CRD, and runs the operator (`python -m dsi_operator`)
as a subprocess restricted to that namespace.

Measured:
* operator start -> first RayService: the operator process started, one DSI created at once;
  its kopf watches and indexes fill first (a cold start, reported on its own);
* apply -> RayService exists: then, with the operator warm, create a DSI and time until the
  RayService appears (watch);
* pod failure -> group replaced: in a formed group whose pods KubeRay has seen (see
  ``wait_formed``), mark one worker pod Failed (as a kubelet would), time until every pod of
  that group has a new UID and is Running;
  both with 1, 100 and 500 resources present;
* operator peak RSS (VmHWM) with 100 and 500 resources, after they settled;
* API requests per minute while nothing changes, from the operator's own request counter
  (dsi_operator_api_requests_total; kopf's long-lived watch streams are not requests per
  event), split into reads and writes.

Resources use tp=1/replicas=1 CPU-only workers (resources.gpus=0) so that 100 of them fit on
the simulated nodes; the failure samples use tp=2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsi_localcluster import cluster as lc
from dsi_localcluster import config as lcconfig
from dsi_localcluster import faults, manifests
from dsi_localcluster.harness import OperatorProcess, dsi_manifest, worker_pods
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from report import write_json

ROOT = Path(__file__).resolve().parents[1]
#: TP size of the resources whose pods the failure samples fail.
FAIL_TP = 2


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def small_dsi(name: str, tp: int = 1) -> dict[str, Any]:
    return dsi_manifest(
        name,
        tp=tp,
        replicas=1,
        resources={"gpus": 0, "cpu": "10m", "memory": "16Mi"},
        gpu={"nodeSelector": {}, "tolerations": []},
        head={"resources": {"cpu": "10m", "memory": "16Mi"}},
    )


class RayServiceWatcher:
    """Records when each RayService in the namespace first appears."""

    def __init__(self, custom: Any, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self._custom = custom
        self._ns = namespace
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            w = watch.Watch()
            try:
                for ev in w.stream(
                    self._custom.list_namespaced_custom_object,
                    "ray.io",
                    "v1",
                    self._ns,
                    "rayservices",
                    timeout_seconds=30,
                ):
                    name = ev["object"]["metadata"]["name"]
                    self.seen.setdefault(name, time.monotonic())
                    if self._stop:
                        break
            except Exception:  # noqa: BLE001 - reconnect
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop = True


def wait(pred: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(what)


def create_many(custom: Any, ns: str, names: list[str], tp: int = 1) -> dict[str, float]:
    starts: dict[str, float] = {}
    for n in names:
        starts[n] = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, small_dsi(n, tp))
    return starts


def apply_latency(
    custom: Any, ns: str, watcher: RayServiceWatcher, names: list[str], timeout: float
) -> list[float]:
    starts = create_many(custom, ns, names)
    wait(lambda: all(n in watcher.seen for n in names), timeout, "RayServices")
    return [watcher.seen[n] - starts[n] for n in names]


def failure_latency(core: Any, api: Any, ns: str, name: str, timeout: float) -> float:
    tp = FAIL_TP
    pods = wait(
        lambda: (
            lambda p: (
                p if len(p) == tp and all(x.status.phase == "Running" for x in p.values()) else None
            )
        )(worker_pods(core, ns, name)),
        timeout,
        f"{name} running",
    )
    # wait for the group's membership so the failure is a failure of a formed group
    before = {k: p.metadata.uid for k, p in pods.items()}
    victim = pods[(0, tp - 1)].metadata.name
    t0 = time.monotonic()
    faults.fail_pod(api, ns, victim)

    def replaced() -> bool:
        now = worker_pods(core, ns, name)
        return len(now) == tp and all(
            p.metadata.uid != before[k] and p.status.phase == "Running" for k, p in now.items()
        )

    wait(replaced, timeout, f"{name} replaced")
    return time.monotonic() - t0


def wait_formed(custom: Any, ns: str, names: list[str], tp: int, timeout: float) -> None:
    """Until each resource's group has formed (the operator recorded its members) and
    KubeRay has reconciled its RayCluster since the pods became ready (its status counts
    them).

    Why the second: on a real cluster a group forms tens of seconds after its pods start
    (image pull, model load), long after KubeRay saw them. Here kwok pods form at once, and
    a failure injected before KubeRay looked at the new pods meets KubeRay's scale
    expectations: KubeRay holds the worker group until they expire, 30 s after the pod's
    creation (docs/architecture.md, "Whole-group restarts"). Measuring that would measure
    the simulation, not the operator.
    """

    def ok() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        st = {i["metadata"]["name"]: i.get("status") or {} for i in items}
        if not all((st.get(n, {}).get("groups") or [{}])[0].get("members") for n in names):
            return False
        clusters = custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayclusters")
        ready = {
            (c["metadata"].get("labels") or {}).get("ray.io/originated-from-cr-name"): (
                c.get("status") or {}
            ).get("readyWorkerReplicas", 0)
            for c in clusters["items"]
        }
        return all(ready.get(n, 0) >= tp for n in names)

    wait(ok, timeout, "groups formed", interval=1)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":", 1)
            vals[k] = int(v.split()[0])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def api_counts(op: OperatorProcess) -> tuple[float, float]:
    m = op.metrics()
    reads = writes = 0.0
    for k, v in m.items():
        if not k.startswith("dsi_operator_api_requests_total{"):
            continue
        if any(f'verb="{w}"' in k for w in ("get", "list")):
            reads += v
        else:
            writes += v
    return reads, writes


def api_breakdown(op: OperatorProcess) -> dict[str, float]:
    """Operator request and reconcile counters by label set."""
    return {
        k: v
        for k, v in op.metrics().items()
        if k.startswith(("dsi_operator_api_requests_total{", "dsi_operator_reconciles_total{"))
    }


#: Index of the first simulated CPU node the bench adds (kwok-cpu-100, ...); deleted at the end.
EXTRA_NODE_FIRST = 100
PODS_PER_NODE = 110


def add_pod_capacity(core: Any, pods: int) -> list[str]:
    """Add simulated CPU nodes until ``pods`` more pods fit on the kwok nodes without taints
    (each small resource has a head and a worker pod: 500 of them outgrow the local
    cluster's 5 nodes); returns the names added."""
    nodes = core.list_node(label_selector="type=kwok").items
    room = sum(int(n.status.allocatable.get("pods", 0)) for n in nodes if not n.spec.taints)
    used = len(core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=").items)
    missing = pods - (room - used)
    added = []
    for i in range(max(0, -(-missing // PODS_PER_NODE))):
        node = manifests.cpu_node(EXTRA_NODE_FIRST + i)
        try:
            core.create_node(node)
        except ApiException as e:
            if e.status != 409:
                raise
        added.append(node["metadata"]["name"])
    return added


def _install_crd(cfg: lcconfig.ClusterConfig) -> None:
    import subprocess

    kubectl = lc.binaries(cfg.cache_dir)["kubectl"]
    crd = ROOT / "crds" / "deepspeedinferences.deepspeed.ai.yaml"
    cmd = [str(kubectl), f"--kubeconfig={cfg.kubeconfig}", "apply", "--server-side"]
    subprocess.run([*cmd, "--force-conflicts", "-f", str(crd)], check=True, capture_output=True)


Row = tuple[str, str, int, float, float]


@dataclass
class Bench:
    """What every measurement needs: clients, namespace, operator, watcher, the resources."""

    api: Any
    core: Any
    custom: Any
    ns: str
    op: OperatorProcess
    watcher: RayServiceWatcher
    args: argparse.Namespace
    created: list[str] = field(default_factory=list)

    def grow_to(self, total: int) -> None:
        """Background resources so that ``total`` exist."""
        extra = [f"bg-{i}" for i in range(len(self.created), total)]
        if extra:
            create_many(self.custom, self.ns, extra)
            self.created += extra


def _latency_rows(b: Bench, size: int) -> list[Row]:
    """apply -> RayService and pod failure -> group replaced, with ``size`` resources."""
    b.grow_to(size - 1)
    lat: list[float] = []
    for i in range(b.args.apply_samples):
        n = f"apply-{size}-{i}"
        lat += apply_latency(b.custom, b.ns, b.watcher, [n], b.args.timeout)
        b.custom.delete_namespaced_custom_object(GROUP, VERSION, b.ns, PLURAL, n)
    fl: list[float] = []
    names = [f"fail-{size}-{i}" for i in range(b.args.failures)]
    create_many(b.custom, b.ns, names, tp=FAIL_TP)
    wait_formed(b.custom, b.ns, names, FAIL_TP, b.args.timeout)
    for n in names:
        fl.append(failure_latency(b.core, b.api, b.ns, n, b.args.timeout))
    for n in names:
        b.custom.delete_namespaced_custom_object(GROUP, VERSION, b.ns, PLURAL, n)
    print(f"# size {size}: done", file=sys.stderr, flush=True)
    return [
        ("apply -> RayService exists", "s", size, statistics.median(lat), pct(lat, 99)),
        ("pod failure -> group replaced", "s", size, statistics.median(fl), pct(fl, 99)),
    ]


def _settled(op: OperatorProcess, api: Any) -> bool:
    """Wait (up to 3 min) for a 20 s window without operator writes. On an overcommitted
    simulated cluster KubeRay and the scheduler may still be moving pods, and every real
    change is rightly written."""
    for _ in range(9):
        _, wa = api_counts(op)
        time.sleep(20)
        _, wb = api_counts(op)
        if wb == wa:
            return True
    return False


def _idle_rows(b: Bench, size: int) -> list[Row]:
    """Peak RSS, and API calls and passes while nothing changes, with ``size`` resources."""
    b.grow_to(size)
    names_now = list(b.created)
    wait(lambda: all(n in b.watcher.seen for n in names_now), b.args.timeout, "RayServices")
    time.sleep(20)  # let the status writes settle
    _, hwm = rss_kib(b.op.pid)
    note = "" if _settled(b.op, b.api) else " (cluster still converging)"
    r0, w0 = api_counts(b.op)
    b0 = api_breakdown(b.op)
    time.sleep(b.args.idle_seconds)
    r1, w1 = api_counts(b.op)
    b1 = api_breakdown(b.op)
    per_min = 60 / b.args.idle_seconds
    passes = sum(
        v - b0.get(k, 0.0) for k, v in b1.items() if k.startswith("dsi_operator_reconciles_total{")
    )
    for k in sorted(b1):
        if b1[k] != b0.get(k, 0.0):
            print(f"#   idle {size}: {k} +{b1[k] - b0.get(k, 0.0):g}", file=sys.stderr)
    print(f"# rss {size}: done", file=sys.stderr, flush=True)
    figures = [
        (f"operator peak RSS (VmHWM), {size} resources", "MiB", hwm / 1024),
        (f"idle API reads/min, {size} resources{note}", "req/min", (r1 - r0) * per_min),
        (f"idle API writes/min, {size} resources{note}", "req/min", (w1 - w0) * per_min),
        (f"idle reconcile passes/s, {size} resources{note}", "1/s", passes / b.args.idle_seconds),
    ]
    return [(metric, unit, size, v, v) for metric, unit, v in figures]


def operator_result(rows: list[Row], args: argparse.Namespace) -> dict[str, Any]:
    """The printed rows and this run's settings, as ``--json`` writes them."""
    keys = ("metric", "unit", "n", "median", "p99")
    return {
        "bench": "bench_operator",
        "settings": {
            k: getattr(args, k) for k in ("sizes", "rss_sizes", "failures", "idle_seconds")
        },
        "rows": [dict(zip(keys, row, strict=True)) for row in rows],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,100,500")
    ap.add_argument("--rss-sizes", default="100,500")
    ap.add_argument("--failures", type=int, default=10)
    ap.add_argument("--apply-samples", type=int, default=30)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = ap.parse_args()

    cfg = lcconfig.ClusterConfig.from_env()
    if not lc.is_up(cfg):
        print("local cluster is not running: python -m dsi_localcluster up", file=sys.stderr)
        return 2
    api = config.new_client_from_config(str(cfg.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    _install_crd(cfg)
    ns = f"bench-op-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    log = Path(f"/tmp/{ns}-operator.log")
    # Production settings: 5 s ticker, cluster-wide preflight facts cached 30 s.
    op = OperatorProcess(cfg.kubeconfig, [ns], log, tick_seconds=5, facts_ttl=30)
    latency = {int(x) for x in args.sizes.split(",") if x}
    idle = {int(x) for x in args.rss_sizes.split(",") if x}
    # Before the operator starts: outside the try below, a failure here leaves nothing behind.
    extra_nodes = add_pod_capacity(
        core, 2 * max(latency | idle, default=0) + 3 * args.failures + 20
    )
    watcher = RayServiceWatcher(custom, ns)
    time.sleep(2)  # the watch connected
    started = time.monotonic()
    op.start()
    b = Bench(api, core, custom, ns, op, watcher, args)
    rows: list[Row] = []
    try:
        apply_latency(custom, ns, watcher, ["cold-start"], args.timeout)
        cold = watcher.seen["cold-start"] - started
        rows.append(("operator start -> first RayService", "s", 1, cold, cold))
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "cold-start")
        op.wait_metrics()
        for size in sorted(latency | idle):  # resources only ever grow
            rows += _latency_rows(b, size) if size in latency else []
            rows += _idle_rows(b, size) if size in idle else []
    finally:
        b.watcher.stop()
        op.stop()
        try:
            core.delete_namespace(ns)
        except ApiException:
            pass
        for name in extra_nodes:
            core.delete_node(name)

    print(f"\n{'metric':<48} {'unit':>8} {'N':>5} {'median':>10} {'p99':>10}")
    print("-" * 85)
    for metric, unit, n, med, p99 in rows:
        print(f"{metric:<48} {unit:>8} {n:>5} {med:>10.3f} {p99:>10.3f}")
    print(f"\noperator log: {log}")
    write_json(args.json, operator_result(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
