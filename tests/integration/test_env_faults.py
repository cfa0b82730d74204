"""Each failure-injection helper changes pod or node state the way a kubelet would, and the
state sticks (kwok does not revert it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from dsi_localcluster import faults
from dsi_localcluster.wait import node_state, pod_state, wait_for, wait_pod_gone

pytestmark = pytest.mark.integration

# Long enough for kwok to have acted on the changed object if it were going to.
SETTLE_S = 3.0


def _ready(conditions: Any, ctype: str = "Ready") -> str | None:
    for cond in conditions or []:
        if cond.type == ctype:
            return str(cond.status)
    return None


def test_fail_pod(kube: Any, namespace: str, running_pod: Any) -> None:
    running_pod("victim", restart_policy="Never")
    faults.fail_pod(kube.api, namespace, "victim", exit_code=137, reason="OOMKilled")
    time.sleep(SETTLE_S)
    pod = kube.core.read_namespaced_pod("victim", namespace)
    assert pod.status.phase == "Failed", pod_state(kube.core, namespace, "victim")
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (137, "OOMKilled")
    assert pod.status.container_statuses[0].ready is False
    assert _ready(pod.status.conditions) == "False"


def test_restart_container(kube: Any, namespace: str, running_pod: Any) -> None:
    running_pod("flaky")
    faults.restart_container(kube.api, namespace, "flaky", exit_code=3)
    faults.restart_container(kube.api, namespace, "flaky", exit_code=3)
    time.sleep(SETTLE_S)
    pod = kube.core.read_namespaced_pod("flaky", namespace)
    cs = pod.status.container_statuses[0]
    assert cs.restart_count == 2
    assert cs.last_state.terminated.exit_code == 3
    assert cs.state.running is not None
    assert pod.status.phase == "Running"


def test_evict_pod(kube: Any, namespace: str, running_pod: Any) -> None:
    running_pod("evictee")
    faults.evict_pod(kube.api, namespace, "evictee")
    wait_pod_gone(kube.core, namespace, "evictee", 30, "evicted pod to be deleted")


def test_stuck_terminating_and_release(kube: Any, namespace: str, running_pod: Any) -> None:
    running_pod("stuck")
    faults.stuck_terminating(kube.api, namespace, "stuck")
    time.sleep(SETTLE_S)
    pod = kube.core.read_namespaced_pod("stuck", namespace)
    assert pod.metadata.deletion_timestamp is not None
    assert faults.STUCK_FINALIZER in pod.metadata.finalizers
    faults.release_pod(kube.api, namespace, "stuck")
    wait_pod_gone(kube.core, namespace, "stuck", 30, "released pod to be deleted")


@pytest.fixture
def sacrificial_node(cluster: Any, kube: Any) -> Iterator[str]:
    """The last GPU node, restored to Ready afterwards (other tests may need it)."""
    node = cluster.gpu_nodes[-1]
    try:
        yield node
    finally:
        faults.set_node_ready(kube.api, node)
        wait_for(
            lambda: _ready(kube.core.read_node(node).status.conditions) == "True",
            60,
            f"{node} Ready again",
            dump=lambda: node_state(kube.core, node),
        )


def _taints(kube: Any, node: str) -> set[str]:
    return {t.key for t in kube.core.read_node(node).spec.taints or []}


def test_set_node_not_ready_sticks_and_taints(
    kube: Any, namespace: str, running_pod: Any, sacrificial_node: str
) -> None:
    node = sacrificial_node
    running_pod("on-node", node=node)
    faults.set_node_not_ready(kube.api, node)
    wait_for(
        lambda: "node.kubernetes.io/not-ready" in _taints(kube, node),
        30,
        "node lifecycle controller to taint the node not-ready",
        dump=lambda: node_state(kube.core, node),
    )

    time.sleep(SETTLE_S)
    assert _ready(kube.core.read_node(node).status.conditions) == "False"

    faults.set_node_ready(kube.api, node)
    wait_for(
        lambda: "node.kubernetes.io/not-ready" not in _taints(kube, node),
        30,
        "the not-ready taint to be removed",
        dump=lambda: node_state(kube.core, node),
    )
    assert _ready(kube.core.read_node(node).status.conditions) == "True"


def test_lose_node_goes_unknown(
    kube: Any, namespace: str, running_pod: Any, sacrificial_node: str
) -> None:
    node = sacrificial_node
    running_pod("on-lost-node", node=node)
    faults.lose_node(kube.api, node)
    # --node-monitor-grace-period is 40 s; the controller checks every 5 s.
    wait_for(
        lambda: _ready(kube.core.read_node(node).status.conditions) == "Unknown",
        90,
        "node lifecycle controller to mark the lost node Unknown",
        dump=lambda: node_state(kube.core, node),
    )
    wait_for(
        lambda: "node.kubernetes.io/unreachable" in _taints(kube, node),
        30,
        "the unreachable taint",
        dump=lambda: node_state(kube.core, node),
    )

    def pod_not_ready() -> bool:
        pod = kube.core.read_namespaced_pod("on-lost-node", namespace)
        return _ready(pod.status.conditions) == "False"

    wait_for(
        pod_not_ready,
        30,
        "pods on the lost node marked NotReady",
        dump=lambda: pod_state(kube.core, namespace, "on-lost-node"),
    )

    faults.set_node_ready(kube.api, node)
    wait_for(
        lambda: _ready(kube.core.read_node(node).status.conditions) == "True",
        30,
        "the node Ready again",
        dump=lambda: node_state(kube.core, node),
    )
    wait_for(
        lambda: "node.kubernetes.io/unreachable" not in _taints(kube, node),
        30,
        "the unreachable taint removed",
        dump=lambda: node_state(kube.core, node),
    )
    # kwok renews the Lease again, so the node stays Ready past the grace period's check.
    time.sleep(SETTLE_S)
    assert _ready(kube.core.read_node(node).status.conditions) == "True"
    # As its kubelet would once back, the node reports its running pod Ready again (kwok's
    # stages only ready Pending pods: without this, it would stay unready for good).
    assert not pod_not_ready(), pod_state(kube.core, namespace, "on-lost-node")
