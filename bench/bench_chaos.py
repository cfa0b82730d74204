"""Chaos soak on the local cluster's kwok nodes: many resources, many random pod faults, the
operator SIGKILLed at random points (issue 11 item 1).

    .venv/bin/python bench/bench_chaos.py [--resources 10] [--faults 100] [--kill-every 10]
    .venv/bin/python bench/bench_chaos.py --real [--minutes 30] [--seed 1] [--kinds a,b]

``--real`` (issue 25 item 4) runs the chaos on the process-backed nodes instead: the ``make
run`` sample (2 groups x TP 2 of the tiny model, real processes) under a seeded random
sequence of real faults (rank pod deleted, container SIGKILLed, rank actor SIGKILLed or
frozen 150 s, operator SIGKILLed or KubeRay stopped during a restart, two faults on one group,
a process node lost, the Ray head deleted) for ``--minutes``, with requests flowing on
/v1/completions and /generate throughout; see bench/chaos_real.py. ``DSI_CHAOS_SHORT=1``
is the CI size: one fault each of pod_deleted, container_killed and actor_killed (about
3-5 minutes after the stack is up).

Each resource has 2 groups of TP 2. Fault kinds: container restart, pod Failed, pod
deleted, pod evicted, pod stuck Terminating, two pods of one group at once, faults in
several resources at once, a node NotReady and a node lost (no heartbeats: Unknown after
the controller-manager's 40 s grace); a node fault hits every group with a pod there, and
the node comes back once they recovered elsewhere. Every ``--kill-every``-th fault the
operator is SIGKILLed at a random moment in the 1.5 s after the injection (often between
"restart recorded" and "pods deleted") and started again. After each fault it checks: every
hit group restarted exactly once (status counter and one GroupRestart Event) on all-new
pods; no other group's pods or counter changed; no extra pods. At the end: every resource
back to its steady state, no orphaned or duplicated objects. Prints a table by fault kind
and every violation; exits 1 if there was one.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsi_localcluster import cluster as lc
from dsi_localcluster import config as lcconfig
from dsi_localcluster import faults
from dsi_localcluster.builders import FAST_RESTART_POLICY
from dsi_localcluster.harness import (
    OperatorProcess,
    dsi_manifest,
    get_dsi,
    install_crd,
    worker_pods,
)
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from kubernetes import client, config

TP, GROUPS = 2, 2
KINDS = (
    "container_restart",
    "pod_failed",
    "pod_deleted",
    "evicted",
    "stuck_terminating",
    "two_pods_one_group",
    "several_resources",
    "node_not_ready",
    "node_lost",
)
NODE_KINDS = ("node_not_ready", "node_lost")
Hit = tuple[str, int]  # (resource, group)


@dataclass
class Snapshot:
    """Pod UIDs and restart counters of every group, GroupRestart Events per resource."""

    uids: dict[Hit, set[str]] = field(default_factory=dict)
    restarts: dict[Hit, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


class Soak:
    """The cluster clients, the operator process and the resources under test."""

    def __init__(self, ns: str, names: list[str], op: OperatorProcess, api: Any) -> None:
        self.ns, self.names, self.op, self.api = ns, names, op, api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.stuck: list[str] = []
        self.broken_node: str | None = None

    def status(self, name: str) -> dict[str, Any]:
        return dict(get_dsi(self.custom, self.ns, name).get("status") or {})

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        evs = self.core.list_namespaced_event(self.ns).items
        for name in self.names:
            st = self.status(name)
            for g in st.get("groups") or []:
                snap.restarts[(name, int(g["index"]))] = int(g.get("restarts", 0))
            snap.events[name] = sum(
                1 for e in evs if e.reason == "GroupRestart" and e.involved_object.name == name
            )
            for (g, _), p in worker_pods(self.core, self.ns, name).items():
                snap.uids.setdefault((name, g), set()).add(p.metadata.uid)
        return snap

    def steady(self, name: str) -> bool:
        """Every group formed on Running pods, no restart in progress, no extra pods."""
        groups = self.status(name).get("groups") or []
        if len(groups) != GROUPS or any(
            g.get("restartingSince") or not g.get("members") for g in groups
        ):
            return False
        pods = worker_pods(self.core, self.ns, name, live_only=False)
        return len(pods) == TP * GROUPS and all(
            p.status.phase == "Running" and p.metadata.deletion_timestamp is None
            for p in pods.values()
        )

    def describe(self, name: str) -> str:
        """One resource's groups and pods, for a violation message."""
        keys = ("restarts", "restartingSince", "restartPods", "members", "formingSince")
        groups = [
            {k: g[k] for k in ("index", *keys, "abandonedPods") if k in g}
            for g in self.status(name).get("groups") or []
        ]
        pods = [
            (
                p.metadata.name[-22:],
                p.metadata.uid[:8],
                p.status.phase,
                p.spec.node_name,
                bool(p.metadata.deletion_timestamp),
            )
            for p in worker_pods(self.core, self.ns, name, live_only=False).values()
        ]
        return f"{name} groups {groups} pods {pods}"

    def pods_of(self, hit: Hit) -> list[Any]:
        return [p for (g, _), p in worker_pods(self.core, self.ns, hit[0]).items() if g == hit[1]]

    def inject(self, kind: str, rng: random.Random) -> list[Hit]:
        """Inject one fault; the groups it hits."""
        if kind in NODE_KINDS:
            return self._node_fault(kind, rng)
        if kind == "several_resources":
            hits = [(n, rng.randrange(GROUPS)) for n in rng.sample(self.names, 3)]
            for h in hits:
                self._one("pod_failed", rng.choice(self.pods_of(h)))
            return hits
        hit = (rng.choice(self.names), rng.randrange(GROUPS))
        pods = self.pods_of(hit)
        if kind == "two_pods_one_group":
            for p in pods:
                try:
                    self._one("pod_failed", p)
                except client.ApiException as e:
                    # The restart the first failure started may already have deleted it.
                    if e.status != 404:
                        raise
        else:
            self._one(kind, rng.choice(pods))
        return [hit]

    def _one(self, kind: str, pod: Any) -> None:
        name = pod.metadata.name
        if kind == "container_restart":
            faults.restart_container(self.api, self.ns, name)
        elif kind == "pod_failed":
            faults.fail_pod(self.api, self.ns, name, exit_code=137, reason="OOMKilled")
        elif kind == "pod_deleted":
            faults.delete_pod(self.api, self.ns, name)
        elif kind == "evicted":
            faults.evict_pod(self.api, self.ns, name)
        elif kind == "stuck_terminating":
            faults.stuck_terminating(self.api, self.ns, name)
            self.stuck.append(name)

    def _node_fault(self, kind: str, rng: random.Random) -> list[Hit]:
        """Break a node that holds worker pods but no Ray head (a head lost with its node is
        KubeRay's business, not a group restart); every group with a pod there is hit."""
        heads = {
            p.spec.node_name  # type: ignore[union-attr]
            for p in self.core.list_namespaced_pod(
                self.ns, label_selector="ray.io/node-type=head"
            ).items
        }
        by_node: dict[str, set[Hit]] = defaultdict(set)
        for name in self.names:
            for (g, _), p in worker_pods(self.core, self.ns, name).items():
                by_node[p.spec.node_name].add((name, g))
        candidates = sorted(n for n in by_node if n not in heads)
        if not candidates:
            raise SystemExit(f"no node holds workers without a head: {dict(by_node)}")
        node = rng.choice(candidates)
        if kind == "node_lost":
            faults.lose_node(self.api, node)
        else:
            faults.set_node_not_ready(self.api, node)
        self.broken_node = node
        return sorted(by_node[node])

    def heal_node(self) -> None:
        """Bring the broken node back once its groups recovered elsewhere."""
        if self.broken_node is not None:
            faults.set_node_ready(self.api, self.broken_node)
            self.broken_node = None

    def release_stuck(self) -> None:
        for name in self.stuck:
            try:
                faults.release_pod(self.api, self.ns, name)
            except Exception:  # already gone
                pass
        self.stuck.clear()


