"""Several ranks per pod (spec.ranksPerPod): validation, rendering, pod identity, restarts,
status and preflight, on plain data; and the worker's half of the contract (per-process
RANK/LOCAL_RANK, ready-lock files, pinning checks, CUDA device choice)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from dsi_localcluster.builders import DSIWrapper
from dsi_operator.api import labels as L
from dsi_operator.api.spec import parse_spec
from dsi_operator.serving.observe import pod_info
from dsi_operator.serving.plan import Observed, plan, safe_parse
from dsi_operator.serving.preflight import GPUNeeds, capacity_condition
from dsi_operator.serving.render import (
    READY_FILE,
    ready_files,
    render_children,
    serve_app_args,
    serve_config,
)
from dsi_operator.serving.restart import NodeInfo, Restart
from dsi_operator.serving.status import RayServiceView
from dsi_worker.config import parse_args
from dsi_worker.engine import cuda_index
from dsi_worker.group import pinning_errors, process_env, rank_env
from dsi_worker.readiness import ready_file
from pydantic import ValidationError

NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
UID = "00000000-0000-0000-0000-0000000000aa"


def _spec(tp: int, k: int, **kw: Any) -> dict[str, Any]:
    return DSIWrapper("llm").tp(tp).replicas(kw.pop("replicas", 1)).set(ranksPerPod=k, **kw).spec()


def _pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod bodies as KubeRay would create them from the rendered worker groups."""
    rs = render_children("llm", "ns", UID, parse_spec(spec))[0]
    out = []
    for i, w in enumerate(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]):
        meta = dict(w["template"]["metadata"])
        meta.update(name=f"llm-{w['groupName']}-x", uid=f"uid-{i}")
        out.append(
            {
                "metadata": meta,
                "spec": {"nodeName": "n0"},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
            }
        )
    return out


# --- spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp,k", [(4, 3), (2, 4), (6, 4)])
def test_tp_not_a_multiple_of_ranks_per_pod_is_refused_naming_both(tp: int, k: int) -> None:
    with pytest.raises(ValidationError, match="multiple of ranksPerPod") as e:
        parse_spec(_spec(tp, k))
    assert f"tensorParallelSize {tp} and ranksPerPod {k}" in str(e.value)


def test_default_is_one_rank_per_pod() -> None:
    s = parse_spec(DSIWrapper("llm").tp(4).spec())
    assert (s.ranks_per_pod, s.pods_per_group) == (1, 4)
    assert "ranks_per_pod" not in serve_app_args(s)  # k=1 serve configs stay as they were


# --- rendering -------------------------------------------------------------------------------


def test_pod_requests_its_ranks_times_the_per_rank_resources() -> None:
    spec = _spec(4, 2, resources={"gpus": 2, "cpu": "7500m", "memory": "60Gi"})
    spec["gpu"] = {"sharedMemorySize": "8Gi"}
    rs = render_children("llm", "ns", UID, parse_spec(spec))[0]
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [w["groupName"] for w in workers] == ["g0-r0", "g0-r2"]
    for w in workers:
        pod = w["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits == {"cpu": "15000m", "memory": "120Gi", "nvidia.com/gpu": "4"}
        assert w["rayStartParams"]["num-gpus"] == "4"
        (shm,) = [v for v in pod["volumes"] if v["name"] == L.SHM_VOLUME]
        assert shm["emptyDir"]["sizeLimit"] == "16Gi"


def test_readiness_probe_checks_the_lock_file_of_every_rank_the_worker_takes() -> None:
    rs = render_children("llm", "ns", UID, parse_spec(_spec(8, 4)))[0]
    probe = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][
        0
    ]["readinessProbe"]["exec"]["command"][-1]
    env = {"DSI_READY_FILE": READY_FILE, "LOCAL_WORLD_SIZE": "4"}
    taken = [ready_file({**env, "LOCAL_RANK": str(i)}) for i in range(4)]
    assert taken == ready_files(4)
    assert len(set(taken)) == 4
    for f in taken:
        assert f in probe
    # One rank per pod: the file the pod always had.
    assert ready_file({"DSI_READY_FILE": READY_FILE}) == READY_FILE == ready_files(1)[0]


def test_each_groups_user_config_carries_its_shape_and_the_worker_accepts_it() -> None:
    config = serve_config(parse_spec(_spec(4, 2)))
    (app,) = config["applications"]
    assert "ranks_per_pod" not in app["args"] and "tensor_parallel_size" not in app["args"]
    group = next(d for d in app["deployments"] if d["name"] == "group-0")["user_config"]
    assert group == {"active": True, "tensor_parallel_size": 4, "ranks_per_pod": 2}
    assert parse_args({**app["args"], "tensor_parallel_size": 4, "ranks_per_pod": 2})
    with pytest.raises(ValueError, match="multiple of ranks_per_pod"):
        parse_args({**app["args"], "tensor_parallel_size": 4, "ranks_per_pod": 3})


# --- pod identity, restarts, status ----------------------------------------------------------


def test_pods_are_identified_by_their_index_in_the_group() -> None:
    infos = [pod_info(p) for p in _pods(_spec(16, 8, replicas=2))]
    assert [(g, i.rank) for g, i in infos if i] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # type: ignore[misc]


