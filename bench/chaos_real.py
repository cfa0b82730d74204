"""Chaos on the process-backed nodes, measured (issue 25 item 4): the engine of
``bench/bench_chaos.py --real`` and of ``tests/e2e/test_chaos_e2e.py``.

A seeded random sequence of faults hits the ``make run`` sample (2 groups x TP 2 of the tiny
model, every pod a host process) while two bounded request loops run against its endpoint on
this machine: one on ``/v1/completions`` (the OpenAI path) and one on ``/generate``. After
each fault it waits for recovery (phase Ready, /healthz 200 with both groups ready, both
groups answering concurrent requests) and records the recovery seconds, the requests' ok
share during the fault, and each group's ``status.groups[].restarts`` / ``.reforms`` deltas
against the expected ones: a pod-level fault restarts the hit group once; a rank actor killed
or frozen in a live pod is one in-place re-form; head loss restarts every group; node loss
restarts the groups with a pod on that node.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsi_localcluster import cluster as lc
from dsi_localcluster import config as lcconfig
from dsi_localcluster import faults, statedir
from dsi_localcluster.harness import OperatorProcess, get_dsi, worker_pods
from dsi_localcluster.kubelet.netns import netns_name
from dsi_localcluster.leftovers import cmdline, netns_pids, wait_gone

GROUPS = (0, 1)
PROMPT = "The quick brown fox"
#: Every fault kind, in the order the first len(KINDS) faults take them.
KINDS = (
    "pod_deleted",
    "container_killed",
    "actor_killed",
    "two_faults",
    "operator_killed",
    "rank_frozen",
    "kuberay_stopped",
    "node_lost",
    "head_deleted",
)
#: The cheapest kinds (one group, no 150 s freeze, no node or head): the short test's.
CHEAP = ("pod_deleted", "container_killed", "actor_killed")
FREEZE_S = 150.0
KUBERAY_STOP_S = (15.0, 30.0)
#: A fault whose counters never move is taken as recovered once Ready after this long.
NO_COUNT_GRACE_S = 120.0
Expect = dict[int, tuple[int, int]]  # group -> (restarts delta, reforms delta)


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs; nan when empty."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def pick_kind(i: int, kinds: tuple[str, ...], rng: random.Random) -> str:
    """Fault i's kind: every kind once in order first, then seeded random picks."""
    return kinds[i] if i < len(kinds) else rng.choice(kinds)


def counts_delta(before: dict[int, tuple[int, int]], now: dict[int, tuple[int, int]]) -> Expect:
    """Per group (restarts, reforms) grown since ``before``."""
    return {
        g: (now.get(g, (0, 0))[0] - b[0], now.get(g, (0, 0))[1] - b[1]) for g, b in before.items()
    }


def counts_reached(delta: Expect, expect: Expect) -> bool:
    """Every group's counters grew at least as much as expected (groups absent: no change)."""
    return all(
        delta.get(g, (0, 0))[0] >= r and delta.get(g, (0, 0))[1] >= f
        for g, (r, f) in expect.items()
    )


def mismatches(delta: Expect, expect: Expect) -> list[str]:
    """Groups whose deltas differ from the expectation (absent from it: (0, 0))."""
    out = []
    for g in sorted(set(delta) | set(expect)):
        got, want = delta.get(g, (0, 0)), expect.get(g, (0, 0))
        if got != want:
            out.append(
                f"group {g}: restarts/reforms +{got[0]}/+{got[1]}, want +{want[0]}/+{want[1]}"
            )
    return out