def verify(
    soak: Soak, before: Snapshot, hits: list[Hit], t0: float, timeout: float
) -> tuple[float, list[str]]:
    """Wait for the hit groups to recover (seconds since the injection at ``t0``), then
    check nothing else moved; (seconds, violations)."""
    hit_set = set(hits)
    while True:
        if time.monotonic() - t0 > timeout:
            why = "; ".join(soak.describe(n) for n in sorted({h[0] for h in hit_set}))
            return time.monotonic() - t0, [
                f"not recovered in {timeout:.0f}s: {sorted(hit_set)}; state: {why}"
            ]
        now = soak.snapshot()
        if soak.stuck and all(now.restarts.get(h, 0) > before.restarts.get(h, 0) for h in hit_set):
            # The restart is recorded and the stuck pod abandoned: let its deletion finish.
            soak.release_stuck()
        if _recovered(soak, before, now, hit_set):
            break
        time.sleep(0.25)
    took = time.monotonic() - t0
    time.sleep(2)  # anything that would go wrong late (a second restart) shows here
    return took, _violations(soak, before, soak.snapshot(), hit_set)


def _recovered(soak: Soak, before: Snapshot, now: Snapshot, hits: set[Hit]) -> bool:
    return all(
        now.restarts.get(h, 0) >= before.restarts.get(h, 0) + 1
        and now.uids.get(h)
        and not (now.uids[h] & before.uids.get(h, set()))
        for h in hits
    ) and all(soak.steady(n) for n in {h[0] for h in hits})


