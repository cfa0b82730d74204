"""Scaling by whole groups (plain data): a scale-down keeps the removed groups as worker
groups at 0 replicas and switched-off Serve deployments, so KubeRay updates in place and
Serve replaces no replica of the groups that stay; the RayCluster replica patch."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from dsi_localcluster.builders import DSIWrapper
from dsi_operator.api import labels as L
from dsi_operator.api.spec import parse_spec
from dsi_operator.serving.render import render_children, serve_app_args, spec_hash_by_group
from dsi_operator.serving.scaling import cluster_names, cluster_patch, previous_capacity

UID = "00000000-0000-0000-0000-0000000000cc"


def _rs(replicas: int, capacity: int = 0, tp: int = 2) -> dict[str, Any]:
    spec = parse_spec(DSIWrapper("llm").tp(tp).replicas(replicas).spec())
    return render_children("llm", "ns", UID, spec, capacity)[0]


def _workers(rs: dict[str, Any]) -> list[dict[str, Any]]:
    return list(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"])


def _serve(rs: dict[str, Any]) -> dict[str, Any]:
    return dict(yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0])


def _without_counts(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What KubeRay compares (GenerateHashWithoutReplicasAndWorkersToDelete)."""
    return [
        {k: v for k, v in w.items() if k not in ("replicas", "minReplicas", "maxReplicas")}
        for w in workers
    ]


def test_never_scaled_down_renders_as_before() -> None:
    rs = _rs(3)
    assert L.ANNOTATION_GROUP_CAPACITY not in rs["metadata"]["annotations"]
    assert [d["user_config"]["active"] for d in _serve(rs)["deployments"][:3]] == [True] * 3
    assert all(w["replicas"] == 1 for w in _workers(rs))


def test_scale_down_keeps_removed_group_at_zero_and_in_place_for_kuberay() -> None:
    before, after = _rs(3), _rs(2, capacity=3)
    # Same worker groups apart from counts: KubeRay updates in place (no new RayCluster).
    assert _without_counts(_workers(before)) == _without_counts(_workers(after))
    counts = {
        w["groupName"]: (w["replicas"], w["minReplicas"], w["maxReplicas"]) for w in _workers(after)
    }
    assert counts == {
        "g0-r0": (1, 1, 1),
        "g0-r1": (1, 1, 1),
        "g1-r0": (1, 1, 1),
        "g1-r1": (1, 1, 1),
        "g2-r0": (0, 0, 0),
        "g2-r1": (0, 0, 0),
    }
    assert after["metadata"]["annotations"][L.ANNOTATION_GROUP_CAPACITY] == "3"


def test_scale_down_changes_no_serve_args_only_user_config() -> None:
    before, after = _serve(_rs(3)), _serve(_rs(2, capacity=3))
    # Serve's code version hashes args: equal args, no replica replaced.
    assert before["args"] == after["args"]
    assert after["deployments"] == [
        {"name": "group-0", "user_config": {"active": True, "tensor_parallel_size": 2}},
        {"name": "group-1", "user_config": {"active": True, "tensor_parallel_size": 2}},
        {"name": "group-2", "user_config": {"active": False, "tensor_parallel_size": 2}},
        {"name": "ingress", "user_config": {"active_groups": 2}},
    ]


def test_scale_back_up_within_capacity_is_in_place_and_keeps_overrides() -> None:
    down, up = _rs(2, capacity=3), _rs(3, capacity=3)
    assert _without_counts(_workers(down)) == _without_counts(_workers(up))
    assert all(w["replicas"] == 1 for w in _workers(up))
    serve = _serve(up)
    assert serve["args"] == _serve(down)["args"]
    # Kept once rendered: dropping user_config would leave group 2 switched off.
    assert serve["deployments"][2] == {
        "name": "group-2",
        "user_config": {"active": True, "tensor_parallel_size": 2},
    }
    assert up["metadata"]["annotations"][L.ANNOTATION_GROUP_CAPACITY] == "3"


def test_scale_up_past_capacity_appends_groups() -> None:
    down, up = _workers(_rs(1, capacity=2)), _workers(_rs(3, capacity=2))
    assert _without_counts(up)[: len(down)] == _without_counts(down)
    assert [w["groupName"] for w in up[len(down) :]] == ["g2-r0", "g2-r1"]


def test_group_hashes_do_not_depend_on_capacity() -> None:
    spec = parse_spec(DSIWrapper("llm").tp(2).replicas(2).spec())
    plain = _workers(render_children("llm", "ns", UID, spec)[0])
    wide = _workers(render_children("llm", "ns", UID, spec, 4)[0])
    key = L.ANNOTATION_GROUP_HASH
    assert [w["template"]["metadata"]["annotations"][key] for w in plain] == [
        w["template"]["metadata"]["annotations"][key] for w in wide[: len(plain)]
    ]
    assert set(spec_hash_by_group(spec)) == {0, 1}
    assert serve_app_args(spec, 4)["num_groups"] == 4


def test_previous_capacity_from_annotation_or_status() -> None:
    rs = {"metadata": {"annotations": {L.ANNOTATION_GROUP_CAPACITY: "5"}}}
    assert previous_capacity(rs, {"groups": [{}, {}]}) == 5
    assert previous_capacity({"metadata": {}}, {"groups": [{}, {}, {}]}) == 3
    assert previous_capacity(None, {}) == 0
    bad = {"metadata": {"annotations": {L.ANNOTATION_GROUP_CAPACITY: "x"}}}
    assert previous_capacity(bad, {}) == 0


def test_cluster_names_active_and_pending() -> None:
    rs = {
        "status": {
            "activeServiceStatus": {"rayClusterName": "a"},
            "pendingServiceStatus": {"rayClusterName": "b"},
        }
    }
    assert cluster_names(rs) == ["a", "b"]
    assert cluster_names({"status": {}}) == [] and cluster_names(None) == []


def test_cluster_patch_sets_counts_guarded_by_the_resource_version() -> None:
    rs = _rs(1, capacity=2)
    cluster = {
        "metadata": {"resourceVersion": "42"},
        "spec": {
            "headGroupSpec": rs["spec"]["rayClusterConfig"]["headGroupSpec"],
            "workerGroupSpecs": _workers(_rs(2)),
        },
    }
    ops = cluster_patch(cluster, rs)
    assert ops[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "42"}
    assert ops[1]["path"] == "/spec/workerGroupSpecs" and ops[1]["op"] == "replace"
    assert [w["replicas"] for w in ops[1]["value"]] == [1, 1, 0, 0]
    assert len(ops) == 2  # the head is the same
    in_step = {"metadata": {"resourceVersion": "43"}, "spec": rs["spec"]["rayClusterConfig"]}
    assert cluster_patch(in_step, rs) == []


def test_cluster_patch_carries_a_new_head_template() -> None:
    rs = _rs(1)
    head = copy.deepcopy(rs["spec"]["rayClusterConfig"]["headGroupSpec"])
    head["template"]["metadata"]["annotations"][L.ANNOTATION_HEAD_HASH] = "old"
    cluster = {"metadata": {"resourceVersion": "7"}, "spec": {**rs["spec"]["rayClusterConfig"]}}
    cluster["spec"]["headGroupSpec"] = head
    ops = cluster_patch(cluster, rs)
    assert [o["path"] for o in ops] == ["/metadata/resourceVersion", "/spec/headGroupSpec"]
