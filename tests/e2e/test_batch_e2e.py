"""A batch run for real: a DeepSpeedBatchInference applied through the operator becomes a
RayJob, KubeRay brings up the Ray cluster on process-backed nodes and submits
``python -m dsi_worker.batch``, 2 TP-2 groups of the tiny model run every input row, and a
rank pod deleted mid-run costs a group replacement, not a row: the output holds every input
id exactly once, the status says Succeeded with all rows done, and the cluster is deleted
when the job ends."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import BATCH_PLURAL, GROUP, VERSION
from e2e_stack import ROOT, OperatorProcess, install_crd

SAMPLE = ROOT / "examples" / "tiny-batch-local.yaml"
ROWS = 3000
PER_SHARD = 100
TIMEOUT_S = float(os.environ.get("DSI_E2E_READY_TIMEOUT", "900"))


class Run:
    """One batch resource in a namespace of its own, its operator and its files."""

    def __init__(self, kube: Any, kubectl: Any, ns: str, data: Path, op: OperatorProcess) -> None:
        self.kube, self.kubectl, self.ns, self.data, self.op = kube, kubectl, ns, data, op
        self.name = "tiny-batch"

    def status(self) -> dict[str, Any]:
        obj = self.kube.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.ns, BATCH_PLURAL, self.name
        )
        return dict(obj.get("status") or {})

    def rank_pods(self) -> list[Any]:
        return list(
            self.kube.core.list_namespaced_pod(
                self.ns, label_selector=f"deepspeed.ai/batch={self.name},deepspeed.ai/role=worker"
            ).items
        )

    def dump(self) -> str:
        pods = self.kubectl("get", "pods", "-o", "wide", "-n", self.ns, check=False).stdout
        rj = self.kubectl("get", "rayjob", "-o", "yaml", "-n", self.ns, check=False).stdout
        return f"status: {self.status()}\n{pods}\n{rj[-3000:]}\n{self.op.log_tail(40)}"


def _write_input(path: Path) -> set[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = set()
    with path.open("w") as fh:
        for i in range(ROWS):
            ids.add(f"row-{i}")
            fh.write(json.dumps({"id": f"row-{i}", "prompt": f"Item {i}: the quick brown fox"}))
            fh.write("\n")
    return ids


@pytest.fixture(scope="module")
def batch_run(
    cluster: Any, kube: Any, kubectl: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    from kubernetes import client

    if not kube.core.list_node(label_selector="dsi.local/process-node=true").items:
        pytest.fail("the local cluster has no process-backed nodes (DSI_PROCESS_NODES=0?)")
    install_crd(kubectl)
    ns = f"e2e-batch-{uuid.uuid4().hex[:6]}"
    # Not under /tmp: every process pod has a private /tmp; /var/tmp is the host's.
    data = Path("/var/tmp") / f"dsi-{ns}"
    kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    op = OperatorProcess(
        Path(cluster.kubeconfig), [ns], tmp_path_factory.mktemp("batch") / "operator.log"
    )
    op.start()
    try:
        yield Run(kube, kubectl, ns, data, op)
    finally:
        kubectl("delete", "dsbi", "--all", "-n", ns, "--wait=true", "--timeout=120s", check=False)
        op.stop()
        kubectl("delete", "namespace", ns, "--wait=false", check=False)
        shutil.rmtree(data, ignore_errors=True)


def _output_ids(out: Path) -> Counter[str]:
    seen: Counter[str] = Counter()
    for part in sorted(out.glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            row = json.loads(line)
            assert row["text"] is not None and row["completion_tokens"] >= 1, row
            seen[row["id"]] += 1
    return seen


def test_batch_run_writes_every_row_once_across_a_rank_pod_loss(batch_run: Run) -> None:
    r = batch_run
    ids = _write_input(r.data / "in.jsonl")
    body: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    body["spec"]["input"]["path"] = str(r.data / "in.jsonl")
    body["spec"]["output"]["path"] = str(r.data / "out")
    body["spec"]["rowsPerShard"] = PER_SHARD
    body["spec"]["ttlSecondsAfterFinished"] = 0
    body["spec"]["generation"]["maxTokens"] = 16
    t0 = time.monotonic()
    r.kubectl.apply(yaml.safe_dump(body), namespace=r.ns)

    def some_rows_done() -> dict[str, Any] | None:
        st = r.status()
        return st if st.get("rowsDone", 0) > 0 else None

    st = wait_for(some_rows_done, TIMEOUT_S, "rows done", r.dump, interval=0.5)
    started = time.monotonic() - t0
    assert st["phase"] == "Running" and st["rowsTotal"] == ROWS, st
    victim = next(p for p in r.rank_pods() if p.metadata.labels.get("deepspeed.ai/group") == "0")
    killed_at = st["rowsDone"]
    r.kube.core.delete_namespaced_pod(victim.metadata.name, r.ns, grace_period_seconds=0)
    print(
        f"\n[e2e-batch] first rows after {started:.0f}s; deleted {victim.metadata.name} "
        f"at {killed_at}/{ROWS} rows"
    )

    def finished() -> dict[str, Any] | None:
        st = r.status()
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for(finished, TIMEOUT_S, "the run finished", r.dump)
    took = time.monotonic() - t0
    print(
        f"[e2e-batch] {st['phase']} after {took:.0f}s: {st.get('progress')}, "
        f"{st.get('rowsPerSecond')} rows/s, group restarts {st.get('groupRestarts')}, "
        f"job retries {st.get('failedAttempts')}"
    )
    assert st["phase"] == "Succeeded", r.dump()
    assert killed_at < ROWS, "the pod was deleted after the run was done: nothing tested"
    # The lost rank cost its group a replacement (reported by the driver), not a row.
    assert st["groupRestarts"] >= 1, st
    assert (st["rowsDone"], st["rowsTotal"], st["progress"]) == (
        ROWS,
        ROWS,
        f"{ROWS}/{ROWS} (100%)",
    )
    assert {c["type"]: c["status"] for c in st["conditions"]} == {
        "Complete": "True",
        "Failed": "False",
    }
    out = r.data / "out"
    assert (out / "_SUCCESS").exists()
    seen = _output_ids(out)
    assert set(seen) == ids, f"missing {len(ids - set(seen))}, extra {len(set(seen) - ids)}"
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:5]
    reasons = {
        e.reason
        for e in r.kube.core.list_namespaced_event(
            r.ns, field_selector=f"involvedObject.name={r.name}"
        ).items
    }
    assert {"JobStarted", "JobSucceeded"} <= reasons, reasons
    # ttlSecondsAfterFinished 0: the Ray cluster (and its GPUs) goes with the job's end.
    wait_for(lambda: not r.rank_pods(), 120, "the job's pods deleted", r.dump)
