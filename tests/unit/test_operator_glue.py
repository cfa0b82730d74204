"""The operator's glue that needs no API server: watched objects -> plain data, the
coalescing scheduler, and the command line."""

from __future__ import annotations

import asyncio

import pytest
from dsi_operator.__main__ import _exact, parse_args
from dsi_operator.runtime.execute import AppliedChildren, ChildrenScope, children_for_pass
from dsi_operator.runtime.workqueue import Scheduler
from dsi_operator.serving.observe import (
    HEAD_GROUP,
    node_info,
    node_summary,
    pod_info,
    rayservice_view,
    select_cluster_pods,
)
from dsi_operator.serving.restart import PodInfo


def worker_pod(**status: object) -> dict[str, object]:
    return {
        "metadata": {
            "name": "x-g1-r0",
            "uid": "u1",
            "creationTimestamp": "2026-11-23T10:00:00Z",
            "labels": {
                "deepspeed.ai/inference": "x",
                "deepspeed.ai/group": "1",
                "deepspeed.ai/rank": "0",
                "deepspeed.ai/role": "worker",
                "ray.io/cluster": "x-abcde",
            },
            "annotations": {"deepspeed.ai/group-hash": "h1"},
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "ray-worker", "restartCount": 2}],
            **status,
        },
    }


def test_pod_info() -> None:
    got = pod_info(worker_pod())
    assert got is not None
    g, p = got
    assert g == 1 and p.rank == 0 and p.ready and p.restart_count == 2
    assert p.node_name == "n1" and p.cluster == "x-abcde" and p.group_hash == "h1"
    head = worker_pod()
    head["metadata"]["labels"]["deepspeed.ai/role"] = "head"  # type: ignore[index]
    head["metadata"]["annotations"] = {"deepspeed.ai/head-hash": "hh"}  # type: ignore[index]
    # The head is indexed too: the rollout reads which head template it came from.
    got = pod_info(head)
    assert got is not None and got[0] == HEAD_GROUP and got[1].group_hash == "hh"
    foreign = worker_pod()
    for k in ("deepspeed.ai/role", "deepspeed.ai/group", "deepspeed.ai/rank"):
        del foreign["metadata"]["labels"][k]  # type: ignore[index]
    assert pod_info(foreign) is None


def test_node_summary_and_readiness() -> None:
    node = {
        "metadata": {"name": "n1", "labels": {"a": "b"}, "annotations": {"hb": "1"}},
        "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"nvidia.com/gpu": "8"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "lastTransitionTime": "2026-11-23T10:00:00Z",
                    "lastHeartbeatTime": "2026-11-23T10:05:00Z",
                },
                {"type": "MemoryPressure", "status": "False"},
            ],
        },
    }
    s = node_summary(node)
    # heartbeats and annotations are left out, so they do not look like changes
    assert "annotations" not in s["metadata"]
    assert "lastHeartbeatTime" not in s["status"]["conditions"][0]
    info = node_info(s)
    assert not info.ready and info.since is not None


def test_rayservice_view() -> None:
    assert not rayservice_view(None).exists
    rs = {
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "message": "ok"}],
            "activeServiceStatus": {"rayClusterName": "a"},
            "pendingServiceStatus": {"rayClusterName": "b"},
        }
    }
    v = rayservice_view(rs)
    assert v.exists and v.ready and v.active_cluster == "a" and v.pending_cluster == "b"
    assert rayservice_view({"status": {"serviceStatus": "Running"}}).ready
    assert not rayservice_view({"status": {}}).ready


def test_select_cluster_pods_prefers_the_serving_cluster() -> None:
    pods = [PodInfo("a", "1", 0, cluster="a"), PodInfo("b", "2", 0, cluster="b")]
    v = rayservice_view(
        {
            "status": {
                "activeServiceStatus": {"rayClusterName": "a"},
                "pendingServiceStatus": {"rayClusterName": "b"},
            }
        }
    )
    assert [p.name for p in select_cluster_pods(pods, v)] == ["a"]
    v = rayservice_view({"status": {"pendingServiceStatus": {"rayClusterName": "b"}}})
    assert [p.name for p in select_cluster_pods(pods, v)] == ["b"]
    assert len(select_cluster_pods(pods, rayservice_view(None))) == 2


