"""``make run``: the operator on the local cluster, a sample resource, and an answer from it.

Expects ``make cluster-up`` to have run (the Makefile does that first). Installs the CRD,
starts the operator in the background (pid file next to the cluster's, so ``make
cluster-down`` stops it too), applies the sample and waits, showing what it waits for.
``--operator helm`` (``make run OPERATOR=helm``) installs the operator with the Helm chart
instead, as a pod on a process-backed node in namespace ``dsi-system`` (see ``helmop``).

With process-backed nodes (the default when run as root) the sample is
``examples/tiny-local.yaml``: its pods really run (Ray head, Ray workers, DeepSpeed TP=2 over
gloo), the resource reaches ``Ready`` and the command ends by sending a completion to the
endpoint the operator made. Without them (no root) only kwok nodes exist, no container runs
there, and the GPU sample stops at phase ``Forming``: that is the honest end state then.

This lives in the cluster package, not in the operator, because the operator ships without
the local cluster; it runs the operator as a program, as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from dsi_operator.api.labels import CRD_NAME, LABEL_INFERENCE

from . import cluster, config, helmop, statedir
from .kubelet.agent import LABEL as PROCESS_NODE_LABEL

ROOT = config.repo_root()
PROCESS_SAMPLE = ROOT / "examples" / "tiny-local.yaml"
KWOK_SAMPLE = ROOT / "examples" / "tiny-gpu-sim.yaml"
CRD_DIR = ROOT / "crds"
PID_NAME = "dsi-operator"
#: Where ``--operator helm`` installs the chart.
HELM_NAMESPACE = "dsi-system"
# Phases past which a kwok-only cluster cannot go (no Ray runs in kwok pods).
KWOK_SETTLED = {"Forming", "Ready", "Degraded", "Failed"}
PROMPT = "The quick brown fox"


def _kubectl(cfg: config.ClusterConfig, *args: str) -> str:
    out = cluster.kubectl(cfg, *args, check=False)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{out.stderr.strip()}")
    return str(out.stdout)


def install_crd(cfg: config.ClusterConfig) -> str:
    """Apply the DeepSpeedInference CRD (idempotent) and wait until it is served."""
    out = _kubectl(cfg, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    _kubectl(cfg, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRD_DIR))
    return out


def start_operator(cfg: config.ClusterConfig) -> tuple[int, Path]:
    """Start ``python -m dsi_operator`` detached, unless this cluster's operator already runs."""
    paths = statedir.Paths(cfg.state_dir)
    pidfile = paths.pidfile(PID_NAME)
    log = paths.log(PID_NAME)
    rec = statedir.read_pidfile(pidfile)
    if rec is not None and statedir.pid_runs(*rec):
        return rec[0], log
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "dsi_operator", "--all-namespaces"]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [*argv, "--kubeconfig", str(cfg.kubeconfig)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: `down` kills the group
            cwd=ROOT,
        )
    statedir.write_pidfile(pidfile, proc.pid, Path(sys.executable))
    return proc.pid, log


def stop_operator(cfg: config.ClusterConfig) -> bool:
    """Stop the background operator of an earlier ``make run`` (True if one ran)."""
    rec = statedir.read_pidfile(statedir.Paths(cfg.state_dir).pidfile(PID_NAME))
    if rec is None or not statedir.pid_runs(*rec):
        return False
    os.killpg(rec[0], signal.SIGTERM)  # its own process group (start_new_session)
    deadline = time.monotonic() + 20
    while statedir.pid_runs(*rec) and time.monotonic() < deadline:
        time.sleep(0.2)
    return True


def helm_operator_runs(cfg: config.ClusterConfig) -> bool:
    """Whether the chart's operator Deployment exists (``--operator helm`` made it)."""
    out = cluster.kubectl(cfg, "get", "deploy", helmop.RELEASE, "-n", HELM_NAMESPACE, check=False)
    return out.returncode == 0


