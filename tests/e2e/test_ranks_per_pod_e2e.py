"""Several ranks per pod, for real: one TP-4 group as 2 pods x 2 rank processes
(``ranksPerPod: 2``) through operator -> KubeRay -> Ray -> DeepSpeed -> HTTP, and a whole-group
restart when one of those pods loses its container."""

from __future__ import annotations

from typing import Any

from dsi_localcluster import faults
from dsi_localcluster.wait import events
from e2e_stack import Stack

TP, PER_POD = 4, 2


def _env(pod: Any) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env or [] if e.value is not None}


def test_tp4_as_two_pods_of_two_ranks_serves_the_unsharded_tokens(
    multi_rank_stack: Stack, reference_tokens: list[int]
) -> None:
    st = multi_rank_stack
    pods = st.pods()
    # Worker pods are named by their first rank: ranks 0-1 and 2-3.
    assert sorted(pods) == [(0, 0), (0, 2)], st.dump()
    for (_, first), pod in pods.items():
        env = _env(pod)
        assert "RANK" not in env  # per process, from the group deployment
        assert env["NODE_RANK"] == str(first // PER_POD)
        assert env["WORLD_SIZE"] == str(TP)
        assert env["LOCAL_WORLD_SIZE"] == env["LOCAL_SIZE"] == str(PER_POD)
        assert pod.spec.containers[0].resources.limits["cpu"] == str(PER_POD)  # 1 per rank
        assert pod.metadata.labels["deepspeed.ai/pod"] == str(first // PER_POD)

    status = st.dsi()["status"]
    (group,) = status["groups"]
    assert (group["ranks"], group["readyRanks"], group["pods"], group["readyPods"]) == (
        TP,
        TP,
        TP // PER_POD,
        TP // PER_POD,
    ), status

    wide = st.kubectl("get", "dsi", "-n", st.namespace, "-o", "wide").stdout.splitlines()
    columns = wide[0].split()
    assert columns.index("RANKS/POD") == columns.index("TP") + 1
    row = wide[1].split()
    assert row[columns.index("RANKS/POD")] == str(PER_POD), wide

    # TP 4 over two pods equals the unsharded model, token for token.
    assert st.generate()["token_ids"] == reference_tokens


def test_a_multi_rank_pod_losing_its_container_restarts_the_whole_group(
    multi_rank_stack: Stack, reference_tokens: list[int]
) -> None:
    st = multi_rank_stack
    before = st.uids(0)
    restarts = int(st.dsi()["status"].get("restarts", 0))
    victim = st.pods()[(0, 2)]
    faults.kill_container_process(st.kube.api, st.namespace, victim.metadata.name)

    st.wait_ready(since_restarts=restarts)
    after = st.uids(0)
    # Both pods replaced (the one hit and its healthy peer), as with one rank per pod.
    assert len(after) == TP // PER_POD and not after & before, st.dump()
    evs = [e for e in events(st.kube.core, st.namespace, st.name) if "GroupRestart" in e]
    assert any("restarting group 0" in e for e in evs), evs
    assert st.wait_answers(timeout=300)["token_ids"] == reference_tokens
