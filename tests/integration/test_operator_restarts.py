"""Whole-group restarts on the real control plane: every trigger replaces exactly the hit
group's pods (new UIDs), leaves the other group alone (same UIDs), counts and posts an Event;
the budget; and an operator killed in the middle of a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from dsi_localcluster import faults
from dsi_localcluster.harness import all_running, dsi_manifest, formed_pods, get_dsi, worker_pods
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration


TP, REPLICAS = 2, 2


def status(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(get_dsi(kube.custom, namespace, name).get("status") or {})


def dump(kube: Any, namespace: str, name: str, op: Any) -> Callable[[], str]:
    def f() -> str:
        st = json.dumps(status(kube, namespace, name), indent=1)[:5000]
        pods = {
            k: (
                p.metadata.name,
                p.metadata.uid[:8],
                p.status.phase,
                p.spec.node_name,
                bool(p.metadata.deletion_timestamp),
            )
            for k, p in worker_pods(kube.core, namespace, name, live_only=False).items()
        }
        return f"status: {st}\npods: {pods}\noperator log:\n{op.log_tail(60)}"

    return f


def formed(
    kube: Any, namespace: str, name: str, op: Any, tp: int = TP, replicas: int = REPLICAS
) -> dict[tuple[int, int], Any]:
    """Wait until every group's membership is recorded; return the pods."""

    return wait_for(
        lambda: formed_pods(kube.custom, kube.core, namespace, name, tp, replicas),
        180,
        "all groups formed (members recorded)",
        dump(kube, namespace, name, op),
    )


def uids(pods: dict[tuple[int, int], Any]) -> dict[tuple[int, int], str]:
    return {k: p.metadata.uid for k, p in pods.items()}


def wait_group_replaced(
    kube: Any,
    namespace: str,
    name: str,
    op: Any,
    before: dict[tuple[int, int], str],
    group: int,
    timeout: float = 120,
) -> dict[tuple[int, int], Any]:
    """Wait until every pod of ``group`` has a new UID and Running, and the restart is done."""

    def done() -> dict[tuple[int, int], Any] | None:
        pods = worker_pods(kube.core, namespace, name)
        if not all_running(pods, TP, REPLICAS):
            return None
        if any(pods[(group, r)].metadata.uid == before[(group, r)] for r in range(TP)):
            return None
        st = status(kube, namespace, name)
        g = next(x for x in st.get("groups", []) if x["index"] == group)
        if g.get("restartingSince"):
            return None
        return pods

    return wait_for(done, timeout, f"group {group} replaced", dump(kube, namespace, name, op))


def restart_events(kube: Any, namespace: str, name: str) -> list[str]:
    evs = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    return [e.message for e in evs if e.reason == "GroupRestart"]


def inject(kind: str, kube: Any, namespace: str, pod: Any) -> None:
    name = pod.metadata.name
    if kind == "container_restart":
        faults.restart_container(kube.api, namespace, name)
    elif kind == "pod_failed":
        faults.fail_pod(kube.api, namespace, name, exit_code=137, reason="OOMKilled")
    elif kind == "pod_deleted":
        faults.delete_pod(kube.api, namespace, name)
    elif kind == "evicted":
        faults.evict_pod(kube.api, namespace, name)
    elif kind == "stuck_terminating":
        faults.stuck_terminating(kube.api, namespace, name)
    else:
        raise ValueError(kind)


# Trigger names the restart may carry. KubeRay deletes a Failed worker pod within
# milliseconds, so the operator may see the failure as the pod's deletion; an eviction is a
# deletion through the Eviction API; a member pod entering Terminating breaks the group at
# once (the stuck pod is force-deleted later).
TRIGGERS: dict[str, tuple[str, ...]] = {
    "container_restart": ("ContainerRestarted",),
    "pod_failed": ("PodFailed", "PodDeleted"),
    "pod_deleted": ("PodDeleted",),
    "evicted": ("PodEvicted", "PodDeleted"),
    "stuck_terminating": ("PodDeleted", "PodStuckTerminating"),
}