def start_helm_operator(cfg: config.ClusterConfig, watch: str) -> str:
    """The chart's operator as a pod on a process node, watching ``watch``; its pod line."""
    if stop_operator(cfg):
        print("stopped the operator process of an earlier `make run` (one operator at a time)")
    t0 = time.monotonic()
    helmop.install(cfg, HELM_NAMESPACE, [watch])
    pods = _kubectl(
        cfg, "get", "pods", "-n", HELM_NAMESPACE, "-l", helmop.pod_selector(), "-o", "wide"
    )
    return f"helm release {helmop.RELEASE} ready in {time.monotonic() - t0:.0f}s:\n{pods}"


def process_nodes(cfg: config.ClusterConfig) -> list[str]:
    """Names of the Ready process-backed nodes."""
    out = _kubectl(cfg, "get", "nodes", "-l", f"{PROCESS_NODE_LABEL}=true", "-o", "json")
    names = []
    for node in json.loads(out)["items"]:
        conds = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
        if conds.get("Ready") == "True":
            names.append(node["metadata"]["name"])
    return names


def resource_state(cfg: config.ClusterConfig, name: str) -> dict[str, Any]:
    """The resource's status (empty before the operator wrote one)."""
    out = cluster.kubectl(cfg, "get", CRD_NAME, name, "-o", "json", check=False)
    if out.returncode != 0:
        return {}
    status: dict[str, Any] = json.loads(out.stdout).get("status") or {}
    return status


def _pods_line(cfg: config.ClusterConfig, name: str) -> str:
    out = cluster.kubectl(
        cfg, "get", "pods", "-l", f"{LABEL_INFERENCE}={name}", "-o", "json", check=False
    )
    if out.returncode != 0:
        return "pods: ?"
    items = json.loads(out.stdout)["items"]
    running = sum(1 for p in items if p["status"].get("phase") == "Running")
    ready = sum(
        1
        for p in items
        for c in p["status"].get("conditions", [])
        if c["type"] == "Ready" and c["status"] == "True"
    )
    return f"pods {len(items)} (running {running}, ready {ready})"


def wait_phase(
    cfg: config.ClusterConfig, name: str, done: set[str], timeout: float, every: float = 10
) -> dict[str, Any]:
    """Poll the resource until its phase is in ``done``, printing progress every ``every`` s."""
    start = time.monotonic()
    last_print = -every
    status: dict[str, Any] = {}
    while time.monotonic() - start < timeout:
        status = resource_state(cfg, name)
        elapsed = time.monotonic() - start
        if status.get("phase") in done:
            break
        if elapsed - last_print >= every:
            last_print = elapsed
            phase = status.get("phase") or "(no status yet)"
            msg = status.get("message") or "waiting for the operator"
            print(f"[{elapsed:5.0f}s] {phase}: {msg}; {_pods_line(cfg, name)}", flush=True)
        time.sleep(2)
    return status


def complete(endpoint: str, prompt: str = PROMPT, max_tokens: int = 16) -> dict[str, Any]:
    """POST /v1/completions (greedy) to the endpoint and return the parsed answer."""
    body = {"model": "", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    models = json.loads(urllib.request.urlopen(f"{endpoint}/v1/models", timeout=30).read())
    body["model"] = models["data"][0]["id"]
    req = urllib.request.Request(
        f"{endpoint}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    answer: dict[str, Any] = json.loads(urllib.request.urlopen(req, timeout=120).read())
    return answer


def _ask_with_retries(endpoint: str, timeout: float = 60) -> dict[str, Any]:
    # Ready means every group formed; the Serve proxy may still be taking its route table.
    deadline = time.monotonic() + timeout
    while True:
        try:
            return complete(endpoint)
        except (urllib.error.URLError, OSError) as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"the endpoint {endpoint} did not answer: {e}") from None
            time.sleep(2)


def _hints(cfg: config.ClusterConfig, name: str, endpoint: str | None, model: str) -> str:
    env_cmd = f'eval "$({sys.executable} -m dsi_localcluster env)"'
    lines = [
        "",
        "Next steps (kubectl comes from the cluster build, helm too once built; `env` puts them"
        " on PATH):",
        f"  {env_cmd}",
        "  kubectl get dsi -o wide -w          # phase, groups, restarts and re-forms, live",
        f"  kubectl describe dsi {name}        # conditions and Events",
        f"  kubectl get pods -l deepspeed.ai/inference={name} -o wide",
        "  kubectl exec POD -- pgrep -af 'ray::RankActor'   # then py-spy dump --pid PID: a stuck"
        " rank (docs/troubleshooting.md)",
    ]
    if endpoint:
        body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 16})
        lines += [
            f"  curl -s {endpoint}/v1/completions -H 'Content-Type: application/json' -d '{body}'",
            "  python - <<'EOF'",
            "  from openai import OpenAI",
            f"  client = OpenAI(base_url='{endpoint}/v1', api_key='unused')",
            f"  print(client.completions.create(model='{model}', prompt='{PROMPT}',"
            " max_tokens=16).choices[0].text)",
            "  EOF",
        ]
    lines.append("  # dashboards and metrics: docs/observability.md")
    lines.append("  make cluster-down   # stops the operator and the cluster")
    return "\n".join(lines)