def test_scheduler_coalesces_and_serialises() -> None:
    calls: list[tuple[str, str]] = []
    running: set[tuple[str, str]] = set()

    async def fn(key: tuple[str, str], cause: str) -> None:
        assert key not in running, "two passes over one key at once"
        running.add(key)
        calls.append(key)
        await asyncio.sleep(0.05)
        running.discard(key)

    async def go() -> None:
        s = Scheduler(fn, workers=4)
        s.start()
        for _ in range(10):
            s.kick(("ns", "a"), "pod")
        s.kick(("ns", "b"), "pod")
        await asyncio.sleep(0.02)
        for _ in range(10):  # arrive while "a" runs: one more pass, not ten
            s.kick(("ns", "a"), "pod")
        await asyncio.sleep(0.3)
        await s.stop()

    asyncio.run(go())
    assert calls.count(("ns", "a")) == 2
    assert calls.count(("ns", "b")) == 1


def test_scheduler_runs_urgent_passes_first() -> None:
    # One worker, busy: 3 normal kicks queue up, then 2 urgent ones (new resources) and an
    # urgent kick of an already queued normal key: the urgent ones run first, once each.
    order: list[str] = []

    async def fn(key: tuple[str, str], cause: str) -> None:
        order.append(key[1])
        await asyncio.sleep(0.01)

    async def go() -> None:
        s = Scheduler(fn, workers=1)
        s.kick(("ns", "busy"), "dsi")
        s.start()
        await asyncio.sleep(0)
        for k in ("n1", "n2", "n3"):
            s.kick(("ns", k), "status")
        s.kick(("ns", "new1"), "dsi", urgent=True)
        s.kick(("ns", "n3"), "dsi", urgent=True)
        s.kick(("ns", "new2"), "dsi", urgent=True)
        await asyncio.sleep(0.3)
        await s.stop()

    asyncio.run(go())
    assert order == ["busy", "new1", "n3", "new2", "n1", "n2"]


def test_cli() -> None:
    a = parse_args([])
    assert a.namespace == [] and a.standalone and a.metrics_port == 0
    a = parse_args(
        [
            "--namespace",
            "x",
            "-n",
            "y",
            "--metrics-port",
            "9090",
            "--liveness",
            "http://0.0.0.0:8080/healthz",
        ]
    )
    assert a.namespace == ["x", "y"] and a.metrics_port == 9090
    assert parse_args(["--standalone"]).standalone is True
    assert parse_args(["--peering"]).standalone is False
    with pytest.raises(SystemExit):
        parse_args(["--standalone", "--peering"])  # not "the last one wins"
    assert _exact(["x", "y"]) and not _exact(["team-*"]) and not _exact([])