def post(url: str, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """POST JSON and parse the answer (raises on HTTP errors)."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


@dataclass
class Target:
    """The served resource under test."""

    api: Any
    namespace: str
    name: str
    endpoint: str
    operator: OperatorProcess
    model: str = "dsi-tiny-llama"
    seen_uids: set[str] = field(default_factory=set)
    #: Container exits seen while polling: "pod container exit code reason at" (the pods may
    #: be gone by the time a fault is judged).
    exits: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def status(self) -> dict[str, Any]:
        """The resource's status."""
        return dict(get_dsi(self.custom, self.namespace, self.name).get("status") or {})

    def counts(self) -> dict[int, tuple[int, int]]:
        """(restarts, reforms) by group index."""
        return {
            int(g["index"]): (int(g.get("restarts", 0)), int(g.get("reforms", 0)))
            for g in self.status().get("groups") or []
        }

    def pods(self) -> dict[tuple[int, int], Any]:
        """{(group, rank): pod} of the live worker pods (their UIDs are remembered)."""
        pods: dict[tuple[int, int], Any] = worker_pods(self.core, self.namespace, self.name)
        self.seen_uids |= {p.metadata.uid for p in pods.values()}
        for p in pods.values():
            for cs in p.status.container_statuses or []:
                term = cs.last_state.terminated if cs.last_state else None
                if term is not None:
                    at = f"{term.finished_at:%H:%M:%S}" if term.finished_at else "?"
                    self.exits.add(
                        f"{at} {p.metadata.name[-24:]} {cs.name} exit {term.exit_code} "
                        f"{term.reason or ''} {(term.message or '')[:120]}".rstrip()
                    )
        return pods

    def head(self) -> Any:
        """The Ray head pod."""
        sel = f"deepspeed.ai/inference={self.name},ray.io/node-type=head"
        items: list[Any] = self.core.list_namespaced_pod(self.namespace, label_selector=sel).items
        self.seen_uids |= {p.metadata.uid for p in items}
        return items[0]

    def generate(self, timeout: float = 30) -> dict[str, Any]:
        """One greedy /generate."""
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        return post(f"{self.endpoint}/generate", body, timeout)

    def complete(self, timeout: float = 30) -> dict[str, Any]:
        """One greedy /v1/completions."""
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        return post(f"{self.endpoint}/v1/completions", body, timeout)

    def healthz_ok(self) -> bool:
        """/healthz answers 200 with both groups ready."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=10) as r:
                body = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        states = {int(g["group"]): g.get("state") for g in body.get("groups") or []}
        return all(states.get(g) == "ready" for g in GROUPS)

    def both_answer(self, tries: int = 4) -> bool:
        """Concurrent /generate requests are answered by both groups."""
        seen: set[int] = set()
        with ThreadPoolExecutor(4) as ex:
            for _ in range(tries):
                for res in ex.map(lambda _: _try(self.generate), range(4)):
                    if res is not None:
                        seen.add(int(res["group"]))
                if seen >= set(GROUPS):
                    return True
        return False


def _try(call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return call()
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass
class Load:
    """Two bounded, sequential request loops (OpenAI path and /generate): (time, path, ok)."""

    target: Target
    results: list[tuple[float, str, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self, path: str, call: Callable[[float], dict[str, Any]]) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                call(20)
                self.results.append((t, path, True))
            except (urllib.error.URLError, OSError, ValueError):
                self.results.append((t, path, False))
                self.stop.wait(0.5)

    def start(self) -> None:
        """Start both loops."""
        for path, call in (
            ("/v1/completions", self.target.complete),
            ("/generate", self.target.generate),
        ):
            th = threading.Thread(target=self._loop, args=(path, call), daemon=True)
            th.start()
            self.threads.append(th)

    def close(self) -> None:
        """Stop both loops."""
        self.stop.set()
        for th in self.threads:
            th.join(timeout=30)

    def window(self, t0: float, t1: float) -> tuple[int, int]:
        """(ok, failed) among requests sent in [t0, t1]."""
        xs = [ok for t, _, ok in list(self.results) if t0 <= t <= t1]
        return sum(xs), len(xs) - sum(xs)


@dataclass
class Fault:
    """One injected fault: what it hit, what it should cost, what undoes it."""

    kind: str
    detail: str
    expect: Expect
    timers: list[threading.Timer] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)

    def later(self, seconds: float, fn: Callable[[], None]) -> None:
        """Run fn after ``seconds`` (in a timer thread; joined by :meth:`finish`)."""
        timer = threading.Timer(seconds, fn)
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def finish(self) -> None:
        """Wait for the timers, then undo what must be undone (a node, a stopped process)."""
        for timer in self.timers:
            timer.join()
        for fn in self.undo:
            fn()


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def rank_actor_pid(pod: Any) -> int:
    """The ``ray::RankActor`` process of a rank pod, found by the pod's network namespace."""
    pids = [p for p in netns_pids(netns_name(pod.metadata.uid)) if "ray::RankActor" in cmdline(p)]
    if not pids:
        raise RuntimeError(f"no ray::RankActor process in pod {pod.metadata.name}")
    return min(pids)


def kuberay_pgid(cfg: lcconfig.ClusterConfig) -> int:
    """The KubeRay operator's process group (its restart loop and the binary)."""
    rec = statedir.read_pidfile(statedir.Paths(cfg.state_dir).pidfile("kuberay-operator"))
    if rec is None:
        raise RuntimeError("kuberay-operator is not running")
    return os.getpgid(rec[0])


def _pod_fault(t: Target, how: str, pod: Any) -> None:
    if how == "pod_deleted":
        t.core.delete_namespaced_pod(pod.metadata.name, t.namespace)
    else:
        faults.kill_container_process(t.api, t.namespace, pod.metadata.name)


def inject(t: Target, kind: str, rng: random.Random, cfg: lcconfig.ClusterConfig) -> Fault:
    """Inject one fault of ``kind``; the Fault says what it should cost."""
    pods = t.pods()
    g, r = rng.choice(GROUPS), rng.randrange(2)
    pod = pods[(g, r)]
    where = f"g{g} r{r} {pod.metadata.name[-24:]}"
    if kind in ("pod_deleted", "container_killed"):
        _pod_fault(t, kind, pod)
        return Fault(kind, where, {g: (1, 0)})
    if kind in ("actor_killed", "rank_frozen"):
        pid = rank_actor_pid(pod)
        f = Fault(kind, f"{where} pid {pid}", {g: (0, 1)})
        if kind == "actor_killed":
            _signal(pid, signal.SIGKILL)
        else:
            _signal(pid, signal.SIGSTOP)
            f.later(FREEZE_S, lambda: _signal(pid, signal.SIGCONT))
        return f
    if kind == "two_faults":
        return _two_faults(t, g, r, rng)
    if kind == "operator_killed":
        _pod_fault(t, "pod_deleted", pod)
        time.sleep(rng.uniform(0.5, 3.0))
        t.operator.kill()
        t.operator.start()
        return Fault(kind, f"{where}; operator SIGKILLed and started", {g: (1, 0)})
    if kind == "kuberay_stopped":
        _pod_fault(t, "pod_deleted", pod)
        time.sleep(rng.uniform(0.5, 3.0))
        pgid, stop_s = kuberay_pgid(cfg), rng.uniform(*KUBERAY_STOP_S)
        os.killpg(pgid, signal.SIGSTOP)
        f = Fault(kind, f"{where}; KubeRay (pgid {pgid}) stopped {stop_s:.0f}s", {g: (1, 0)})
        f.later(stop_s, lambda: os.killpg(pgid, signal.SIGCONT))
        return f
    if kind == "node_lost":
        return _node_lost(t, pods, rng)
    if kind == "head_deleted":
        head = t.head()
        t.core.delete_namespaced_pod(head.metadata.name, t.namespace)
        return Fault(kind, head.metadata.name[-24:], {x: (1, 0) for x in GROUPS})
    raise ValueError(f"unknown fault kind {kind!r}")


def _two_faults(t: Target, g: int, r: int, rng: random.Random) -> Fault:
    """Delete rank r's pod, then 5-30 s later a live pod of the same group. An old pod is one
    the restart replaces anyway: one restart. A new one is a second restart once the first
    has ended and recorded the new pods (``status.groups[].formingPods``: a pod lost before
    the group forms is a failure of it); before that, KubeRay's replacement is simply among
    the pods the group forms on."""
    old = {p.metadata.uid for (gg, _), p in t.pods().items() if gg == g}
    _pod_fault(t, "pod_deleted", t.pods()[(g, r)])
    gap = rng.uniform(5, 30)
    time.sleep(gap)
    live = [p for (gg, _), p in t.pods().items() if gg == g]
    if not live:
        return Fault("two_faults", f"g{g}: no live pod {gap:.0f}s later", {g: (1, 0)})
    second = rng.choice(live)
    groups = {int(x["index"]): x for x in t.status().get("groups") or []}
    recorded = second.metadata.uid in (groups.get(g, {}).get("formingPods") or [])
    try:
        _pod_fault(t, "pod_deleted", second)
    except Exception as e:  # noqa: BLE001 - gone meanwhile: only the first fault counted
        return Fault("two_faults", f"g{g}: second fault missed ({e})", {g: (1, 0)})
    new = second.metadata.uid not in old
    detail = f"g{g} r{r}, then {'a new' if new else 'an old'} pod {gap:.0f}s later"
    return Fault("two_faults", detail, {g: (2 if recorded else 1, 0)})


def _node_lost(t: Target, pods: dict[tuple[int, int], Any], rng: random.Random) -> Fault:
    """Lose a process node holding rank pods but not the head; restore it after recovery."""
    head_node = t.head().spec.node_name
    by_node: dict[str, set[int]] = {}
    for (g, _), p in pods.items():
        by_node.setdefault(p.spec.node_name, set()).add(g)
    nodes = sorted(n for n in by_node if n != head_node)
    if not nodes:
        raise RuntimeError(f"every rank pod shares the head's node {head_node}")
    node = rng.choice(nodes)
    faults.lose_process_node(node)
    f = Fault("node_lost", f"{node} (groups {sorted(by_node[node])})", {})
    f.expect = {g: (1, 0) for g in by_node[node]}
    f.undo.append(lambda: faults.restore_process_node(node))
    return f


@dataclass
class Outcome:
    """What one fault cost."""

    kind: str
    detail: str
    recovered: bool
    seconds: float
    ok: int
    failed: int
    delta: Expect
    expect: Expect
    events: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Why this fault was not clean (empty when it was)."""
        out = [] if self.recovered else [f"not recovered in {self.seconds:.0f}s"]
        return out + mismatches(self.delta, self.expect)


def serving(t: Target) -> bool:
    """Phase Ready, /healthz 200 with both groups ready, and both groups answer."""
    return t.status().get("phase") == "Ready" and t.healthz_ok() and t.both_answer()


def wait_recovered(
    t: Target, before: dict[int, tuple[int, int]], f: Fault, t0: float, timeout: float
) -> tuple[bool, float]:
    """Until the expected counters moved (or NO_COUNT_GRACE_S passed) and the resource
    serves again; (recovered, seconds since t0)."""
    while time.monotonic() - t0 < timeout:
        try:
            t.pods()  # remembers UIDs and container exits
            moved = counts_reached(counts_delta(before, t.counts()), f.expect)
            late = time.monotonic() - t0 > NO_COUNT_GRACE_S
            if (moved or late) and serving(t):
                return True, time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 - the API server is slow under load: poll on
            print(f"#   (poll failed: {type(e).__name__}: {e})", flush=True)
        time.sleep(1)
    return False, time.monotonic() - t0


def settle(t: Target, timeout: float) -> bool:
    """After a fault was undone: serving again, and nothing moving for a few seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = t.counts()
        if serving(t):
            time.sleep(5)
            if t.counts() == c and t.status().get("phase") == "Ready":
                return True
        time.sleep(2)
    return False


def run_fault(
    t: Target,
    load: Load,
    kind: str,
    rng: random.Random,
    cfg: lcconfig.ClusterConfig,
    timeout: float,
) -> Outcome:
    """Inject, wait for recovery, undo, settle, and measure one fault."""
    before = t.counts()
    t.exits.clear()
    t0, wall0 = time.monotonic(), time.time()
    f = inject(t, kind, rng, cfg)
    recovered, took = wait_recovered(t, before, f, t0, timeout)
    ok, failed = load.window(t0, t0 + took)
    f.finish()
    if not settle(t, timeout):
        recovered = False
    delta = counts_delta(before, t.counts())
    o = Outcome(kind, f.detail, recovered, took, ok, failed, delta, f.expect)
    if o.problems:
        o.events = restart_events(t, wall0) + [f"container exit {x}" for x in sorted(t.exits)]
    return o


def restart_events(t: Target, since: float) -> list[str]:
    """The resource's GroupRestart / GroupReformed Events since ``since`` (epoch seconds)."""
    out = []
    for e in t.core.list_namespaced_event(t.namespace).items:
        stamp = e.last_timestamp or e.event_time or e.first_timestamp
        if e.reason in ("GroupRestart", "GroupReformed") and stamp and stamp.timestamp() >= since:
            out.append(f"{stamp:%H:%M:%S} {e.reason}: {e.message}")
    return sorted(out)


def run_chaos(
    t: Target,
    kinds: tuple[str, ...],
    seed: int,
    cfg: lcconfig.ClusterConfig,
    duration_s: float | None = None,
    max_faults: int | None = None,
    timeout: float = 600,
) -> list[Outcome]:
    """Faults until ``duration_s`` passed or ``max_faults`` were injected, with load
    flowing throughout; one line printed per fault."""
    rng = random.Random(seed)
    model = t.status().get("servedModel")
    t.model = str(model) if model else t.model
    load = Load(t)
    load.start()
    out: list[Outcome] = []
    start = time.monotonic()
    try:
        while (max_faults is None or len(out) < max_faults) and (
            duration_s is None or time.monotonic() - start < duration_s
        ):
            o = run_fault(t, load, pick_kind(len(out), kinds, rng), rng, cfg, timeout)
            out.append(o)
            flag = "  PROBLEM: " + "; ".join(o.problems) if o.problems else ""
            print(
                f"# fault {len(out) - 1:3d} {o.kind:17s} {o.detail}: recovered in "
                f"{o.seconds:5.1f}s, requests {o.ok}/{o.ok + o.failed} ok, "
                f"restarts/reforms {_fmt(o.delta)}{flag}",
                flush=True,
            )
            for line in o.events:
                print(f"#     {line}", flush=True)
            if not o.recovered:
                break
    finally:
        load.close()
    ok, failed = load.window(start, time.monotonic())
    print(f"# load over the whole run: {ok}/{ok + failed} requests ok", flush=True)
    return out


def _fmt(delta: Expect) -> str:
    return " ".join(f"g{g}+{r}/+{f}" for g, (r, f) in sorted(delta.items()))


def table(outcomes: list[Outcome], kinds: tuple[str, ...] = KINDS) -> str:
    """Per kind: faults, recovered, p50/p99 recovery s, requests ok share during the faults,
    restarts and reforms counted vs expected (summed over all groups)."""
    head = (
        f"{'kind':17} {'faults':>6} {'recov':>5} {'p50 s':>6} {'p99 s':>6} {'ok %':>6} "
        f"{'restarts got/want':>17} {'reforms got/want':>16}"
    )
    lines = [head]
    for kind in kinds:
        os_ = [o for o in outcomes if o.kind == kind]
        if not os_:
            continue
        xs = [o.seconds for o in os_ if o.recovered]
        ok, n = sum(o.ok for o in os_), sum(o.ok + o.failed for o in os_)
        rs = sum(r for o in os_ for r, _ in o.delta.values())
        rw = sum(r for o in os_ for r, _ in o.expect.values())
        fs = sum(f for o in os_ for _, f in o.delta.values())
        fw = sum(f for o in os_ for _, f in o.expect.values())
        med = statistics.median(xs) if xs else float("nan")
        share = 100 * ok / n if n else float("nan")
        lines.append(
            f"{kind:17} {len(os_):6d} {len(xs):5d} {med:6.1f} {pct(xs, 99):6.1f} "
            f"{share:6.1f} {f'{rs}/{rw}':>17} {f'{fs}/{fw}':>16}"
        )
    return "\n".join(lines)


def sample_manifest() -> dict[str, Any]:
    """The ``make run`` sample with a restart policy a long soak cannot exhaust."""
    import yaml
    from dsi_localcluster.builders import FAST_RESTART_POLICY

    body: dict[str, Any] = yaml.safe_load(
        (lcconfig.repo_root() / "examples" / "tiny-local.yaml").read_text()
    )
    body["spec"]["restartPolicy"] = {
        **FAST_RESTART_POLICY,
        "maxRestarts": 1000,
        "maxReforms": 1000,
        "windowSeconds": 3600,
        "formationTimeoutSeconds": 600,
    }
    return body


@dataclass
class Served:
    """A stack brought up by :func:`bring_up`; :func:`tear_down` removes it."""

    target: Target
    cfg: lcconfig.ClusterConfig
    kubectl: Callable[..., Any]


def bring_up(
    cfg: lcconfig.ClusterConfig, kubectl: Callable[..., Any], log_dir: Path, timeout: float = 900
) -> Served:
    """The sample applied by a fresh operator in a namespace of its own, Ready and answering."""
    import uuid

    import yaml
    from dsi_localcluster.harness import install_crd
    from kubernetes import client
    from kubernetes import config as kconfig

    api = kconfig.new_client_from_config(str(cfg.kubeconfig))  # type: ignore[no-untyped-call]
    install_crd(kubectl)
    ns = f"chaosreal-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=ns))
    )
    op = OperatorProcess(cfg.kubeconfig, [ns], log_dir / f"{ns}-operator.log")
    op.start()
    body = sample_manifest()
    t = Target(api, ns, body["metadata"]["name"], "", op)
    served = Served(t, cfg, kubectl)
    kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(body))
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = t.status()
        if st.get("phase") == "Ready" and st.get("endpoint"):
            t.endpoint = str(st["endpoint"]).rstrip("/")
            if t.healthz_ok() and t.both_answer():
                t.pods()
                t.head()
                print(f"# {ns}/{t.name} Ready and answering after {time.monotonic() - t0:.0f}s")
                return served
        time.sleep(3)
    tear_down(served)
    raise RuntimeError(f"{ns}/{t.name} not Ready and answering in {timeout:.0f}s: {t.status()}")


def tear_down(s: Served, timeout: float = 180) -> dict[str, list[str]]:
    """Delete the resource, stop the operator, delete the namespace, wait for its pods to go;
    then what it left behind (:func:`dsi_localcluster.leftovers.leftovers`)."""
    t = s.target
    s.kubectl(
        "delete", "dsi", t.name, "-n", t.namespace, "--wait=true", "--timeout=120s", check=False
    )
    t.operator.stop()
    s.kubectl("delete", "namespace", t.namespace, "--wait=true", "--timeout=120s", check=False)
    return wait_gone(s.cfg.state_dir, t.seen_uids, timeout)


def make_kubectl(cfg: lcconfig.ClusterConfig) -> Callable[..., Any]:
    """The cluster's kubectl: ``kubectl(*args, input=None, check=True)``."""
    exe = str(lc.binaries(cfg.cache_dir)["kubectl"])

    def run(*args: str, input: str | None = None, check: bool = True) -> Any:
        proc = subprocess.run(
            [exe, f"--kubeconfig={cfg.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    return run


def short_size() -> tuple[tuple[str, ...], int]:
    """The CI size (``DSI_CHAOS_SHORT=1``): one fault of each of the cheapest kinds."""
    return CHEAP, len(CHEAP)
