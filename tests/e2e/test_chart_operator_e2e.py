"""The operator as the Helm chart installs it, running as a pod (issue 31).

On the shared stack: the operator process that brought it up stops, and ``helm install`` of
``charts/dsi-operator`` puts the operator in a pod on a process-backed node, watching the
stack's namespace. That pod is an in-cluster client: its ServiceAccount token, the chart's
exact RBAC, the node's API relay, the chart's probes (``helm --wait`` waits for its readiness
probe). It must take the running resource over and do its job (a rank pod deleted: the group
restarts and serves again). Then, with requests flowing, ``helm upgrade`` replaces only the
operator's pod and ``helm uninstall`` removes it: no request fails and no group restarts.
The operator process is started again afterwards for the modules that follow.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dsi_localcluster import cluster as lc
from dsi_localcluster import helmop
from dsi_localcluster.kubelet.agent import LABEL as PROCESS_NODE_LABEL
from dsi_localcluster.wait import wait_for
from e2e_stack import Stack, background_load, group_restarts


class Chart:
    """The chart's release in a namespace of its own."""

    def __init__(self, cfg: Any, stack: Stack) -> None:
        self.cfg, self.stack = cfg, stack
        suffix = uuid.uuid4().hex[:6]
        self.namespace = f"dsi-op-{suffix}"
        # Its own name: the chart's cluster-scoped objects are named after the release, and a
        # `make run OPERATOR=helm` release may exist on a developer's cluster.
        self.release = f"dsi-operator-{suffix}"

    def install(self, **extra: Any) -> None:
        helmop.install(
            self.cfg, self.namespace, [self.stack.namespace], extra, release=self.release
        )

    def uninstall(self) -> None:
        helmop.uninstall(self.cfg, self.namespace, release=self.release)

    def pods(self) -> list[Any]:
        """The operator's pods (Terminating ones included)."""
        core, sel = self.stack.kube.core, helmop.pod_selector(self.release)
        return list(core.list_namespaced_pod(self.namespace, label_selector=sel).items)

    def log_tail(self) -> str:
        out = self.stack.kubectl(
            "logs", "-n", self.namespace, f"deploy/{self.release}", "--tail=40", check=False
        )
        return f"chart operator log:\n{out.stdout}{out.stderr}"


@pytest.fixture(scope="module")
def chart(cluster: Any, stack: Stack) -> Iterator[Chart]:
    """The stack's operator process stopped; afterwards the release is gone and the
    process runs again (whatever the tests did)."""
    c = Chart(lc.running_config(cluster.config), stack)
    stack.operator.stop()
    try:
        yield c
    finally:
        try:
            c.uninstall()
        except RuntimeError:
            pass  # already uninstalled by the last test
        stack.kubectl("delete", "namespace", c.namespace, "--wait=false", check=False)
        stack.operator.start()


def _pod_uids(stack: Stack) -> dict[tuple[int, int], str]:
    return {k: p.metadata.uid for k, p in stack.pods().items()}


def test_the_charts_operator_runs_as_a_pod_and_restarts_a_group(
    chart: Chart, stack: Stack, reference_tokens: list[int]
) -> None:
    chart.install()
    (pod,) = chart.pods()
    assert pod.status.phase == "Running", pod.status
    assert pod.spec.service_account_name == chart.release
    node = stack.kube.core.read_node(pod.spec.node_name)
    assert node.metadata.labels.get(PROCESS_NODE_LABEL) == "true"
    # It acts, with the chart's permissions: a rank pod deleted restarts its group.
    before, restarts = _pod_uids(stack), group_restarts(stack)
    victim = stack.pods()[(1, 0)]
    stack.kube.core.delete_namespaced_pod(victim.metadata.name, stack.namespace)
    dump = lambda: stack.dump() + "\n" + chart.log_tail()  # noqa: E731
    wait_for(lambda: group_restarts(stack).get(1, 0) > restarts[1], 180, "group 1 restarted", dump)
    stack.wait_ready()
    assert stack.wait_answers()["token_ids"] == reference_tokens
    after = _pod_uids(stack)
    assert after[(0, 0)] == before[(0, 0)] and after[(1, 0)] != before[(1, 0)], dump()
    assert group_restarts(stack)[0] == restarts[0], dump()


def test_helm_upgrade_replaces_only_the_operators_pod(chart: Chart, stack: Stack) -> None:
    (old,) = chart.pods()
    before, restarts = _pod_uids(stack), group_restarts(stack)
    with background_load(stack) as load:
        chart.install(logLevel="debug")  # a values change: the Deployment's template changes
        new = [p for p in chart.pods() if p.metadata.uid != old.metadata.uid]
        assert new and new[0].status.phase == "Running", chart.log_tail()
        wait_for(lambda: len(load.results) >= 5, 60, "requests during the upgrade")
    print(f"\n[e2e] helm upgrade; requests meanwhile: {load.summary()}")
    assert _pod_uids(stack) == before, stack.dump()
    assert group_restarts(stack) == restarts, stack.dump()
    assert load.ok_share() == 1.0, load.summary()


def test_helm_uninstall_leaves_the_resource_and_its_groups_serving(
    chart: Chart, stack: Stack
) -> None:
    before, restarts = _pod_uids(stack), group_restarts(stack)
    with background_load(stack) as load:
        chart.uninstall()
        wait_for(lambda: not chart.pods(), 60, "the operator's pod gone")
        since = len(load.results)
        wait_for(lambda: len(load.results) >= since + 5, 60, "requests after the uninstall")
    print(f"\n[e2e] helm uninstall; requests meanwhile: {load.summary()}")
    assert stack.dsi()["metadata"]["name"] == stack.name  # the CRDs, so the resource, stay
    assert _pod_uids(stack) == before, stack.dump()
    assert group_restarts(stack) == restarts, stack.dump()
    assert load.ok_share() == 1.0, load.summary()