def test_every_group_restart_event_is_posted_once_per_incident() -> None:
    # Two restarts of one group can read the same ("rank 1 pod ... deleted (missing)"): both
    # are posted (the chaos soak once lost 4 of 148 to a repeat filter). The same incident
    # planned again is posted once; a process that finds it posted (409) does not retry;
    # another error is retried on the next pass.
    from dsi_operator.runtime.controller import Controller
    from dsi_operator.runtime.execute import incident_event_name
    from dsi_operator.serving.plan import EVENT_GROUP_RESTART, EventSpec, Plan
    from kubernetes.client.exceptions import ApiException

    server: dict[str, str] = {}  # the API server's Events by name
    calls: list[str | None] = []
    fail_next: list[int] = []

    class FakeKube:
        async def post_event(
            self, body: object, etype: str, reason: str, message: str, name: str | None = None
        ) -> None:
            calls.append(name)
            if fail_next:
                raise ApiException(status=fail_next.pop())
            if name is not None and name in server:
                raise ApiException(status=409)
            server[name or f"gen-{len(server)}"] = message

    same = "restarting group 1 (restart {n}): PodDeleted: rank 1 pod ... (missing)"

    def restart(n: int) -> Plan:
        ev = EventSpec("Warning", EVENT_GROUP_RESTART, same.format(n=n), incident=f"g1-r{n}")
        return Plan(status={}, patch=None, events=[ev])

    body = {"metadata": {"name": "x", "namespace": "ns", "uid": "0123456789abcdef"}}
    key = ("ns", "x")

    def post(ctrl: Controller, p: Plan) -> None:
        asyncio.run(ctrl.post_events(key, body, p))

    ctrl = Controller()
    ctrl.kube = FakeKube()  # type: ignore[assignment]
    for p in (restart(1), restart(1), restart(2), restart(2)):
        post(ctrl, p)
    assert sorted(server) == [
        incident_event_name("x", body["metadata"]["uid"], "g1-r1"),
        incident_event_name("x", body["metadata"]["uid"], "g1-r2"),
    ]
    assert len(calls) == 2 and server[calls[0] or ""] != server[calls[1] or ""]

    # A new process (the old one was killed after the status write) plans the incident
    # again: the API server says it exists, and it is not posted twice.
    fresh = Controller()
    fresh.kube = FakeKube()  # type: ignore[assignment]
    post(fresh, restart(2))
    post(fresh, restart(2))
    assert len(server) == 2 and len(calls) == 3

    # A failed post is retried while the incident is planned.
    fail_next.append(500)
    post(fresh, restart(3))
    post(fresh, restart(3))
    assert len(server) == 3 and calls[-1] == calls[-2]


def test_a_new_resource_gets_its_rayservice_alone_first() -> None:
    rs, svc, api = ({"kind": k} for k in ("RayService", "Service", "Service"))
    children = [rs, svc, api]
    # First pass of a new resource: the RayService only.
    assert children_for_pass(children, None, "u1", "h1", first=True, kept=False) == [rs]
    marker = AppliedChildren("u1", "h1", ChildrenScope.RAYSERVICE_ONLY)
    # The next pass at the same spec: the rest, not the RayService again.
    assert children_for_pass(children, marker, "u1", "h1", first=False, kept=False) == [svc, api]
    # The spec changed meanwhile, a group keeps an older template, or another object with
    # the name: everything.
    for applied, spec_hash, kept in ((marker, "h2", False), (marker, "h1", True)):
        assert children_for_pass(children, applied, "u1", spec_hash, first=False, kept=kept) == (
            children
        )
    assert children_for_pass(children, marker, "u2", "h1", first=False, kept=False) == children
    # A full apply recorded: everything (the pass only runs when something changed).
    full = AppliedChildren("u1", "h1")
    assert children_for_pass(children, full, "u1", "h1", first=False, kept=False) == children


def test_the_operator_process_watches_both_kinds() -> None:
    # The batch kind's handlers are registered only by importing their module: the entry
    # point must import it (a lint fix once dropped that "unused" import).
    import dsi_operator.__main__  # noqa: F401
    import kopf

    registry = kopf.get_default_registry()
    selectors = [h.selector for h in registry._watching.get_all_handlers() if h.selector]
    watched = {s.plural or s.any_name for s in selectors}
    assert {"deepspeedinferences", "deepspeedbatchinferences", "rayjobs"} <= watched


def test_in_cluster_server_follows_the_env_as_client_go_does() -> None:
    from dsi_operator.runtime.kube import in_cluster_server

    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster_server(env) == "https://10.96.0.1:443"
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert in_cluster_server(env) == "https://[fd00::1]:6443"
    # Outside a pod's env (or half of it): kopf's DNS name, which needs cluster DNS.
    assert in_cluster_server({}) == "https://kubernetes.default.svc"
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}).endswith(".svc")
