"""Our operator next to KubeRay's own controller, on the same control plane, in one run.

    .venv/bin/python bench/bench_side_by_side.py [--samples 20] [--burst 100]

Needs a running local cluster (`make cluster-up`). For each size it creates the objects one
after another from one client, as `kubectl apply` of a folder would, and times each object
from its create call until its child appears on a watch:

* ours: DeepSpeedInference -> RayService (our operator, as a subprocess, with its production
  settings);
* KubeRay: RayService -> RayCluster (the local cluster's KubeRay operator), fed the very
  RayServices our operator renders for the same specs (owner references removed).

Sizes: 1 (``--samples`` times, one at a time) and ``--burst`` at once, after one unmeasured
object per side. Prints median and p99
for both and the ratio ours / KubeRay (below 1: ours is faster). Same small CPU-only specs as
bench_operator.py, so 100 fit on the simulated nodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_operator import pct, small_dsi, wait
from dsi_localcluster import cluster as lc
from dsi_localcluster import config as lcconfig
from dsi_localcluster.harness import OperatorProcess, install_crd
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from dsi_operator.serving.render import render_body
from kubernetes import client, config, watch
from report import write_json

ROOT = Path(__file__).resolve().parents[1]


class FirstSeen:
    """Records when the first object of ``plural`` (group ray.io) owned by each parent name
    shows up on a watch (``key`` maps the object to its parent's name)."""

    def __init__(self, custom: Any, ns: str, plural: str, key: Callable[[dict[str, Any]], str]):
        self.seen: dict[str, float] = {}
        self._args = (custom, ns, plural, key)
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        custom, ns, plural, key = self._args
        while not self._stop:
            try:
                for ev in watch.Watch().stream(
                    custom.list_namespaced_custom_object,
                    "ray.io",
                    "v1",
                    ns,
                    plural,
                    timeout_seconds=30,
                ):
                    self.seen.setdefault(key(ev["object"]), time.monotonic())
                    if self._stop:
                        return
            except Exception:  # noqa: BLE001 - reconnect
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop = True


def _owner(obj: dict[str, Any]) -> str:
    refs = obj["metadata"].get("ownerReferences") or [{}]
    return str(refs[0].get("name", ""))


def plain_rayservice(name: str, ns: str) -> dict[str, Any]:
    """The RayService our operator renders for small_dsi(name), with no owner."""
    body = small_dsi(name)
    body["metadata"].update(namespace=ns, uid="00000000-0000-0000-0000-000000000000")
    rs = next(c for c in render_body(body) if c["kind"] == "RayService")
    rs["metadata"].pop("ownerReferences", None)
    return dict(rs)


def timed(
    names: list[str], create: Callable[[str], None], seen: FirstSeen, timeout: float
) -> list[float]:
    starts: dict[str, float] = {}
    for n in names:
        starts[n] = time.monotonic()
        create(n)
    wait(lambda: all(n in seen.seen for n in names), timeout, "children")
    return [seen.seen[n] - starts[n] for n in names]


def side_by_side_result(
    rows: list[tuple[int, list[float], list[float]]], args: argparse.Namespace
) -> dict[str, Any]:
    """Median and p99 of each side per size (``rows``: size, ours, KubeRay seconds), the
    ratios ours / KubeRay, and this run's settings, as ``--json`` writes them."""

    def side(xs: list[float]) -> dict[str, float]:
        return {"median_s": statistics.median(xs), "p99_s": pct(xs, 99)}

    out = []
    for size, o, k in rows:
        ours, kuberay = side(o), side(k)
        out.append(
            {
                "size": size,
                "ours": ours,
                "kuberay": kuberay,
                "ratio_median": ours["median_s"] / kuberay["median_s"],
                "ratio_p99": ours["p99_s"] / kuberay["p99_s"],
            }
        )
    settings = {"samples": args.samples, "burst": args.burst}
    return {"bench": "bench_side_by_side", "settings": settings, "rows": out}


def main() -> int:
    """Run both sides; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = ap.parse_args()
    cfg = lcconfig.ClusterConfig.from_env()
    if not lc.is_up(cfg):
        print("local cluster is not running: make cluster-up", file=sys.stderr)
        return 2
    api = config.new_client_from_config(str(cfg.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    from bench_chaos import _Kubectl

    install_crd(_Kubectl(cfg))
    ns = f"bench-sbs-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    # Production settings, as bench_operator.py: 5 s ticker, cluster-wide preflight facts
    # cached 30 s (the harness's 1 s suits tests that change the cluster; here it put a facts
    # fetch in front of most creates).
    log = Path(f"/tmp/{ns}-operator.log")
    op = OperatorProcess(cfg.kubeconfig, [ns], log, tick_seconds=5, facts_ttl=30)
    op.start()
    op.wait_metrics()
    ours_seen = FirstSeen(custom, ns, "rayservices", lambda o: o["metadata"]["name"])
    kuberay_seen = FirstSeen(custom, ns, "rayclusters", _owner)

    def ours(n: str) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, small_dsi(n))

    def kuberay(n: str) -> None:
        rs = plain_rayservice(n, ns)
        custom.create_namespaced_custom_object("ray.io", "v1", ns, "rayservices", rs)

    rows: list[tuple[int, list[float], list[float]]] = []
    try:
        time.sleep(2)  # both watches connected
        # One unmeasured object per side first: both controllers warm (our operator's cold
        # start is bench_operator.py's "operator start -> first RayService").
        timed(["o-warm"], ours, ours_seen, args.timeout)
        timed(["k-warm"], kuberay, kuberay_seen, args.timeout)
        for size, rounds in ((1, args.samples), (args.burst, 1)):
            o: list[float] = []
            k: list[float] = []
            for i in range(rounds):
                o += timed([f"o{size}-{i}-{j}" for j in range(size)], ours, ours_seen, args.timeout)
                k += timed(
                    [f"k{size}-{i}-{j}" for j in range(size)], kuberay, kuberay_seen, args.timeout
                )
            rows.append((size, o, k))
            print(f"# size {size}: done", file=sys.stderr, flush=True)
    finally:
        ours_seen.stop()
        kuberay_seen.stop()
        op.stop()
        core.delete_namespace(ns)

    print(f"\n{'size':>5} {'side':<34} {'median s':>9} {'p99 s':>9}")
    print("-" * 60)
    for size, o, k in rows:
        for side, xs in (("ours: DSI -> RayService", o), ("KubeRay: RayService -> RayCluster", k)):
            print(f"{size:>5} {side:<34} {statistics.median(xs):9.3f} {pct(xs, 99):9.3f}")
        ratio = (statistics.median(o) / statistics.median(k), pct(o, 99) / pct(k, 99))
        print(f"{size:>5} {'ratio ours / KubeRay':<34} {ratio[0]:9.2f} {ratio[1]:9.2f}")
    write_json(args.json, side_by_side_result(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
