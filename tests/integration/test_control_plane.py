"""The control plane comes and goes under a running operator (issue 11 item 2).

KubeRay's operator stopped while a group needs a restart: the resource says so in
KubeRayAvailable, the restart is recorded once and finishes when KubeRay is back.
kube-apiserver and etcd restarted while a group restart is in flight: the operator
reconnects, finishes it, counts it once and touches no other group. Each test prints how
long the operator took once the component was back (figures, not assertions).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dsi_localcluster import faults
from dsi_localcluster.harness import dsi_manifest, formed_pods, get_dsi, worker_pods
from dsi_localcluster.wait import wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration

TP, REPLICAS = 2, 2


def _status(kube: Any, ns: str, name: str) -> dict[str, Any]:
    try:
        return dict(get_dsi(kube.custom, ns, name).get("status") or {})
    except Exception:  # the API server may be coming back
        return {}


def _cond(st: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((dict(c) for c in st.get("conditions") or [] if c["type"] == ctype), {})


def _dump(kube: Any, ns: str, name: str, op: Any) -> Callable[[], str]:
    def f() -> str:
        st = json.dumps(_status(kube, ns, name), indent=1)[:4000]
        return f"status: {st}\noperator log:\n{op.log_tail(40)}"

    return f


def _formed(kube: Any, ns: str, name: str, op: Any) -> dict[tuple[int, int], Any]:
    return wait_for(
        lambda: formed_pods(kube.custom, kube.core, ns, name, TP, REPLICAS),
        180,
        "both groups formed",
        _dump(kube, ns, name, op),
    )


def _apply_formed(
    kube: Any, ns: str, name: str, op: Any
) -> tuple[Callable[[], str], dict[tuple[int, int], Any], dict[tuple[int, int], str]]:
    """Create the resource and wait until both groups formed: (dump, pods, their UIDs)."""
    kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, dsi_manifest(name, tp=TP, replicas=REPLICAS)
    )
    pods = _formed(kube, ns, name, op)
    return _dump(kube, ns, name, op), pods, {k: p.metadata.uid for k, p in pods.items()}


def _replaced(
    kube: Any, ns: str, name: str, before: dict[tuple[int, int], str], group: int
) -> Callable[[], dict[tuple[int, int], Any] | None]:
    """Predicate: every pod of ``group`` has a new UID, all pods Running, restart done."""

    def done() -> dict[tuple[int, int], Any] | None:
        try:
            pods = worker_pods(kube.core, ns, name)
        except Exception:
            return None
        if len(pods) != len(before) or any(p.status.phase != "Running" for p in pods.values()):
            return None
        if any(pods[(group, r)].metadata.uid == before[(group, r)] for r in range(TP)):
            return None
        g = next(x for x in _status(kube, ns, name).get("groups", []) if x["index"] == group)
        return None if g.get("restartingSince") else pods

    return done


def _exactly_one_restart_of(
    kube: Any, ns: str, name: str, group: int, before: dict[tuple[int, int], str], after: Any
) -> None:
    st = _status(kube, ns, name)
    counts = {g["index"]: g.get("restarts", 0) for g in st["groups"]}
    assert counts == {group: 1, 1 - group: 0}, json.dumps(st, indent=1)[:3000]
    assert st.get("restarts") == 1
    other = 1 - group
    assert {r: after[(other, r)].metadata.uid for r in range(TP)} == {
        r: before[(other, r)] for r in range(TP)
    }
    evs = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    assert [e.reason for e in evs].count("GroupRestart") == 1, [e.message for e in evs]


@pytest.fixture
def restore() -> Iterator[list[str]]:
    """Components a test stopped; started again afterwards whatever happened."""
    stopped: list[str] = []
    yield stopped
    from dsi_localcluster import cluster as lc
    from dsi_localcluster import config as lcconfig
    from dsi_localcluster import statedir

    cfg = lc.running_config(lcconfig.ClusterConfig.from_env())
    for name in stopped:
        if name not in lc.running_processes(statedir.Paths(cfg.state_dir)):
            faults.start_component(name)


def test_kuberay_down_is_reported_and_a_restart_finishes_when_it_is_back(
    kube: Any, namespace: str, operator: Any, restore: list[str]
) -> None:
    name = "kr"
    dump, pods, before = _apply_formed(kube, namespace, name, operator)
    assert _cond(_status(kube, namespace, name), "KubeRayAvailable").get("reason") == "Running"

    t0 = time.monotonic()
    restore.append("kuberay-operator")
    faults.stop_component("kuberay-operator")
    down = wait_for(
        lambda: (lambda c: c if c.get("reason") == "ControllerNotRunning" else None)(
            _cond(_status(kube, namespace, name), "KubeRayAvailable")
        ),
        120,
        "KubeRayAvailable False (ControllerNotRunning)",
        dump,
    )
    print(f"\n[control-plane] KubeRay stopped -> condition False: {time.monotonic() - t0:.1f}s")
    assert down["status"] == "False" and "not running" in down["message"]

    # A failure while KubeRay is away: recorded and the old pods deleted now, replaced later.
    faults.fail_pod(kube.api, namespace, pods[(1, 1)].metadata.name, exit_code=137)
    wait_for(
        lambda: not any(g == 1 for g, _ in worker_pods(kube.core, namespace, name)),
        90,
        "group 1's pods deleted while KubeRay is down",
        dump,
    )
    g1 = _status(kube, namespace, name)["groups"][1]
    assert g1["restarts"] == 1 and g1.get("restartingSince"), g1

    t1 = time.monotonic()
    faults.start_component("kuberay-operator")
    after = wait_for(_replaced(kube, namespace, name, before, 1), 180, "group 1 replaced", dump)
    print(f"[control-plane] KubeRay back -> group replaced: {time.monotonic() - t1:.1f}s")
    wait_for(
        lambda: _cond(_status(kube, namespace, name), "KubeRayAvailable").get("status") == "True",
        60,
        "KubeRayAvailable True again",
        dump,
    )
    print(f"[control-plane] KubeRay back -> condition True: {time.monotonic() - t1:.1f}s")
    _exactly_one_restart_of(kube, namespace, name, 1, before, after)


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_api_restart_mid_group_restart_loses_nothing_and_repeats_nothing(
    component: str, kube: Any, namespace: str, operator: Any, restore: list[str]
) -> None:
    name = "cp"
    dump, pods, before = _apply_formed(kube, namespace, name, operator)

    faults.fail_pod(kube.api, namespace, pods[(0, 1)].metadata.name, exit_code=137)
    restore.append(component)
    faults.stop_component(component)
    time.sleep(5)
    faults.start_component(component)
    t_back = time.monotonic()
    after = wait_for(_replaced(kube, namespace, name, before, 0), 180, "group 0 replaced", dump)
    print(f"\n[control-plane] {component} back -> group replaced: {time.monotonic() - t_back:.1f}s")
    _exactly_one_restart_of(kube, namespace, name, 0, before, after)


def test_operator_killed_right_after_recording_a_restart_posts_its_event_when_back(
    kube: Any, namespace: str, operator: Any
) -> None:
    # The worst moment for a crash: the restart is in status, its Event and pod deletions
    # are not done. A failpoint makes the operator exit exactly there.
    name = "fp"
    dump, pods, before = _apply_formed(kube, namespace, name, operator)
    operator.stop()
    operator.extra_env = {"DSI_OPERATOR_FAILPOINTS": "after-restart-recorded"}
    operator.start()

    faults.fail_pod(kube.api, namespace, pods[(1, 0)].metadata.name, exit_code=137)
    wait_for(lambda: operator.proc.poll() is not None, 120, "the operator at its failpoint", dump)
    assert operator.proc.returncode == 137, dump()
    g1 = _status(kube, namespace, name)["groups"][1]
    assert g1["restarts"] == 1 and g1.get("restartingSince"), g1
    evs = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},reason=GroupRestart"
    ).items
    assert evs == [], [e.message for e in evs]

    operator.extra_env = {}
    t0 = time.monotonic()
    operator.start()
    after = wait_for(_replaced(kube, namespace, name, before, 1), 180, "group 1 replaced", dump)
    print(
        f"\n[control-plane] operator back after its failpoint -> group replaced: "
        f"{time.monotonic() - t0:.1f}s"
    )
    _exactly_one_restart_of(kube, namespace, name, 1, before, after)
    [ev] = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},reason=GroupRestart"
    ).items
    assert ev.metadata.name.endswith(".g1-restart-1") and "restart 1" in ev.message, ev
