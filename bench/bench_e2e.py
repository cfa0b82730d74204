"""End-to-end figures of the whole stack on the local cluster's process-backed nodes.

Prints, for the sample resource (tiny Llama, TP 2, 2 groups, CPU):
- apply -> Ready (s), and apply -> first answer;
- rank process killed -> both groups serving again (p50/p99 over --kills kills);
- the share of requests that succeeded while one group restarted (a 503 is a failure);
- peak RSS of the whole local stack (control plane, KubeRay, kubelets, every pod's
  processes, the operator), sampled every second.

Needs `make cluster-up` as root (process-backed nodes). Uses installed code only.
Run: .venv/bin/python bench/bench_e2e.py [--kills 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from dsi_localcluster import cluster, config, faults
from dsi_localcluster import run as localrun
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION
from kubernetes import client
from kubernetes import config as kconfig

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
FAST_POLICY = {
    "maxRestarts": 50,
    "windowSeconds": 3600,
    "backoff": {"initialSeconds": 1, "maxSeconds": 2},
    "formationTimeoutSeconds": 600,
}


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


@dataclass
class MemorySampler:
    """Peak summed RSS of the cluster's processes and all their descendants."""

    state_dir: Path
    peak_mib: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def roots(self) -> list[int]:
        pids = []
        for f in (self.state_dir / "pids").glob("*"):
            try:
                pids.append(int(f.read_text().split()[0]))
            except (ValueError, IndexError, OSError):
                continue
        return pids

    def sample(self) -> float:
        seen: set[int] = set()
        total = 0
        for pid in self.roots():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
        return total / 2**20

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_mib = max(self.peak_mib, self.sample())
            self.stop.wait(1.0)


def generate(endpoint: str, timeout: float = 20) -> dict[str, Any]:
    """One greedy /generate."""
    body = json.dumps({"prompt": "The quick brown fox", "max_tokens": 8}).encode()
    req = urllib.request.Request(
        f"{endpoint}/generate", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


@dataclass
class Load:
    """Sequential requests in a thread; records (t, ok, group)."""

    endpoint: str
    results: list[tuple[float, bool, int | None]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                self.results.append((t, True, int(generate(self.endpoint)["group"])))
            except urllib.error.HTTPError as e:
                self.results.append((t, False, None))
                self.failures[f"{e.code} {e.read()[:90].decode(errors='replace')}"] += 1
                time.sleep(0.1)
            except (urllib.error.URLError, OSError, KeyError) as e:
                self.results.append((t, False, None))
                self.failures[repr(e)[:90]] += 1
                time.sleep(0.1)


class Bench:
    """The resource under test and its API clients."""

    def __init__(self, cfg: config.ClusterConfig, namespace: str) -> None:
        self.cfg = cfg
        self.ns = namespace
        api = kconfig.new_client_from_config(str(cfg.kubeconfig))
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.endpoint = ""

    def status(self) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, NAME)
        st: dict[str, Any] = obj.get("status") or {}
        return st

    def wait(self, pred: Any, timeout: float, what: str) -> None:
        wait_for(pred, timeout, what, dump=lambda: json.dumps(self.status())[:2000], interval=0.5)

    def apply(self) -> tuple[float, float]:
        """Apply the sample; seconds to Ready and to the first answer."""
        body = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
        body["spec"]["restartPolicy"] = FAST_POLICY
        t0 = time.monotonic()
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)
        self.wait(lambda: self.status().get("phase") == "Ready", 900, "Ready")
        ready = time.monotonic() - t0
        self.endpoint = self.status()["endpoint"].rstrip("/")
        self.wait(self.answers, 120, "first answer")
        return ready, time.monotonic() - t0

    def answers(self) -> bool:
        try:
            generate(self.endpoint, timeout=10)
            return True
        except (urllib.error.URLError, OSError):
            return False

    def worker_pod(self, group: int, rank: int) -> str:
        sel = f"deepspeed.ai/inference={NAME},deepspeed.ai/group={group},deepspeed.ai/rank={rank}"
        pods = [
            p
            for p in self.core.list_namespaced_pod(self.ns, label_selector=sel).items
            if p.metadata.deletion_timestamp is None
        ]
        return str(pods[0].metadata.name)

    def kill_and_recover(self, group: int, rank: int) -> tuple[float, int, int]:
        """Kill one rank's process; seconds until both groups answer again, ok, total."""
        restarts = int(self.status().get("restarts", 0))
        load = Load(self.endpoint)
        thread = threading.Thread(target=load.run, daemon=True)
        thread.start()
        time.sleep(1)
        t0 = time.monotonic()
        faults.kill_container_process(self.api, self.ns, self.worker_pod(group, rank))

        def recovered() -> bool:
            st = self.status()
            if st.get("phase") != "Ready" or int(st.get("restarts", 0)) <= restarts:
                return False
            return {g for t, ok, g in load.results if ok and t > t0} >= {0, 1}

        self.wait(recovered, 600, f"group {group} back")
        took = time.monotonic() - t0
        load.stop.set()
        thread.join(timeout=30)
        window = [ok for t, ok, _ in load.results if t >= t0]
        for what, n in load.failures.most_common(3):
            print(f"    {n} x {what}", flush=True)
        return took, sum(window), len(window)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--namespace", default=f"bench-e2e-{uuid.uuid4().hex[:6]}")
    args = p.parse_args()
    cfg = cluster.running_config(config.ClusterConfig.from_env())
    if not cluster.is_up(cfg) or not localrun.process_nodes(cfg):
        raise SystemExit("needs `make cluster-up` as root (process-backed nodes)")
    mem = MemorySampler(cfg.state_dir)
    threading.Thread(target=mem.run, daemon=True).start()
    b = Bench(cfg, args.namespace)
    localrun.install_crd(cfg)  # a fresh `make cluster-up` has no DSI CRD yet
    localrun.start_operator(cfg)
    b.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=b.ns)))
    try:
        ready, first = b.apply()
        print(f"apply -> Ready: {ready:.1f} s; apply -> first answer: {first:.1f} s", flush=True)
        times, ok, total = [], 0, 0
        for i in range(args.kills):
            took, good, n = b.kill_and_recover(i % 2, i % 2)
            times.append(took)
            ok, total = ok + good, total + n
            print(f"kill {i + 1}: group {i % 2} back in {took:.1f} s; {good}/{n} ok", flush=True)
        print("\n| metric | value |\n|---|---|")
        print(f"| apply -> Ready (s) | {ready:.1f} |")
        print(f"| apply -> first answer (s) | {first:.1f} |")
        print(f"| rank killed -> both groups serving, p50 (s) | {statistics.median(times):.1f} |")
        print(f"| rank killed -> both groups serving, p99 (s) | {pct(times, 99):.1f} |")
        print(f"| requests ok while a group restarts | {ok}/{total} = {ok / max(total, 1):.1%} |")
        print(f"| peak RSS of the local stack (MiB) | {mem.peak_mib:.0f} |")
    finally:
        mem.stop.set()
        b.core.delete_namespace(b.ns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
