"""Group-by-group rollouts on the real control plane (kwok GPU nodes, real KubeRay).

A worker image change replaces one group at a time inside the one RayCluster (never a second,
GPU-doubling one); `spec.rollout.paused` holds it; a head change replaces the head and every
group at once. Throughout, nothing counts as a failure."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from dsi_localcluster.harness import (
    dsi_manifest,
    formed_pods,
    get_dsi,
    ray_clusters,
    worker_pod_count,
    worker_pods,
)
from dsi_localcluster.wait import sampling, wait_for
from dsi_operator.api.labels import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration

TP = 2
OLD, NEW = "registry.example.com/dsi/worker:1", "registry.example.com/dsi/worker:2"


def _clusters(kube: Any, namespace: str, name: str) -> list[str]:
    return ray_clusters(kube.custom, namespace, name)


def _dump(kube: Any, namespace: str, name: str, op: Any) -> Callable[[], str]:
    def f() -> str:
        pods = {
            k: (p.metadata.name, p.status.phase, p.spec.containers[0].image)
            for k, p in worker_pods(kube.core, namespace, name).items()
        }
        st = json.dumps(get_dsi(kube.custom, namespace, name).get("status") or {})[:3000]
        return f"pods {pods}\nclusters {_clusters(kube, namespace, name)}\nstatus {st}\n" + (
            op.log_tail(60)
        )

    return f


def _patch(kube: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
    )


def _formed(kube: Any, namespace: str, name: str, replicas: int, dump: Any) -> dict[Any, Any]:
    return wait_for(
        lambda: formed_pods(kube.custom, kube.core, namespace, name, TP, replicas),
        180,
        f"{replicas} groups formed",
        dump,
    )


def _create_formed(
    kube: Any, namespace: str, body: dict[str, Any], replicas: int, op: Any
) -> tuple[Callable[[], str], dict[Any, str]]:
    """Create the DSI and wait until its groups formed: (dump, pod UIDs by (group, rank))."""
    name = body["metadata"]["name"]
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    dump = _dump(kube, namespace, name, op)
    pods = _formed(kube, namespace, name, replicas, dump)
    return dump, {k: p.metadata.uid for k, p in pods.items()}


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _rolled_out(kube: Any, namespace: str, name: str, replicas: int, image: str) -> Any:
    """The status once every group runs ``image`` again, formed, and the rollout says so."""

    def done() -> dict[str, Any] | None:
        pods = formed_pods(kube.custom, kube.core, namespace, name, TP, replicas)
        if pods is None or any(p.spec.containers[0].image != image for p in pods.values()):
            return None
        st = get_dsi(kube.custom, namespace, name)["status"]
        complete = _condition(st, "Progressing").get("reason") == "RolloutComplete"
        return (
            st
            if complete and (st.get("rollout") or {}).get("updated") == f"{replicas}/{replicas}"
            else None
        )

    return done


def _reasons(kube: Any, namespace: str, name: str) -> list[str]:
    events = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    return [e.reason for e in events]


class _Sampler:
    """Samples the worker pods while a rollout runs: groups unavailable at once, the peak
    number of pods (with and without the ones still Terminating), and when each group first
    ran the new image."""

    def __init__(self, kube: Any, namespace: str, name: str, replicas: int) -> None:
        self.kube, self.namespace, self.name, self.replicas = kube, namespace, name, replicas
        self.max_unavailable = 0
        self.peak_live = 0
        self.peak_all = 0
        self.first_new: dict[int, float] = {}

    def sample(self) -> None:
        live_count, all_count = worker_pod_count(self.kube.core, self.namespace, self.name)
        self.peak_all = max(self.peak_all, all_count)
        self.peak_live = max(self.peak_live, live_count)
        live = worker_pods(self.kube.core, self.namespace, self.name)
        unavailable = 0
        for g in range(self.replicas):
            mine = [p for (pg, _), p in live.items() if pg == g]
            if len(mine) != TP or not all(_ready(p) for p in mine):
                unavailable += 1
            if len(mine) == TP and all(p.spec.containers[0].image == NEW for p in mine):
                self.first_new.setdefault(g, time.monotonic())
        self.max_unavailable = max(self.max_unavailable, unavailable)


def _ready(pod: Any) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


def test_an_image_change_replaces_one_group_at_a_time_in_one_raycluster(
    kube: Any, namespace: str, operator: Any
) -> None:
    name, replicas = "roll", 3
    body = dsi_manifest(name, tp=TP, replicas=replicas, image=OLD, head={"image": OLD})
    dump, before = _create_formed(kube, namespace, body, replicas, operator)
    clusters = _clusters(kube, namespace, name)
    assert len(clusters) == 1, dump()
    head = _head_uid(kube, namespace, name)

    started = time.monotonic()
    sampler = _Sampler(kube, namespace, name, replicas)
    with sampling(sampler.sample, 0.2):
        _patch(kube, namespace, name, {"image": NEW})
        st = wait_for(_rolled_out(kube, namespace, name, replicas, NEW), 240, "rolled out", dump)
    took = time.monotonic() - started

    after = {k: p.metadata.uid for k, p in worker_pods(kube.core, namespace, name).items()}
    assert set(after.values()).isdisjoint(before.values()), dump()
    assert _clusters(kube, namespace, name) == clusters, "a second RayCluster appeared"
    assert _head_uid(kube, namespace, name) == head, "the head was replaced (its image is pinned)"
    assert sampler.max_unavailable <= 1, f"{sampler.max_unavailable} groups down at once"
    assert sampler.peak_live <= replicas * TP, sampler.peak_live
    order = sorted(sampler.first_new, key=lambda g: sampler.first_new[g])
    assert order == [0, 1, 2], order
    assert st["restarts"] == 0 and all(g["restarts"] == 0 for g in st["groups"]), dump()
    reasons = _reasons(kube, namespace, name)
    assert reasons.count("GroupRollout") >= replicas and "RolloutComplete" in reasons, reasons
    print(
        f"\nrollout of {replicas} groups x {TP} pods: {took:.1f} s "
        f"({took / replicas:.1f} s per group); groups unavailable at once: "
        f"{sampler.max_unavailable}; peak worker pods: {sampler.peak_live} live, "
        f"{sampler.peak_all} counting Terminating (spec: {replicas * TP})"
    )


def _head_uid(kube: Any, namespace: str, name: str) -> str | None:
    pods = kube.core.list_namespaced_pod(
        namespace, label_selector=f"deepspeed.ai/inference={name},deepspeed.ai/role=head"
    ).items
    live = [p for p in pods if p.metadata.deletion_timestamp is None]
    return live[0].metadata.uid if len(live) == 1 else None


def test_a_paused_rollout_holds_until_resumed(kube: Any, namespace: str, operator: Any) -> None:
    name, replicas = "paused", 2
    body = dsi_manifest(name, tp=TP, replicas=replicas, image=OLD, head={"image": OLD})
    dump, before = _create_formed(kube, namespace, body, replicas, operator)

    _patch(kube, namespace, name, {"image": NEW, "rollout": {"paused": True}})

    def paused() -> bool:
        st = get_dsi(kube.custom, namespace, name).get("status") or {}
        return _condition(st, "Progressing").get("reason") == "RolloutPaused"

    wait_for(paused, 60, "Progressing RolloutPaused", dump)
    time.sleep(5)  # long enough for several passes to replace a group, were it allowed
    now = {k: p.metadata.uid for k, p in worker_pods(kube.core, namespace, name).items()}
    assert now == before, "a group was replaced while the rollout was paused"

    _patch(kube, namespace, name, {"rollout": {"paused": False}})
    wait_for(_rolled_out(kube, namespace, name, replicas, NEW), 180, "rolled out", dump)
    # Applying the previous spec rolls back the same way.
    _patch(kube, namespace, name, {"image": OLD})
    st = wait_for(_rolled_out(kube, namespace, name, replicas, OLD), 180, "rolled back", dump)
    assert st["restarts"] == 0, dump()


def test_a_tp_change_replaces_one_group_at_a_time_in_the_same_raycluster(
    kube: Any, namespace: str, operator: Any
) -> None:
    name, replicas = "reshape", 2
    body = dsi_manifest(name, tp=TP, replicas=replicas, image=OLD, head={"image": OLD})
    dump, _ = _create_formed(kube, namespace, body, replicas, operator)
    clusters = _clusters(kube, namespace, name)
    mixed: list[list[int]] = []

    def sample() -> None:
        st = get_dsi(kube.custom, namespace, name).get("status") or {}
        ranks = [g.get("ranks") for g in st.get("groups") or []]
        if len(set(ranks)) > 1:
            mixed.append(ranks)

    with sampling(sample, 0.1):
        _patch(kube, namespace, name, {"tensorParallelSize": 2 * TP})

        def reshaped() -> dict[str, Any] | None:
            pods = formed_pods(kube.custom, kube.core, namespace, name, 2 * TP, replicas)
            st = get_dsi(kube.custom, namespace, name)["status"]
            complete = _condition(st, "Progressing").get("reason") == "RolloutComplete"
            return st if pods is not None and complete else None

        st = wait_for(reshaped, 240, f"groups of {2 * TP} ranks formed", dump)
    events = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    rolls = sorted(e.message for e in events if e.reason == "GroupRollout")
    assert len(rolls) == replicas, rolls
    assert not any("all groups at once" in m for m in rolls), rolls
    assert _clusters(kube, namespace, name) == clusters, "a second RayCluster appeared"
    assert st["restarts"] == 0 and [g["ranks"] for g in st["groups"]] == [2 * TP] * replicas
    # The status said each group's own size while they differed (if a sample caught it).
    assert all(sorted(m) == [TP, 2 * TP] for m in mixed), mixed
    serve = kube.custom.get_namespaced_custom_object(
        "ray.io", "v1", namespace, "rayservices", name
    )["spec"]["serveConfigV2"]
    assert serve.count(f"tensor_parallel_size: {2 * TP}") == replicas, serve


def test_a_head_change_replaces_the_head_and_every_group_at_once(
    kube: Any, namespace: str, operator: Any
) -> None:
    name, replicas = "headroll", 2
    body = dsi_manifest(name, tp=TP, replicas=replicas, image=OLD)
    dump, before = _create_formed(kube, namespace, body, replicas, operator)
    clusters = _clusters(kube, namespace, name)
    head = wait_for(lambda: _head_uid(kube, namespace, name), 60, "one head pod", dump)

    _patch(kube, namespace, name, {"image": NEW})  # the head runs spec.image too
    st = wait_for(_rolled_out(kube, namespace, name, replicas, NEW), 240, "rolled out", dump)
    new_head = wait_for(lambda: _head_uid(kube, namespace, name), 60, "one head pod", dump)
    assert new_head != head, "the head kept its old template"
    after = {k: p.metadata.uid for k, p in worker_pods(kube.core, namespace, name).items()}
    assert set(after.values()).isdisjoint(before.values()), dump()
    assert _clusters(kube, namespace, name) == clusters, "a second RayCluster appeared"
    assert st["restarts"] == 0, dump()


def test_a_serve_only_change_restarts_no_pod(kube: Any, namespace: str, operator: Any) -> None:
    name, replicas = "serveonly", 2
    body = dsi_manifest(name, tp=TP, replicas=replicas)
    dump, before = _create_formed(kube, namespace, body, replicas, operator)

    _patch(kube, namespace, name, {"serve": {"maxBatchSize": 3, "maxNewTokens": 77}})

    def applied() -> bool:
        rs = kube.custom.get_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayservices", name
        )
        return "max_new_tokens: 77" in rs["spec"]["serveConfigV2"]

    wait_for(applied, 60, "the Serve config carries the change", dump)
    time.sleep(5)  # several passes: none may replace a group
    now = {k: p.metadata.uid for k, p in worker_pods(kube.core, namespace, name).items()}
    assert now == before, dump()
    st = get_dsi(kube.custom, namespace, name)["status"]
    assert _condition(st, "Progressing").get("reason") == "RolloutComplete", dump()
    assert "GroupRollout" not in _reasons(kube, namespace, name)
