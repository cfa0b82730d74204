"""spec.placement (group domain, spread, Kueue pod groups) and the formation clock, on plain
data: validation, rendered affinity and labels, the domain-aware GPUCapacity check, and when
a group's formation deadline starts counting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from dsi_localcluster.builders import DSIWrapper
from dsi_operator.api import labels as L
from dsi_operator.api.spec import GroupStatus, RestartPolicySpec, parse_spec
from dsi_operator.serving.plan import gpu_needs
from dsi_operator.serving.preflight import GPUNeeds, capacity_condition
from dsi_operator.serving.render import render_children, spec_hash_by_group
from dsi_operator.serving.restart import NoAction, PodInfo, RestartDone
from dsi_operator.serving.status import advance_group
from pydantic import ValidationError

NOW = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC)
UID = "00000000-0000-0000-0000-0000000000bb"


def _spec(placement: dict[str, Any], tp: int = 2, replicas: int = 2) -> dict[str, Any]:
    return DSIWrapper("llm").tp(tp).replicas(replicas).set(placement=placement).spec()


def _workers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    rs = render_children("llm", "ns", UID, parse_spec(spec))[0]
    return list(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"])


def _by_group(workers: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for w in workers:
        parsed = L.parse_worker_group_name(w["groupName"])
        assert parsed is not None
        out.setdefault(parsed[0], []).append(w["template"])
    return out


def test_group_domain_required_attracts_only_the_groups_own_pods() -> None:
    spec = _spec({"groupDomain": {"topologyKey": "example.com/rack"}})
    for g, templates in _by_group(_workers(spec)).items():
        for t in templates:
            terms = t["spec"]["affinity"]["podAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert terms == [
                {
                    "labelSelector": {
                        "matchLabels": {L.LABEL_INFERENCE: "llm", L.LABEL_GROUP: str(g)}
                    },
                    "topologyKey": "example.com/rack",
                }
            ]
            # The selector must match the pod it is on (the scheduler then lets the group's
            # first pod open a domain).
            labels = t["metadata"]["labels"]
            assert labels[L.LABEL_INFERENCE] == "llm" and labels[L.LABEL_GROUP] == str(g)
            assert "podAntiAffinity" not in t["spec"]["affinity"]


def test_group_domain_preferred_and_spread_groups() -> None:
    spec = _spec(
        {
            "groupDomain": {"topologyKey": "zone", "mode": "Preferred"},
            "spreadGroups": {"topologyKey": "kubernetes.io/hostname"},
        }
    )
    templates = _by_group(_workers(spec))
    aff = templates[1][0]["spec"]["affinity"]
    pref = aff["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref[0]["weight"] == 100 and pref[0]["podAffinityTerm"]["topologyKey"] == "zone"
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in aff["podAffinity"]
    anti = aff["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    sel = anti["podAffinityTerm"]["labelSelector"]
    assert sel["matchExpressions"] == [{"key": L.LABEL_GROUP, "operator": "NotIn", "values": ["1"]}]
    assert sel["matchLabels"] == {L.LABEL_INFERENCE: "llm", L.LABEL_ROLE: L.ROLE_WORKER}
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    # Spreading is never required: it must not leave a group Pending.
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in aff["podAntiAffinity"]


def test_no_placement_renders_no_affinity_and_keeps_group_hashes() -> None:
    plain = DSIWrapper("llm").tp(2).replicas(2).spec()
    assert all("affinity" not in t["template"]["spec"] for t in _workers(plain))
    with_empty = _spec({})
    assert spec_hash_by_group(parse_spec(plain)) == spec_hash_by_group(parse_spec(with_empty))


def test_kueue_pod_group_per_group_on_rank_pods_only() -> None:
    spec = _spec({"kueue": {"queueName": "gpu-queue"}}, tp=4, replicas=2)
    spec["ranksPerPod"] = 2
    rs = render_children("llm", "ns", UID, parse_spec(spec))[0]
    for g, templates in _by_group(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]).items():
        assert len(templates) == 2
        for t in templates:
            meta = t["metadata"]
            assert meta["labels"][L.KUEUE_QUEUE_NAME] == "gpu-queue"
            assert meta["labels"][L.KUEUE_POD_GROUP_NAME] == f"llm-g{g}"
            assert meta["annotations"][L.KUEUE_POD_GROUP_TOTAL_COUNT] == "2"
            assert meta["annotations"][L.KUEUE_POD_GROUP_SERVING] == "true"
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert L.KUEUE_QUEUE_NAME not in head.get("labels", {})


@pytest.mark.parametrize(
    ("placement", "field"),
    [
        ({"groupDomain": {}}, "topologyKey"),
        ({"groupDomain": {"topologyKey": "bad key!"}}, "topologyKey"),
        ({"groupDomain": {"topologyKey": "zone", "mode": "Always"}}, "mode"),
        ({"spreadGroups": {"topologyKey": ""}}, "topologyKey"),
        ({"kueue": {"queueName": "Not_A_Queue"}}, "queueName"),
        ({"kueue": {}}, "queueName"),
        ({"affinity": {}}, "affinity"),
    ],
)
def test_bad_placement_is_refused_naming_the_field(placement: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_spec(_spec(placement))
    assert field in str(err.value)


def _node(name: str, gpus: int, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def test_gpu_capacity_counts_whole_groups_per_domain() -> None:
    # Two racks of 2 GPUs each: 4 GPUs in all, but a TP-4 group of one-GPU pods needs one rack
    # with 4 when it must stay in its rack.
    nodes = [
        _node("a1", 1, {"rack": "a"}),
        _node("a2", 1, {"rack": "a"}),
        _node("b1", 2, {"rack": "b"}),
    ]
    loose = GPUNeeds(tp=4)
    assert capacity_condition(nodes, loose).status == "True"
    tight = GPUNeeds(tp=4, group_domain_key="rack")
    cond = capacity_condition(nodes, tight)
    assert (cond.status, cond.reason) == ("False", "GroupDoesNotFitADomain")
    assert "rack" in cond.message and "2 domain(s)" in cond.message
    nodes.append(_node("b2", 2, {"rack": "b"}))
    assert capacity_condition(nodes, tight).status == "True"


def test_gpu_capacity_says_when_no_node_has_the_domain_label() -> None:
    needs = GPUNeeds(tp=2, group_domain_key="example.com/nvlink-domain")
    cond = capacity_condition([_node("n", 8, {})], needs)
    assert cond.reason == "GroupDoesNotFitADomain"
    assert "no matching node carries the label example.com/nvlink-domain" in cond.message


def test_only_a_required_group_domain_constrains_capacity() -> None:
    required = parse_spec(_spec({"groupDomain": {"topologyKey": "rack"}}))
    preferred = parse_spec(_spec({"groupDomain": {"topologyKey": "rack", "mode": "Preferred"}}))
    assert gpu_needs(required).group_domain_key == "rack"
    assert gpu_needs(preferred).group_domain_key is None


# --- formation clock -------------------------------------------------------------------------

POLICY = RestartPolicySpec()


def _pod(rank: int, phase: str, node: str | None = "n1") -> PodInfo:
    return PodInfo(name=f"p{rank}", uid=f"u{rank}", rank=rank, phase=phase, node_name=node)


def test_formation_clock_waits_until_every_pod_started() -> None:
    st = GroupStatus(index=0)
    pulling = [_pod(0, "Running"), _pod(1, "Pending")]
    st = advance_group(st, NoAction(), pulling, 2, POLICY, NOW)
    assert st.forming_since is None
    unscheduled = [_pod(0, "Running"), _pod(1, "Pending", node=None)]
    st = advance_group(st, NoAction(), unscheduled, 2, POLICY, NOW)
    assert st.forming_since is None
    started = [_pod(0, "Running"), _pod(1, "Running")]
    later = NOW + timedelta(minutes=7)
    st = advance_group(st, NoAction(), started, 2, POLICY, later)
    assert st.forming_since == later


def test_formation_clock_restarts_with_the_new_pods_after_a_restart() -> None:
    st = GroupStatus(index=0, restarting_since=NOW, restart_trigger="PodFailed")
    st = advance_group(st, RestartDone(0), [_pod(0, "Pending"), _pod(1, "Pending")], 2, POLICY, NOW)
    assert st.restarting_since is None and st.forming_since is None
    later = NOW + timedelta(seconds=90)
    st = advance_group(st, NoAction(), [_pod(0, "Running"), _pod(1, "Running")], 2, POLICY, later)
    assert st.forming_since == later
