"""``make run``: the operator on the local simulated cluster, with the sample resource applied.

Expects ``make cluster-up`` to have run (the Makefile does that first). Installs the CRD,
starts the operator in the background (pid file next to the cluster's, so ``make
cluster-down`` stops it too), applies the sample, waits until the resource reaches the
furthest phase a simulated cluster can reach, and prints ``kubectl get dsi``.

On kwok nodes pods go Running but no container runs, so no Ray and no model: the resource
stops at phase Forming with a message saying it waits for Ray Serve. That is the honest end
state here; on a real GPU cluster it goes on to Ready.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dsi_localcluster import cluster as localcluster
from dsi_localcluster import config as localconfig

from .labels import LABEL_INFERENCE, PLURAL

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "tiny-gpu-sim.yaml"
CRD_DIR = ROOT / "crds"
PID_NAME = "dsi-operator"
# Phases past which a simulated cluster cannot go (no Ray runs in kwok pods).
SETTLED = {"Forming", "Ready", "Degraded", "Failed"}


def _kubectl(cfg: localconfig.ClusterConfig, *args: str) -> str:
    out = localcluster.kubectl(cfg, *args, check=False)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{out.stderr.strip()}")
    return str(out.stdout)


def start_operator(cfg: localconfig.ClusterConfig) -> tuple[int, Path]:
    """Start ``python -m dsi_operator`` detached, unless this cluster's operator already runs."""
    paths = localcluster.Paths(cfg.state_dir)
    pidfile = paths.pidfile(PID_NAME)
    log = paths.log(PID_NAME)
    rec = localcluster.read_pidfile(pidfile)
    if rec is not None and localcluster.pid_runs(*rec):
        return rec[0], log
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dsi_operator",
                "--all-namespaces",
                "--kubeconfig",
                str(cfg.kubeconfig),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: `down` kills the group
            cwd=ROOT,
        )
    localcluster.write_pidfile(pidfile, proc.pid, Path(sys.executable))
    return proc.pid, log


def _phase(cfg: localconfig.ClusterConfig, name: str) -> tuple[str, str]:
    out = localcluster.kubectl(
        cfg,
        "get",
        PLURAL,
        name,
        "-o",
        "jsonpath={.status.phase}|{.status.message}",
        check=False,
    )
    phase, _, message = out.stdout.partition("|")
    return phase, message


def main(argv: Sequence[str] | None = None) -> int:
    """Install the CRD, start the operator, apply the sample and show where it got."""
    p = argparse.ArgumentParser(prog="python -m dsi_operator.local_run", description=__doc__)
    p.add_argument("-f", "--file", type=Path, default=SAMPLE, help="resource to apply")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for a phase")
    args = p.parse_args(argv)
    cfg = localcluster.running_config(localconfig.ClusterConfig.from_env(dict(os.environ)))
    if not localcluster.is_up(cfg):
        raise SystemExit("the local cluster is not up: run `make cluster-up` first")

    print(_kubectl(cfg, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR)), end="")
    _kubectl(cfg, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRD_DIR))
    pid, log = start_operator(cfg)
    print(f"operator running (pid {pid}); log: {log}")
    applied = _kubectl(cfg, "apply", "-f", str(args.file), "-o", "name")
    print(applied, end="")
    name = applied.strip().split("/")[-1]

    deadline = time.monotonic() + args.timeout
    phase, message = "", ""
    while time.monotonic() < deadline:
        phase, message = _phase(cfg, name)
        if phase in SETTLED:
            break
        time.sleep(2)
    print(_kubectl(cfg, "get", PLURAL, "-o", "wide"), end="")
    print(_kubectl(cfg, "get", "pods", "-l", f"{LABEL_INFERENCE}={name}", "-o", "wide"), end="")
    print(f"\nphase {phase or '(none yet)'}: {message}")
    if phase not in SETTLED:
        print(f"did not settle within {args.timeout:.0f}s; see {log}", file=sys.stderr)
        return 1
    print(
        f"\nexport KUBECONFIG={cfg.kubeconfig}   # then: kubectl get dsi, kubectl describe dsi "
        f"{name}\nmake cluster-down   # stops the operator and the cluster"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