@pytest.mark.parametrize("kind", list(TRIGGERS))
def test_trigger_restarts_only_the_hit_group(
    kind: str, kube: Any, namespace: str, operator: Any
) -> None:
    name = "grp"
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dsi_manifest(name, tp=TP, replicas=REPLICAS)
    )
    pods = formed(kube, namespace, name, operator)
    before = uids(pods)
    inject(kind, kube, namespace, pods[(1, 1)])
    if kind == "stuck_terminating":
        # The fault holds the pod with a finalizer, so even the operator's force delete cannot
        # remove it, and KubeRay will not recreate that rank while it exists. The operator must
        # still restart the group at once: the rest of group 1 is replaced while it hangs.
        try:

            def others_replaced() -> bool:
                now = worker_pods(kube.core, namespace, name)
                p = now.get((1, 0))
                return p is not None and p.metadata.uid != before[(1, 0)]

            wait_for(
                others_replaced,
                60,
                "rank 0 of group 1 replaced while rank 1 hangs",
                dump(kube, namespace, name, operator),
            )
        finally:
            # the node/kubelet finally lets go; the restart can complete
            faults.release_pod(kube.api, namespace, pods[(1, 1)].metadata.name)
    after = wait_group_replaced(kube, namespace, name, operator, before, group=1)
    # group 0 untouched
    assert {k: v for k, v in uids(after).items() if k[0] == 0} == {
        k: v for k, v in before.items() if k[0] == 0
    }
    st = status(kube, namespace, name)
    assert st["restarts"] == 1, dump(kube, namespace, name, operator)()
    g1 = next(g for g in st["groups"] if g["index"] == 1)
    g0 = next(g for g in st["groups"] if g["index"] == 0)
    assert g1["restarts"] == 1 and g0["restarts"] == 0
    assert g1["lastRestartReason"].startswith(TRIGGERS[kind]), g1
    assert g1["lastRestartTime"]
    msgs = wait_for(lambda: restart_events(kube, namespace, name), 10, "GroupRestart Event")
    assert len(msgs) == 1, msgs
    assert "group 1" in msgs[0] and any(t in msgs[0] for t in TRIGGERS[kind])
    # the group forms again
    formed(kube, namespace, name, operator)


def test_node_not_ready_restarts_the_groups_on_it(kube: Any, namespace: str, operator: Any) -> None:
    name = "node"
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dsi_manifest(name, tp=TP, replicas=REPLICAS)
    )
    pods = formed(kube, namespace, name, operator)
    before = uids(pods)
    node = pods[(1, 1)].spec.node_name
    hit = {g for (g, _), p in pods.items() if p.spec.node_name == node}
    faults.set_node_not_ready(kube.api, node)
    try:
        for g in hit:
            after = wait_group_replaced(
                kube, namespace, name, operator, before, group=g, timeout=180
            )
        for k, v in uids(after).items():
            if k[0] not in hit:
                assert v == before[k], "a group without pods on the node was restarted"
        st = status(kube, namespace, name)
        for g in st["groups"]:
            if g["index"] in hit:
                assert g["lastRestartReason"].startswith("NodeNotReady"), g
                assert g["restarts"] == 1
        for (g, _), p in after.items():
            if g in hit:
                assert p.spec.node_name != node
    finally:
        faults.set_node_ready(kube.api, node)


def test_exhausted_budget_goes_failed(kube: Any, namespace: str, operator: Any) -> None:
    name = "budget"
    body = dsi_manifest(
        name,
        tp=TP,
        replicas=REPLICAS,
        restartPolicy={"maxRestarts": 1, "backoff": {"initialSeconds": 0}},
    )
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    pods = formed(kube, namespace, name, operator)
    faults.fail_pod(kube.api, namespace, pods[(0, 0)].metadata.name)
    pods = wait_group_replaced(kube, namespace, name, operator, uids(pods), group=0)
    pods = formed(kube, namespace, name, operator)
    faults.fail_pod(kube.api, namespace, pods[(0, 1)].metadata.name)

    def failed() -> dict[str, Any] | None:
        st = status(kube, namespace, name)
        return st if st.get("phase") == "Failed" else None

    st = wait_for(failed, 60, "phase Failed", dump(kube, namespace, name, operator))
    assert "maxRestarts 1" in st["message"] and "group 0" in st["message"]
    assert st["failedReason"] == st["message"]
    assert st["restarts"] == 1
    evs = kube.core.list_namespaced_event(namespace).items
    assert any(e.reason == "RestartBudgetExhausted" for e in evs)
    # Failed is final for this generation: no further restarts happen
    time.sleep(3)
    assert status(kube, namespace, name)["restarts"] == 1