def _observed(spec: dict[str, Any], bodies: list[dict[str, Any]], status: Any = None) -> Observed:
    pods: dict[int, list[Any]] = {}
    for b in bodies:
        gi = pod_info(b)
        assert gi is not None
        pods.setdefault(gi[0], []).append(gi[1])
    parsed, invalid = safe_parse(spec)
    return Observed(
        name="llm",
        namespace="ns",
        generation=1,
        spec=parsed,
        invalid=invalid,
        status=status or {},
        now=NOW,
        pods=pods,
        nodes={"n0": NodeInfo("n0")},
        children_created=True,
        rayservice=RayServiceView(exists=True, ready=True),
    )


def test_a_failed_multi_rank_pod_restarts_its_whole_group_only() -> None:
    spec = _spec(4, 2, replicas=2)
    bodies = _pods(spec)
    # Two passes: the first records the formed groups (members = pod UIDs).
    status = plan(_observed(spec, bodies)).status
    status = plan(_observed(spec, bodies, status)).status
    assert [g["members"] for g in status["groups"]] == [["uid-0", "uid-1"], ["uid-2", "uid-3"]]
    g0 = status["groups"][0]
    assert (g0["ranks"], g0["readyRanks"], g0["pods"], g0["readyPods"]) == (4, 4, 2, 2)
    assert status["phase"] == "Ready"

    bodies[1]["status"] = {"phase": "Failed", "reason": "Error"}
    p = plan(_observed(spec, bodies, status))
    assert len(p.restarts) == 1
    (r,) = p.restarts
    assert isinstance(r, Restart) and r.group == 0
    assert set(r.pods) == {"uid-0", "uid-1"}  # both pods of group 0, none of group 1
    g0 = p.status["groups"][0]
    assert (g0["readyRanks"], g0["readyPods"]) == (2, 1)


# --- preflight -------------------------------------------------------------------------------


def _gpu_node(gpus: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"n{gpus}", "labels": {}},
        "spec": {},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def test_capacity_refuses_a_pod_larger_than_any_node() -> None:
    c = capacity_condition([_gpu_node(4), _gpu_node(4)], GPUNeeds(tp=8, ranks_per_pod=8))
    assert (c.status, c.reason) == ("False", "PodDoesNotFitANode")
    assert "needs 8 nvidia.com/gpu on one node" in c.message
    assert "largest matching node has 4" in c.message
    assert "ranksPerPod to at most 4" in c.message


def test_capacity_counts_whole_pods_per_node() -> None:
    # Two pods of 4 GPUs fit on one 8-GPU node; a 6-GPU node holds one.
    ok = capacity_condition([_gpu_node(8)], GPUNeeds(tp=8, ranks_per_pod=4))
    assert (ok.status, ok.reason) == ("True", "Sufficient")
    short = capacity_condition([_gpu_node(6), _gpu_node(2)], GPUNeeds(tp=8, ranks_per_pod=4))
    assert (short.status, short.reason) == ("False", "Insufficient")
    assert "1 rank pod(s); one group needs 2 rank pod(s) x 4" in short.message


def test_capacity_suggests_one_pod_per_group_when_a_node_holds_it() -> None:
    c = capacity_condition([_gpu_node(8)], GPUNeeds(tp=8))
    assert c.status == "True"
    assert "ranksPerPod 8 would keep each group in one pod" in c.message
    assert "ranksPerPod" not in capacity_condition([_gpu_node(4)] * 2, GPUNeeds(tp=8)).message


# --- worker side -----------------------------------------------------------------------------


def test_each_rank_process_gets_its_own_rank_and_local_rank() -> None:
    args = parse_args({"tensor_parallel_size": 4, "ranks_per_pod": 2})
    assert [process_env(args, r) for r in range(4)] == [
        {"RANK": str(r), "LOCAL_RANK": str(r % 2)} for r in range(4)
    ]
    assert process_env(parse_args({"tensor_parallel_size": 4}), 3) == {}
    # Local mode gives what the pod and the group give together.
    env = rank_env(args, 0, 3)
    assert (env["RANK"], env["LOCAL_RANK"], env["NODE_RANK"]) == ("3", "1", "1")
    assert env["LOCAL_WORLD_SIZE"] == env["LOCAL_SIZE"] == "2"


def test_pinning_check_catches_a_rank_on_the_wrong_pod() -> None:
    good = [{"rank": r, "dsi_group": "0", "pod_index": str(r // 2)} for r in range(4)]
    assert pinning_errors(0, good, 2) == []
    bad = [dict(i) for i in good]
    bad[2]["pod_index"] = "0"
    assert pinning_errors(0, bad, 2) == ["actor for rank 2 is on pod 0 of its group, not 1"]


@pytest.mark.parametrize(
    "local_rank,visible,want",
    [(0, 1, 0), (3, 1, 0), (3, 8, 3), (0, 8, 0)],
)
def test_cuda_device_is_the_rays_one_gpu_or_the_local_rank(
    local_rank: int, visible: int, want: int
) -> None:
    assert cuda_index(local_rank, visible) == want