def _violations(soak: Soak, before: Snapshot, now: Snapshot, hits: set[Hit]) -> list[str]:
    problems = []
    for key, n in now.restarts.items():
        want = before.restarts.get(key, 0) + (1 if key in hits else 0)
        if n != want:
            problems.append(f"{key}: restarts {n}, want {want}")
        if key not in hits and now.uids.get(key) != before.uids.get(key):
            problems.append(f"{key}: pods replaced without being hit")
    for name in soak.names:
        want = before.events.get(name, 0) + sum(1 for h in hits if h[0] == name)
        if now.events.get(name, 0) != want:
            got = now.events.get(name, 0)
            what = "GroupRestart Events (fewer)" if got < want else "GroupRestart Events"
            problems.append(f"{name}: {got} {what}, want {want}")
    return problems


@dataclass
class Tally:
    """Per fault kind: recovery times, clean recoveries, restarts counted and expected."""

    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    clean: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    counted: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    violations: list[str] = field(default_factory=list)
    kills: int = 0

    def print(self, final_ok: bool) -> None:
        print(f"\n{'kind':20} {'faults':>6} {'clean':>6} {'p50 s':>6} {'p99 s':>6} restarts")
        for kind in KINDS:
            xs = self.times.get(kind, [])
            med = statistics.median(xs) if xs else float("nan")
            c, e = self.counted[kind]
            print(
                f"{kind:20} {len(xs):6d} {self.clean[kind]:6d} {med:6.1f} {pct(xs, 99):6.1f} "
                f"{c}/{e} counted/expected"
            )
        print(f"operator SIGKILLs: {self.kills}; final steady state: {final_ok}")
        print(f"violations: {len(self.violations)}")
        for v in self.violations:
            print(f"  {v}")


def one_fault(soak: Soak, i: int, args: argparse.Namespace, rng: random.Random, t: Tally) -> None:
    """Inject fault ``i`` (SIGKILLing the operator on every ``kill_every``-th), verify, tally."""
    kind = KINDS[i % len(KINDS)] if i < len(KINDS) else rng.choice(KINDS)
    before = soak.snapshot()
    t0 = time.monotonic()
    hits = soak.inject(kind, rng)
    killed = bool(args.kill_every) and (i + 1) % args.kill_every == 0
    if killed:
        time.sleep(rng.uniform(0, 1.5))
        soak.op.kill()
        soak.op.start()
        t.kills += 1
    took, problems = verify(soak, before, hits, t0, args.timeout)
    soak.release_stuck()
    soak.heal_node()
    t.times[kind].append(took)
    t.clean[kind] += not problems
    after = soak.snapshot()
    t.counted[kind][0] += sum(
        after.restarts.get(h, 0) - before.restarts.get(h, 0) for h in set(hits)
    )
    t.counted[kind][1] += len(set(hits))
    t.violations += [f"fault {i} ({kind}, hits {hits}): {p}" for p in problems]
    flag = "  VIOLATION" if problems else ""
    print(f"# fault {i:3d} {kind:20s} hits {len(hits)} recovered in {took:5.1f}s{flag}", flush=True)


def start(args: argparse.Namespace) -> Soak | None:
    """Namespace, operator and formed resources; None when the cluster is not up."""
    cfg = lcconfig.ClusterConfig.from_env()
    if not lc.is_up(cfg):
        print("local cluster is not running: make cluster-up", file=sys.stderr)
        return None
    api = config.new_client_from_config(str(cfg.kubeconfig))  # type: ignore[no-untyped-call]
    install_crd(_Kubectl(cfg))
    ns = f"chaos-{uuid.uuid4().hex[:6]}"
    meta = client.V1ObjectMeta(name=ns)
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=meta))
    op = OperatorProcess(cfg.kubeconfig, [ns], Path(f"/tmp/{ns}-operator.log"), tick_seconds=1)
    op.start()
    soak = Soak(ns, [f"chaos-{i}" for i in range(args.resources)], op, api)
    policy = {**FAST_RESTART_POLICY, "maxRestarts": 10000, "windowSeconds": 60}
    for n in soak.names:
        # CPU-sized pods: 10 resources x 4 ranks would not fit the 32 simulated GPUs.
        body = dsi_manifest(
            n,
            tp=TP,
            replicas=GROUPS,
            restartPolicy=policy,
            resources={"gpus": 0, "cpu": "10m", "memory": "16Mi"},
            gpu={"nodeSelector": {}, "tolerations": []},
            head={"resources": {"cpu": "10m", "memory": "16Mi"}},
        )
        soak.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    t0 = time.monotonic()
    while not all(soak.steady(n) for n in soak.names):
        if time.monotonic() - t0 > 300:
            raise SystemExit("resources never formed")
        time.sleep(1)
    print(f"# {args.resources} resources formed in {time.monotonic() - t0:.0f}s; {op.log_path}")
    return soak