def test_operator_killed_mid_restart_resumes_without_double_restart(
    kube: Any, namespace: str, operator: Any
) -> None:
    name = "resume"
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dsi_manifest(name, tp=TP, replicas=REPLICAS)
    )
    pods = formed(kube, namespace, name, operator)
    before = uids(pods)

    # 1. The operator dies right after recording a restart and before deleting any pod:
    #    reproduce exactly that state with the operator stopped.
    operator.kill()
    st = status(kube, namespace, name)
    groups = st["groups"]
    for g in groups:
        if g["index"] == 1:
            g.update(
                restarts=1,
                restartingSince=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                restartTrigger="PodFailed",
                restartPods=[before[(1, r)] for r in range(TP)],
                restartTimes=[datetime.now(UTC).isoformat().replace("+00:00", "Z")],
                lastRestartReason="PodFailed: injected by the test",
                members=None,
            )
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": {"groups": groups, "restarts": 1}}
    )
    operator.start()
    after = wait_group_replaced(kube, namespace, name, operator, before, group=1)
    assert {k: v for k, v in uids(after).items() if k[0] == 0} == {
        k: v for k, v in before.items() if k[0] == 0
    }
    st = status(kube, namespace, name)
    assert st["restarts"] == 1, "the resumed restart must not be counted again"
    assert next(g for g in st["groups"] if g["index"] == 1)["restarts"] == 1

    # 2. A real failure, and the operator is SIGKILLed the moment the restart is recorded
    #    in status (before or while it deletes the pods): deterministic, not a sleep.
    pods = formed(kube, namespace, name, operator)
    before = uids(pods)
    faults.fail_pod(kube.api, namespace, pods[(0, 1)].metadata.name)

    def recorded() -> bool:
        g0 = next(g for g in status(kube, namespace, name)["groups"] if g["index"] == 0)
        return bool(g0.get("restartingSince"))

    wait_for(recorded, 60, "the restart of group 0 recorded", interval=0.05)
    operator.kill()
    operator.start()
    wait_group_replaced(kube, namespace, name, operator, before, group=0)
    st = status(kube, namespace, name)
    # Exactly one more: 1 means the recorded restart was lost, 3 that it was done twice.
    assert st["restarts"] == 2, dump(kube, namespace, name, operator)()
    assert next(g for g in st["groups"] if g["index"] == 0)["restarts"] == 1
    assert next(g for g in st["groups"] if g["index"] == 1)["restarts"] == 1
    # One Event per recorded restart, whoever posts it: case 1 was staged in status by the
    # test, and the restarted operator posts its Event; case 2's kill may land before or
    # after the Event, which is posted once either way.
    evs = sorted(restart_events(kube, namespace, name))
    assert len(evs) == 2 and evs[0].startswith("restarting group 0 (restart 1)"), evs
    assert evs[1] == "restarting group 1 (restart 1): PodFailed: injected by the test", evs


