"""The whole stack on process-backed nodes: operator -> KubeRay -> Ray -> DeepSpeed -> HTTP.

One resource is brought up per module (minutes on 2 cores) and shared by its tests, which
run in file order: each failure test leaves the resource Ready again for the next one.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_localcluster.builders import FAST_RESTART_POLICY
from e2e_stack import (
    MAX_TOKENS,
    PROMPT,
    SAMPLE,
    OperatorProcess,
    Stack,
    install_crd,
)

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/e2e runs the real stack: mark it so."""
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def _need_process_nodes(kube: Any) -> None:
    nodes = kube.core.list_node(label_selector="dsi.local/process-node=true").items
    if nodes:
        return
    if os.geteuid() != 0:
        pytest.skip("process-backed nodes need root (network namespaces); not root here")
    pytest.fail("the local cluster has no process-backed nodes (DSI_PROCESS_NODES=0?)")


def _manifest() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    policy = dict(FAST_RESTART_POLICY)
    policy["formationTimeoutSeconds"] = 600
    policy["maxRestarts"] = 20
    body["spec"]["restartPolicy"] = policy
    return body


@contextmanager
def served(
    cluster: Any,
    kube: Any,
    kubectl: Any,
    log_dir: Path,
    manifest: dict[str, Any],
) -> Iterator[Stack]:
    """``manifest`` applied by a fresh operator in a namespace of its own, Ready and
    answering; deleted (and the namespace with it) afterwards."""
    from kubernetes import client

    _need_process_nodes(kube)
    install_crd(kubectl)
    ns = f"e2e-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    op = OperatorProcess(Path(cluster.kubeconfig), [ns], log_dir / "operator.log")
    op.start()
    name = manifest["metadata"]["name"]
    st = Stack(kube, kubectl, ns, op, name=name, log_dir=log_dir)
    try:
        kubectl.apply(yaml.safe_dump(manifest), namespace=ns)
        t0 = time.monotonic()
        st.wait_ready()
        st.endpoint = st.dsi()["status"]["endpoint"].rstrip("/")
        st.wait_answers()
        print(f"\n[e2e] {name} Ready and answering after {time.monotonic() - t0:.0f}s")
        yield st
    finally:
        kubectl("delete", "dsi", name, "-n", ns, "--wait=true", "--timeout=120s", check=False)
        op.stop()
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def stack(
    cluster: Any, kube: Any, kubectl: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The sample resource (2 groups x 2 one-rank pods), Ready and answering."""
    with served(cluster, kube, kubectl, tmp_path_factory.mktemp("e2e"), _manifest()) as st:
        yield st


@pytest.fixture(scope="module")
def multi_rank_stack(
    cluster: Any, kube: Any, kubectl: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One group of TP 4 as 2 pods x 2 ranks (ranksPerPod 2), Ready and answering."""
    body = _manifest()
    body["metadata"]["name"] = "tiny-x2"
    body["spec"].update(tensorParallelSize=4, ranksPerPod=2, replicas=1)
    with served(cluster, kube, kubectl, tmp_path_factory.mktemp("e2e-x2"), body) as st:
        yield st


@pytest.fixture(scope="module")
def scaled_stack(
    cluster: Any, kube: Any, kubectl: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A 2-group resource of its own for scaling (the other stacks must keep their size)."""
    body = _manifest()
    body["metadata"]["name"] = "tiny-scaled"
    with served(cluster, kube, kubectl, tmp_path_factory.mktemp("e2e-scale"), body) as st:
        yield st


@pytest.fixture(scope="module")
def reference_tokens() -> list[int]:
    """Greedy tokens of the unsharded tiny model for PROMPT, computed in this process."""
    from dsi_worker import tiny_model
    from dsi_worker.engine import DistEnv, GenRequest, RankEngine, SamplingParams
    from dsi_worker.model_files import load_tokenizer

    path = str(tiny_model.build())
    tok = load_tokenizer(path)
    # The same encoding as the ingress (special tokens included).
    ids = tuple(tok(PROMPT, add_special_tokens=True)["input_ids"])
    engine = RankEngine(path, dtype="float32", device="cpu", dist_env=DistEnv())
    engine.start()
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0)
    (result,) = engine.generate([GenRequest(ids, params)])
    return list(result.token_ids)
