"""Operator restarts with a fault while it is down, on the local cluster's kwok nodes: how long
until the new process acts, and is every fault counted exactly once (issue 25 item 5).

    .venv/bin/python bench/bench_operator_restart.py [--resources 100] [--restarts 20] [--seed 1]

Needs a running local cluster (`python -m dsi_localcluster up`). Creates its own namespace
(deleted at the end) with ``--resources`` resources of one TP-2 group each (CPU-sized pods,
``resources.gpus: 0``, so that 100 fit the simulated nodes; simulated CPU nodes are added when
they do not, and removed at the end), and runs the operator (`python -m dsi_operator`, its
production settings: 5 s ticker, preflight facts cached 30 s) as a subprocess.

Each of the ``--restarts`` rounds:

1. waits until every resource is steady: its group formed (members recorded), no restart in
   progress, KubeRay's status counts both pods;
2. SIGKILLs the operator;
3. marks one worker pod of a random resource Failed, as a kubelet would, and waits until
   KubeRay has deleted it and made its replacement (a new UID, Running): the new operator
   finds only what the failure left, a recorded member that is gone;
4. starts the operator; ``t0`` is taken just before the process is spawned;
5. **first action**: seconds from ``t0`` until the faulted group's restart is recorded in its
   status (``status.groups[0].restarts`` grew). The operator records a restart before it
   deletes any pod, so this is its first write about the fault (polled every 50 ms);
   **first pass**: seconds from ``t0`` to the operator's own log line ``first pass ... after
   start`` (its first pass over any resource; logged once per process); **operator CPU**:
   the CPU seconds the operator process had used when the restart was seen recorded (on a
   shared, loaded machine this says what wall time cannot);
6. waits until that group is steady again on new pods; **counted** is the restart counter's
   growth (1 is right); any other resource's counter moving is a violation.

Also from the operator's log: seconds from the spawn to its "starting" line (its imports).
The operator runs with a compiled-bytecode cache (``--bytecode-cache``, as its image has
compiled bytecode); ``--bytecode-cache ''`` keeps this environment's settings instead.

Prints a line per round, then p50/p99 of the times and restarts counted against faults
injected; exits 1 when a fault was not counted exactly once or another resource moved.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dsi_localcluster import cluster as lc
from dsi_localcluster import config as lcconfig
from dsi_localcluster import faults, manifests
from dsi_localcluster.harness import OperatorProcess, dsi_manifest, worker_pods
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from kubernetes import client, config
from kubernetes.client.rest import ApiException

ROOT = Path(__file__).resolve().parents[1]
TP = 2
#: Index of the first simulated CPU node the bench adds; removed at the end.
EXTRA_NODE_FIRST = 200
PODS_PER_NODE = 110
FIRST_PASS = re.compile(r"first pass .* ([0-9.]+)s after start")
STARTING = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] dsi_operator .* starting \(")


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def small_dsi(name: str) -> dict[str, Any]:
    """One TP-2 group on CPU-sized pods; the restart policy never backs off or gives up."""
    return dsi_manifest(
        name,
        tp=TP,
        replicas=1,
        resources={"gpus": 0, "cpu": "10m", "memory": "16Mi"},
        gpu={"nodeSelector": {}, "tolerations": []},
        head={"resources": {"cpu": "10m", "memory": "16Mi"}},
        restartPolicy={
            "maxRestarts": 10000,
            "windowSeconds": 60,
            "backoff": {"initialSeconds": 0, "maxSeconds": 0},
        },
    )


@dataclass
class Round:
    """One SIGKILL + fault + start."""

    name: str
    first_action: float
    first_pass: float | None
    imports: float | None
    cpu: float
    counted: int
    others_moved: list[str] = field(default_factory=list)


@dataclass
class Bench:
    """Clients, namespace, operator and resources."""

    core: Any
    custom: Any
    api: Any
    ns: str
    op: OperatorProcess
    names: list[str]
    timeout: float

    def statuses(self) -> dict[str, dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)
        return {i["metadata"]["name"]: i.get("status") or {} for i in items["items"]}

    def restarts(self) -> dict[str, int]:
        return {n: _group0(st).get("restarts", 0) for n, st in self.statuses().items()}

    def steady(self) -> bool:
        """Every group formed, no restart in progress, and KubeRay counts both pods (a pod
        failed before KubeRay saw it would meet its 30 s expectations: the simulation's
        cost, not the operator's; see bench_operator.wait_formed)."""
        st = self.statuses()
        if any(
            not _group0(st.get(n, {})).get("members") or _group0(st[n]).get("restartingSince")
            for n in self.names
        ):
            return False
        clusters = self.custom.list_namespaced_custom_object("ray.io", "v1", self.ns, "rayclusters")
        ready = {
            (c["metadata"].get("labels") or {}).get("ray.io/originated-from-cr-name"): (
                c.get("status") or {}
            ).get("readyWorkerReplicas", 0)
            for c in clusters["items"]
        }
        return all(ready.get(n, 0) >= TP for n in self.names)

    def wait(self, pred: Any, what: str, interval: float = 0.2) -> Any:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(interval)
        raise TimeoutError(f"{what} (operator log {self.op.log_path})")


def _group0(status: dict[str, Any]) -> dict[str, Any]:
    groups = status.get("groups") or [{}]
    return dict(groups[0])


def fail_while_down(b: Bench, name: str, rank: int) -> str:
    """Fail one worker pod and wait until KubeRay has replaced it; the failed pod's UID."""
    pod = worker_pods(b.core, b.ns, name)[(0, rank)]
    uid = pod.metadata.uid
    faults.fail_pod(b.api, b.ns, pod.metadata.name, exit_code=137, reason="OOMKilled")

    def replaced() -> bool:
        pods = worker_pods(b.core, b.ns, name, live_only=False)
        p = pods.get((0, rank))
        return (
            p is not None
            and p.metadata.uid != uid
            and p.status.phase == "Running"
            and all(q.metadata.uid != uid for q in pods.values())
        )

    b.wait(replaced, f"KubeRay replaced {name} rank {rank}", interval=0.1)
    return uid


def from_log(log: Path, since: int, spawned: float) -> tuple[float | None, float | None]:
    """(seconds from spawning to the operator's "starting" line, i.e. its imports; the
    operator's own "first pass ... after start" figure), from the log after byte ``since``
    (this process's part of the shared log). ``spawned``: wall-clock time of the spawn."""
    imports = first = None
    with open(log, "rb") as f:
        f.seek(since)
        for line in f.read().decode(errors="replace").splitlines():
            if imports is None and (m := STARTING.search(line)):
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                imports = at - spawned
            if first is None and (m := FIRST_PASS.search(line)):
                first = float(m.group(1))
    return imports, first


def one_round(b: Bench, i: int, rng: random.Random) -> Round:
    """SIGKILL, fail a pod and let KubeRay replace it, start again; measure and check."""
    b.wait(b.steady, "every resource steady")
    before = b.restarts()
    name, rank = rng.choice(b.names), rng.randrange(TP)
    b.op.kill()
    fail_while_down(b, name, rank)
    log_at = b.op.log_path.stat().st_size
    spawned, t0 = time.time(), time.monotonic()
    b.op.start()

    def recorded() -> bool:
        g = _group0(
            b.custom.get_namespaced_custom_object(GROUP, VERSION, b.ns, PLURAL, name).get("status")
            or {}
        )
        return g.get("restarts", 0) > before[name]

    b.wait(recorded, f"restart of {name} recorded", interval=0.05)
    first_action = time.monotonic() - t0
    cpu = cpu_seconds(b.op.pid)
    b.wait(b.steady, "every resource steady again")
    time.sleep(1)  # a second restart of the same fault would show here
    after = b.restarts()
    moved = [
        f"{n}: {before.get(n, 0)} -> {c}"
        for n, c in after.items()
        if n != name and c != before.get(n, 0)
    ]
    imports, first_pass = from_log(b.op.log_path, log_at, spawned)
    r = Round(name, first_action, first_pass, imports, cpu, after[name] - before[name], moved)
    flag = "" if r.counted == 1 and not moved else f"  VIOLATION {moved}"
    print(
        f"# restart {i:3d} {name:6s} rank {rank}: first action {first_action:6.2f}s "
        f"(imports {_s(imports)}s, first pass {_s(first_pass)}s, operator CPU {cpu:.2f}s), "
        f"counted {r.counted}{flag}",
        flush=True,
    )
    return r


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used: unlike wall time, it does not grow
    when other work shares the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def add_pod_capacity(core: Any, pods: int) -> list[str]:
    """Simulated CPU nodes until ``pods`` more pods fit on untainted kwok nodes."""
    nodes = core.list_node(label_selector="type=kwok").items
    room = sum(int(n.status.allocatable.get("pods", 0)) for n in nodes if not n.spec.taints)
    used = len(core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=").items)
    added = []
    for j in range(max(0, -(-(pods - (room - used)) // PODS_PER_NODE))):
        node = manifests.cpu_node(EXTRA_NODE_FIRST + j)
        try:
            core.create_node(node)
        except ApiException as e:
            if e.status != 409:
                raise
        added.append(node["metadata"]["name"])
    return added


def install_crd(cfg: lcconfig.ClusterConfig) -> None:
    kubectl = lc.binaries(cfg.cache_dir)["kubectl"]
    crd = ROOT / "crds" / "deepspeedinferences.deepspeed.ai.yaml"
    cmd = [str(kubectl), f"--kubeconfig={cfg.kubeconfig}", "apply", "--server-side"]
    subprocess.run([*cmd, "--force-conflicts", "-f", str(crd)], check=True, capture_output=True)


def report(rounds: list[Round], formed_s: float, n: int) -> bool:
    """Print the summary; True when every fault was counted exactly once."""
    fa = [r.first_action for r in rounds]
    fp = [r.first_pass for r in rounds if r.first_pass is not None]
    im = [r.imports for r in rounds if r.imports is not None]
    cpu = [r.cpu for r in rounds]
    counted = sum(r.counted for r in rounds)
    exact = sum(1 for r in rounds if r.counted == 1)
    moved = [m for r in rounds for m in r.others_moved]
    print(f"\n{n} resources (formed in {formed_s:.0f}s), {len(rounds)} operator restarts")
    print(f"{'':42} {'p50 s':>7} {'p99 s':>7} {'max s':>7}")
    for label, xs in (
        ("start -> first action (restart recorded)", fa),
        ("start -> first pass (operator log)", fp),
        ("start -> 'starting' log line (imports)", im),
        ("operator CPU used until first action", cpu),
    ):
        if xs:
            print(f"{label:42} {statistics.median(xs):7.2f} {pct(xs, 99):7.2f} {max(xs):7.2f}")
    print(
        f"restarts counted {counted} for {len(rounds)} faults injected "
        f"({exact} counted exactly once); other resources moved: {len(moved)}"
    )
    return exact == len(rounds) and not moved


def setup(args: argparse.Namespace) -> tuple[Bench, list[str]] | None:
    """Namespace, capacity, operator and formed resources; None when the cluster is down."""
    cfg = lcconfig.ClusterConfig.from_env()
    if not lc.is_up(cfg):
        print("local cluster is not running: python -m dsi_localcluster up", file=sys.stderr)
        return None
    api = config.new_client_from_config(str(cfg.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    install_crd(cfg)
    ns = f"bench-restart-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    extra = add_pod_capacity(core, (TP + 1) * args.resources + 20)
    log = Path(f"/tmp/{ns}-operator.log")
    op = OperatorProcess(cfg.kubeconfig, [ns], log, tick_seconds=5, facts_ttl=30)
    if args.bytecode_cache:
        # The operator image ships compiled bytecode; a venv installed without it under
        # PYTHONDONTWRITEBYTECODE=1 compiles every module on every start (seconds on 2 cores).
        op.extra_env = {"PYTHONPYCACHEPREFIX": args.bytecode_cache, "PYTHONDONTWRITEBYTECODE": ""}
    names = [f"r-{i}" for i in range(args.resources)]
    return Bench(core, custom, api, ns, op, names, args.timeout), extra


def main() -> int:
    """Run the rounds and print the figures; 1 when a fault was not counted exactly once."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resources", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument(
        "--bytecode-cache",
        default="/tmp/dsi-bench-pycache",
        metavar="DIR",
        help="the operator's compiled-bytecode cache (as its image has one); '' to run it "
        "with this environment's bytecode settings",
    )
    args = ap.parse_args()
    made = setup(args)
    if made is None:
        return 2
    b, extra_nodes = made
    rng = random.Random(args.seed)
    rounds: list[Round] = []
    ok = False
    try:
        b.op.start()
        t = time.monotonic()
        for n in b.names:
            b.custom.create_namespaced_custom_object(GROUP, VERSION, b.ns, PLURAL, small_dsi(n))
        b.wait(b.steady, "resources formed", interval=1)
        formed_s = time.monotonic() - t
        cache = args.bytecode_cache or "none (this environment's settings)"
        print(
            f"# {len(b.names)} resources formed in {formed_s:.0f}s; operator log "
            f"{b.op.log_path}; operator bytecode cache: {cache}",
            flush=True,
        )
        for i in range(args.restarts):
            rounds.append(one_round(b, i, rng))
        ok = report(rounds, formed_s, len(b.names))
    finally:
        b.op.stop()
        try:
            b.core.delete_namespace(b.ns)
        except ApiException:
            pass
        for node in extra_nodes:
            b.core.delete_node(node)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