def _settle(cfg: config.ClusterConfig, name: str, real: bool, timeout: float) -> int:
    done = {"Ready", "Failed"} if real else KWOK_SETTLED
    status = wait_phase(cfg, name, done, timeout)
    print(_kubectl(cfg, "get", "dsi", "-o", "wide"), end="")
    phase = status.get("phase")
    print(f"\nphase {phase or '(none yet)'}: {status.get('message', '')}")
    if phase not in done:
        print(f"did not reach {'/'.join(sorted(done))} within {timeout:.0f}s", file=sys.stderr)
        return 1
    endpoint = status.get("endpoint")
    model = ""
    if real and phase == "Ready" and endpoint:
        answer = _ask_with_retries(endpoint)
        model = answer.get("model", "")
        print(f"\nPOST {endpoint}/v1/completions  prompt={PROMPT!r}")
        print(f"-> {answer['choices'][0]['text']!r}  (usage {answer.get('usage')})")
    elif not real:
        print("(kwok-only cluster: no container runs, so Ray Serve never becomes ready)")
    print(_hints(cfg, name, endpoint if real else None, model))
    return 0 if phase != "Failed" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Install the CRD, start the operator, apply the sample and show where it got."""
    p = argparse.ArgumentParser(prog="python -m dsi_localcluster.run", description=__doc__)
    p.add_argument("-f", "--file", type=Path, help="resource to apply (default: a sample)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for Ready")
    p.add_argument(
        "--operator",
        choices=["process", "helm"],
        default="process",
        help="process: the operator from the venv on the host (default); helm: the chart's "
        f"operator as a pod on a process-backed node, in namespace {HELM_NAMESPACE}",
    )
    args = p.parse_args(argv)
    cfg = cluster.running_config(config.ClusterConfig.from_env(dict(os.environ)))
    if not cluster.is_up(cfg):
        raise SystemExit("the local cluster is not up: run `make cluster-up` first")
    real = bool(process_nodes(cfg))
    sample = args.file or (PROCESS_SAMPLE if real else KWOK_SAMPLE)
    print(install_crd(cfg), end="")
    if args.operator == "helm":
        if not real:
            raise SystemExit("--operator helm runs the operator pod on a process-backed node: none")
        watch = (yaml.safe_load(sample.read_text()).get("metadata") or {}).get("namespace")
        print(start_helm_operator(cfg, watch or "default"), end="")
        print(f"operator log: kubectl logs -n {HELM_NAMESPACE} deploy/{helmop.RELEASE}")
    else:
        if helm_operator_runs(cfg):
            raise SystemExit(
                f"the chart's operator runs in namespace {HELM_NAMESPACE} (make run OPERATOR=helm):"
                f" helm uninstall {helmop.RELEASE} -n {HELM_NAMESPACE} first, or run with"
                " OPERATOR=helm again (one operator at a time)"
            )
        pid, log = start_operator(cfg)
        print(f"operator running (pid {pid}); log: {log}")
    applied = _kubectl(cfg, "apply", "-f", str(sample), "-o", "name")
    print(applied, end="")
    name = applied.strip().split("/")[-1]
    if not real:
        print("no process-backed nodes (they need root): the kwok sample stops at Forming")
    return _settle(cfg, name, real, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
