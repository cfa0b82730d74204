"""Run every test tier, overlapping the ones that do not compete, and print what each cost.

``make test`` (and so CI) calls this. The tiers, by cost:

====================  =========================================  ==========================
tier                  what                                       needs
====================  =========================================  ==========================
lint                  ruff check, ruff format --check, mypy      the venv
unit                  tests/unit: pure logic, seconds            the venv
tools                 tests/tools: helm, hadolint, checkov,      the venv, built helm
                      kubeconform, kube-score on the chart
worker                tests/worker: Ray, torch, DeepSpeed        the venv (local Ray)
integration           tests/integration: the control plane       the local cluster
e2e                   tests/e2e: the stack on process nodes      the local cluster, root
====================  =========================================  ==========================

Phases run one after another; the lanes inside a phase run at the same time. Worker and e2e
keep two cores busy (Ray, torch), integration mostly waits on the control plane, so each of the
two heavy tiers runs beside a part of integration:

1. the local cluster starts (about 30 s of mostly waiting) while lint, unit and tools run;
2. worker, beside integration's ``cluster-faults`` modules (they stop kube-apiserver, etcd
   and KubeRay, break nodes, or use the process-backed nodes, which e2e must not see) and
   then the integration modules of ``INTEGRATION_WITH_WORKER``;
3. e2e, beside the rest of integration (kwok nodes only, a namespace each).

Measured on this 2-core machine, alone and idle (2026-12-07): worker 12:07, integration
about 15 minutes, e2e about 20; see ``docs/testing.md`` for the split and its figures.

The output of steps that overlap is kept in files under ``.ci-logs/`` and printed whole when
the step ends, so the log reads tier by tier. Every tier's pytest prints ``--durations=25``.
A step failing does not stop the later phases (a run reports every tier), but the exit
status is 1 when any step failed, and pytest's 5 (no tests collected) counts as a failure.

Extra arguments are passed to every pytest run; ``--only TIER[,TIER]`` runs a subset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".ci-logs"
PY = sys.executable
TIERS = ("lint", "unit", "tools", "worker", "integration", "e2e")
#: Integration modules that stop or break parts of the cluster (kube-apiserver, etcd, KubeRay,
#: nodes) or run pods on the process-backed nodes: never beside e2e, which needs all of them.
CLUSTER_FAULTS = (
    "test_control_plane.py",
    "test_env_faults.py",
    "test_env_lifecycle.py",
    "test_process_exec.py",
    "test_process_nodes.py",
)
#: The other integration modules that run beside the worker tier (after CLUSTER_FAULTS); the
#: rest run beside e2e. Chosen so that both halves end with their heavy tier.
INTEGRATION_WITH_WORKER = (
    "test_chaos_short.py",
    "test_rollout_api.py",
)
_PRINT = threading.Lock()


@dataclass
class Step:
    """One tier's command and, once run, its outcome."""

    name: str
    argv: list[str]
    rc: int | None = None
    seconds: float = 0.0
    summary: str = ""
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = LOGS / f"{self.name}.log"

    def run(self, stream: bool) -> int:
        """Run to the end; stream the output live, or keep it for :meth:`show`."""
        t0 = time.monotonic()
        with self.log.open("w", buffering=1) as out:  # line-buffered: tail -f works
            proc = subprocess.Popen(
                self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if stream:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            self.rc = proc.wait()
        self.seconds = time.monotonic() - t0
        self.summary = pytest_summary(self.log.read_text())
        if not stream:
            self.show()
        return self.rc

    def show(self) -> None:
        """Print the whole kept output at once, framed by the tier's name."""
        with _PRINT:
            print(f"\n{'=' * 30} tier {self.name} (ran alongside others) {'=' * 30}")
            print(self.log.read_text(), end="")
            print(f"{'=' * 30} end of tier {self.name}: rc {self.rc} {'=' * 30}\n", flush=True)


def pytest_summary(text: str) -> str:
    """The last ``N passed, M failed ... in Xs`` line of a pytest run ('' if none)."""
    found = re.findall(r"^=* ?((?:\d+ \w+|no tests ran).* in [\d.]+s.*?) ?=*$", text, re.M)
    return found[-1] if found else ""


def pytest_step(name: str, paths: Sequence[str], extra: Sequence[str]) -> Step:
    """A pytest run of one tier's directories."""
    return Step(name, [PY, "-m", "pytest", *paths, *extra])


def integration_parts(root: Path = ROOT) -> dict[str, list[str]]:
    """The integration modules in three parts (see :data:`CLUSTER_FAULTS`): every module in
    exactly one, so that a new module runs beside e2e unless it is listed."""
    mods = sorted(p.name for p in (root / "tests" / "integration").glob("test_*.py"))
    first = [m for m in mods if m in CLUSTER_FAULTS]
    second = [m for m in mods if m in INTEGRATION_WITH_WORKER]
    rest = [m for m in mods if m not in CLUSTER_FAULTS and m not in INTEGRATION_WITH_WORKER]
    where = "tests/integration/"
    return {
        "cluster-faults": [where + m for m in first],
        "integration-1": [where + m for m in second],
        "integration-2": [where + m for m in rest],
    }


def steps(extra: Sequence[str]) -> dict[str, Step]:
    """Every step by name: one per tier, integration in three (:func:`integration_parts`)."""
    parts = {name: pytest_step(name, paths, extra) for name, paths in integration_parts().items()}
    return {
        "lint": Step("lint", ["make", "--no-print-directory", "lint"]),
        "unit": pytest_step("unit", ["tests/unit"], extra),
        "tools": pytest_step("tools", ["tests/tools"], extra),
        "worker": pytest_step("worker", ["tests/worker"], extra),
        **parts,
        "e2e": pytest_step("e2e", ["tests/e2e"], extra),
    }


def run_together(lanes: Sequence[Callable[[], None]]) -> None:
    """Run each lane in a thread of its own and wait for all."""
    threads = [threading.Thread(target=lane) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def chain(todo: Sequence[Step], stream: bool) -> Callable[[], None]:
    """A lane that runs ``todo`` one after another."""

    def lane() -> None:
        for s in todo:
            s.run(stream)

    return lane


class Cluster:
    """The local control plane for the integration and e2e tiers: started here unless one
    is already up (a developer's), and stopped at the end only if started here."""

    def __init__(self) -> None:
        from dsi_localcluster import cluster as lc
        from dsi_localcluster import config as lcconfig

        self.lc, self.cfg = lc, lcconfig.ClusterConfig.from_env()
        self.started = False
        self.error = ""
        self.seconds = 0.0

    def start(self) -> None:
        """Bring it up (errors are kept: the tiers that need it then fail on their own)."""
        t0 = time.monotonic()
        try:
            if not self.lc.is_up(self.cfg):
                self.lc.up(self.cfg)
                self.started = True
        except Exception as e:  # noqa: BLE001 - reported, and the cluster tiers will fail
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Tear down what this run started, unless DSI_KEEP_CLUSTER asks to keep it."""
        if self.started and os.environ.get("DSI_KEEP_CLUSTER", "") not in ("1", "true", "yes"):
            self.lc.down(self.cfg, quiet=True)


#: The tier each step belongs to (``--only`` names tiers).
TIER_OF = {step: "integration" for step in ("cluster-faults", "integration-1", "integration-2")}


def plan(wanted: set[str], all_steps: dict[str, Step]) -> list[list[list[Step]]]:
    """Phases of lanes of steps, keeping only the steps of the wanted tiers."""

    def keep(names: Sequence[str]) -> list[Step]:
        return [all_steps[n] for n in names if TIER_OF.get(n, n) in wanted]

    phases = [
        [keep(["lint", "unit", "tools"])],
        [keep(["worker"]), keep(["cluster-faults", "integration-1"])],
        [keep(["e2e"]), keep(["integration-2"])],
    ]
    return [[lane for lane in phase if lane] for phase in phases]


def report(done: Sequence[Step], cluster: Cluster | None, wall: float) -> None:
    """The table of tiers: wall seconds, exit status, pytest's summary."""
    print("\n" + "=" * 100)
    print(f"{'tier':12s} {'wall s':>8s} {'rc':>4s}  summary")
    if cluster is not None:
        state = cluster.error or ("started" if cluster.started else "already up")
        print(f"{'cluster-up':12s} {cluster.seconds:8.0f} {'-':>4s}  {state} (overlapped)")
    for s in done:
        print(f"{s.name:12s} {s.seconds:8.0f} {s.rc!s:>4s}  {s.summary}")
    phases = "lint+unit+tools (cluster starting) | worker || integration 1 | e2e || integration 2"
    print(f"{'all':12s} {wall:8.0f}       phases: {phases}")
    print("=" * 100, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tiers; 0 only if every one passed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(TIERS), help="comma-separated tiers")
    args, extra = ap.parse_known_args(argv)
    wanted = set(args.only.split(","))
    if unknown := wanted - set(TIERS):
        ap.error(f"--only: unknown tier(s) {sorted(unknown)}; allowed: {', '.join(TIERS)}")
    LOGS.mkdir(exist_ok=True)
    all_steps = steps(extra)
    t0 = time.monotonic()
    cluster = Cluster() if wanted & {"integration", "e2e"} else None
    try:
        for i, phase in enumerate(plan(wanted, all_steps)):
            lanes = [chain(lane, stream=len(phase) == 1) for lane in phase]
            if i == 0 and cluster is not None:
                lanes.append(cluster.start)
            run_together(lanes)
            if i == 0 and cluster is not None and cluster.error:
                print(f"local cluster did not start: {cluster.error}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
    done = [s for s in all_steps.values() if s.rc is not None]
    report(done, cluster, time.monotonic() - t0)
    return 0 if done and all(s.rc == 0 for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