def main_real(args: argparse.Namespace) -> int:
    """``--real``: chaos on the process-backed nodes; tables, anomalies and leaks printed;
    1 when a fault did not recover, a count was off, or something leaked."""
    import os

    import chaos_real as cr

    cfg = lc.running_config(lcconfig.ClusterConfig.from_env())
    if not lc.is_up(cfg):
        print("local cluster is not running: make cluster-up", file=sys.stderr)
        return 2
    kinds = tuple(args.kinds.split(",")) if args.kinds else cr.KINDS
    max_faults, duration = None, args.minutes * 60
    if os.environ.get("DSI_CHAOS_SHORT") == "1":
        kinds, max_faults = cr.short_size()
        duration = None
    print(
        f"# --real: seed {args.seed}, kinds {','.join(kinds)}, "
        f"{f'{max_faults} faults' if max_faults else f'{args.minutes:g} min'}",
        flush=True,
    )
    t_start = time.monotonic()
    served = cr.bring_up(cfg, cr.make_kubectl(cfg), Path("/tmp"))
    outcomes: list[Any] = []
    try:
        outcomes = cr.run_chaos(
            served.target, kinds, args.seed, cfg, duration, max_faults, args.timeout
        )
    finally:
        print(f"# operator log: {served.target.operator.log_path}")
        leaked = cr.tear_down(served)
    ran = (time.monotonic() - t_start) / 60
    print(f"\n# ran {ran:.1f} min (stack up, {len(outcomes)} faults, teardown)")
    print(cr.table(outcomes))
    bad = [
        f"fault {i} ({o.kind}, {o.detail}): {p}" for i, o in enumerate(outcomes) for p in o.problems
    ]
    print(f"anomalies: {len(bad)}")
    for b in bad:
        print(f"  {b}")
    for i, o in enumerate(outcomes):
        for line in o.events:
            print(f"  fault {i} event {line}")
    print("left after teardown: " + ", ".join(f"{k} {len(v)}" for k, v in leaked.items()))
    for k, v in leaked.items():
        for item in v:
            print(f"  {k}: {item}")
    return 1 if bad or any(leaked.values()) else 0


def main() -> int:
    """Run the soak and print the table; 1 when anything was violated."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="chaos on the process-backed nodes")
    ap.add_argument("--minutes", type=float, default=30, help="--real: how long to inject")
    ap.add_argument("--kinds", default="", help="--real: comma-separated fault kinds")
    ap.add_argument("--resources", type=int, default=10)
    ap.add_argument("--faults", type=int, default=100)
    ap.add_argument("--kill-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    if args.real:
        if args.timeout == 120:
            args.timeout = 600
        return main_real(args)
    rng = random.Random(args.seed)
    soak = start(args)
    if soak is None:
        return 2
    tally = Tally()
    try:
        for i in range(args.faults):
            one_fault(soak, i, args, rng, tally)
    finally:
        final_ok = all(soak.steady(n) for n in soak.names)
        soak.op.stop()
        soak.core.delete_namespace(soak.ns)
    tally.print(final_ok)
    return 0 if final_ok and not tally.violations else 1


class _Kubectl:
    def __init__(self, cfg: lcconfig.ClusterConfig) -> None:
        import subprocess

        self._run = subprocess.run
        self.exe = str(lc.binaries(cfg.cache_dir)["kubectl"])
        self.kubeconfig = str(cfg.kubeconfig)

    def __call__(self, *args: str, check: bool = True, **_: Any) -> Any:
        return self._run(
            [self.exe, f"--kubeconfig={self.kubeconfig}", *args],
            check=check,
            capture_output=True,
            text=True,
        )


if __name__ == "__main__":
    sys.exit(main())