@pytest.mark.parametrize("kind", ["pod_failed", "pod_deleted"])
def test_member_lost_while_the_operator_is_down_is_one_restart(
    kind: str, kube: Any, namespace: str, operator: Any
) -> None:
    """A member that fails (or is deleted) and is replaced by KubeRay while no operator runs
    is still a failure of its group: the next operator finds the recorded member gone, acts
    at once, and counts it once."""
    name = "away"
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dsi_manifest(name, tp=TP, replicas=REPLICAS)
    )
    pods = formed(kube, namespace, name, operator)
    before = uids(pods)
    operator.kill()
    inject(kind, kube, namespace, pods[(1, 1)])

    def replaced_by_kuberay() -> bool:
        now = worker_pods(kube.core, namespace, name, live_only=False)
        p = now.get((1, 1))
        gone = all(q.metadata.uid != before[(1, 1)] for q in now.values())
        return gone and p is not None and p.status.phase == "Running"

    wait_for(replaced_by_kuberay, 60, "KubeRay replaced the lost pod", interval=0.1)
    started = time.monotonic()
    operator.start()

    def recorded() -> bool:
        g1 = next(g for g in status(kube, namespace, name)["groups"] if g["index"] == 1)
        return g1.get("restarts", 0) == 1

    # Generous for a loaded CI machine, far below the 60 s stall this guards against.
    wait_for(recorded, 30, "the restart recorded", dump(kube, namespace, name, operator), 0.1)
    took = time.monotonic() - started
    after = wait_group_replaced(kube, namespace, name, operator, before, group=1)
    assert {k: v for k, v in uids(after).items() if k[0] == 0} == {
        k: v for k, v in before.items() if k[0] == 0
    }
    formed(kube, namespace, name, operator)
    time.sleep(2)  # a second restart of the same loss would show here
    st = status(kube, namespace, name)
    assert st["restarts"] == 1, dump(kube, namespace, name, operator)()
    g1 = next(g for g in st["groups"] if g["index"] == 1)
    assert g1["restarts"] == 1 and g1["lastRestartReason"].startswith("PodDeleted"), g1
    assert next(g for g in st["groups"] if g["index"] == 0)["restarts"] == 0
    msgs = wait_for(lambda: restart_events(kube, namespace, name), 10, "GroupRestart Event")
    assert len(msgs) == 1 and "group 1" in msgs[0], msgs
    print(f"restart recorded {took:.1f}s after the operator started")


def test_pod_lost_after_a_restart_ended_and_before_the_group_formed_is_counted(
    kube: Any, namespace: str, operator: Any
) -> None:
    """The operator died right after recording a restart's end, before the new pods were
    Ready (no members yet, the new pods in formingPods); one of them fails and KubeRay
    replaces it while no operator runs. With the operator up, the Failed pod is a PodFailed
    restart; it must be one here (PodDeleted, counted once)."""
    name = "window"
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dsi_manifest(name, tp=TP, replicas=REPLICAS)
    )
    pods = formed(kube, namespace, name, operator)
    operator.kill()
    groups = status(kube, namespace, name)["groups"]
    for g in groups:
        if g["index"] == 1:
            # What the operator writes at a restart's end: no members, the new pods recorded.
            g.update(members=None, formedAt=None, formingSince=None, formingPods=g["members"])
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": {"groups": groups}}
    )
    lost = pods[(1, 1)].metadata.uid
    inject("pod_failed", kube, namespace, pods[(1, 1)])

    def replaced_by_kuberay() -> bool:
        now = worker_pods(kube.core, namespace, name, live_only=False)
        p = now.get((1, 1))
        gone = all(q.metadata.uid != lost for q in now.values())
        return gone and p is not None and p.status.phase == "Running"

    wait_for(replaced_by_kuberay, 60, "KubeRay replaced the lost pod", interval=0.1)
    operator.start()

    def counted() -> bool:
        g1 = next(g for g in status(kube, namespace, name)["groups"] if g["index"] == 1)
        return g1.get("restarts", 0) == 1

    wait_for(counted, 30, "the lost pod counted", dump(kube, namespace, name, operator))
    g1 = next(g for g in status(kube, namespace, name)["groups"] if g["index"] == 1)
    assert g1["lastRestartReason"].startswith("PodDeleted: rank 1 pod of the forming group"), g1
    msgs = wait_for(lambda: restart_events(kube, namespace, name), 10, "GroupRestart Event")
    assert len(msgs) == 1 and "group 1" in msgs[0], msgs
