"""The whole stack on process-backed nodes: operator -> KubeRay -> Ray -> DeepSpeed -> HTTP.

Bringing a resource up costs minutes on 2 cores, so one served sample (``stack``) is shared by
every module that can use it: they run last, in ``SHARED_STACK_ORDER``, and each test leaves it
Ready again for the next. Modules that need another shape (TP 4 as 2 pods x 2 ranks, a batch
run) bring up their own first, and tear it down before the shared one starts. The shared
stack's teardown checks that it left no process, network namespace or Ray session behind.
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


#: The modules on the shared ``stack``, in the order they run (after every other e2e
#: module): the faults first, then scaling and rollouts (they end at TP 1), and the head's loss last
#: (it restarts every group, and pods of a new Ray cluster may still be settling).
SHARED_STACK_ORDER = (
    "test_serving.py",
    "test_chaos_e2e.py",
    "test_scaling_e2e.py",
    "test_head_loss_e2e.py",
)


def _e2e_rank(item: pytest.Item) -> int:
    """Where a test runs: non-e2e first, then own-stack e2e modules, then the shared stack's."""
    path = Path(str(item.fspath))
    if _HERE not in path.parents:
        return -1
    if path.name in SHARED_STACK_ORDER:
        return 1 + SHARED_STACK_ORDER.index(path.name)
    return 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/e2e runs the real stack: mark it so, and run the modules of
    the shared stack last and in their order (the sort is stable: file order otherwise)."""
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
    items.sort(key=_e2e_rank)


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
    # Every fault of the session lands on the one shared stack (head loss alone restarts
    # both groups, sometimes twice): a budget that no sequence of them can spend.
    policy["maxRestarts"] = 100
    policy["maxReforms"] = 100
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


@pytest.fixture(scope="session")
def stack(
    cluster: Any, kube: Any, kubectl: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The sample resource (2 groups x 2 one-rank pods), Ready and answering; shared by the
    modules in ``SHARED_STACK_ORDER``. Torn down at the end, then checked for leftovers."""
    from dsi_localcluster import cluster as lc
    from dsi_localcluster.leftovers import wait_gone

    with served(cluster, kube, kubectl, tmp_path_factory.mktemp("e2e"), _manifest()) as st:
        yield st
        # The pods still there (the head's included) must go too.
        st.seen_uids |= {p.metadata.uid for p in kube.core.list_namespaced_pod(st.namespace).items}
    left = wait_gone(lc.running_config(cluster.config).state_dir, st.seen_uids)
    assert not any(left.values()), f"the shared stack left behind: {left}"


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


@pytest.fixture(scope="session")
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
