"""Preflight checks, reported as status conditions and Events, never as a crash.

:func:`evaluate` is pure: it takes what the controller listed (is KubeRay's RayService CRD
installed, the GPU Operator's ClusterPolicy objects, the nodes) and the relevant spec fields,
and returns conditions plus an optional *blocking* message. Blocking means the operator must not
create children: KubeRay missing (nothing could act on a RayService), or the GPU Operator missing
or not ready while ``spec.gpu.requireGPUOperator`` is true. Too few GPUs is reported but does
not block: a cluster autoscaler may add nodes once pods are pending.

:class:`ClusterFacts` caches the two cluster-wide reads (CRD, ClusterPolicy) for a few seconds
so that many resources share them and an idle operator issues few requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from dsi_operator.api.spec import Condition, ConditionType
from dsi_operator.util.timefmt import iso_precise, parse_time


@dataclass(frozen=True)
class GPUNeeds:
    """The spec fields the GPU capacity check needs."""

    tp: int
    gpus_per_rank: int = 1
    ranks_per_pod: int = 1
    resource_name: str = "nvidia.com/gpu"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    require_gpu_operator: bool = False
    #: Node label key a group must stay within (spec.placement.groupDomain, Required only).
    group_domain_key: str | None = None

    @property
    def pods(self) -> int:
        """Pods of one group."""
        return max(self.tp // max(self.ranks_per_pod, 1), 1)

    @property
    def gpus_per_pod(self) -> int:
        """GPUs one pod requests (all of them on one node)."""
        return self.gpus_per_rank * self.ranks_per_pod


@dataclass(frozen=True)
class PreflightResult:
    """Conditions for status, and a message when creation must wait."""

    conditions: tuple[Condition, ...]
    blocking: str | None = None
    warnings: tuple[str, ...] = ()


def toleration_matches(tol: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' toleration/taint matching rule."""
    effect = tol.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    op = tol.get("operator") or "Equal"
    key = tol.get("key") or ""
    if op == "Exists":
        return key == "" or key == taint.get("key")
    return bool(key == taint.get("key") and (tol.get("value") or "") == (taint.get("value") or ""))


def node_ready(node: Mapping[str, Any]) -> bool:
    """True when the node's Ready condition is True."""
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


def node_fits(node: Mapping[str, Any], needs: GPUNeeds) -> bool:
    """Could a worker pod be scheduled on this node (labels, taints, cordon, readiness)?"""
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in needs.node_selector.items()):
        return False
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return False
    for taint in spec.get("taints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(toleration_matches(t, taint) for t in needs.tolerations):
            return False
    return node_ready(node)


def _quantity_int(value: Any) -> int:
    # Extended resources such as GPUs are whole numbers; anything else counts as zero.
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def _node_gpus(nodes: Sequence[Mapping[str, Any]], needs: GPUNeeds) -> list[int]:
    """Allocatable GPUs of each node a worker pod may use (nodes without any left out)."""
    out = []
    for node in nodes:
        if not node_fits(node, needs):
            continue
        alloc = _quantity_int(
            ((node.get("status") or {}).get("allocatable") or {}).get(needs.resource_name, 0)
        )
        if alloc > 0:
            out.append(alloc)
    return out


def _domain_groups(nodes: Sequence[Mapping[str, Any]], needs: GPUNeeds) -> dict[str, int]:
    """Whole groups each topology domain holds (domains named by the group-domain label).

    Nodes without the label are no domain: a required pod affinity can never place a
    group's pods there.
    """
    assert needs.group_domain_key is not None
    per_domain: dict[str, int] = {}
    per = max(needs.gpus_per_pod, 1)
    for node in nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        domain = labels.get(needs.group_domain_key)
        if domain is None or not node_fits(node, needs):
            continue
        alloc = _quantity_int(
            ((node.get("status") or {}).get("allocatable") or {}).get(needs.resource_name, 0)
        )
        per_domain[domain] = per_domain.get(domain, 0) + alloc // per
    return {d: slots // needs.pods for d, slots in per_domain.items()}


def _domain_condition(nodes: Sequence[Mapping[str, Any]], needs: GPUNeeds) -> Condition | None:
    """GPUCapacity False when no topology domain holds one whole group (None: one does)."""
    if needs.group_domain_key is None or needs.gpus_per_rank == 0:
        return None
    groups = _domain_groups(nodes, needs)
    if any(groups.values()):
        return None
    key = needs.group_domain_key
    where = (
        f"{len(groups)} domain(s) of {key} hold none"
        if groups
        else f"no matching node carries the label {key}"
    )
    return Condition.of(
        ConditionType.GPUCapacity,
        "False",
        "GroupDoesNotFitADomain",
        f"placement.groupDomain (Required) keeps a group's {needs.pods} pod(s) x "
        f"{needs.gpus_per_pod} {needs.resource_name} inside one {key} domain, but {where}",
    )


def _capacity(allocs: Sequence[int], needs: GPUNeeds) -> tuple[int, int, int]:
    """(worker pods that fit, matching nodes, allocatable GPUs on them) from each matching
    node's GPUs. Counted per node: a node with 3 GPUs holds one 2-GPU pod, not 1.5; a pod of
    several ranks needs all its GPUs on one node."""
    per = max(needs.gpus_per_pod, 1)
    return sum(a // per for a in allocs), len(allocs), sum(allocs)


def _pod_too_large(allocs: Sequence[int], needs: GPUNeeds) -> Condition | None:
    """GPUCapacity False when no matching node holds one whole pod of several ranks."""
    if needs.ranks_per_pod == 1 or not allocs or max(allocs) >= needs.gpus_per_pod:
        return None
    return Condition.of(
        ConditionType.GPUCapacity,
        "False",
        "PodDoesNotFitANode",
        f"a worker pod needs {needs.gpus_per_pod} {needs.resource_name} on one node "
        f"(ranksPerPod {needs.ranks_per_pod} x resources.gpus {needs.gpus_per_rank}), but the "
        f"largest matching node has {max(allocs)}; lower ranksPerPod to at most "
        f"{max(allocs) // max(needs.gpus_per_rank, 1)}",
    )


def _one_pod_hint(allocs: Sequence[int], needs: GPUNeeds) -> str:
    """Advice when a group spread over one-rank pods would fit on one node."""
    if needs.ranks_per_pod != 1 or needs.tp == 1 or not allocs:
        return ""
    if max(allocs) < needs.tp * needs.gpus_per_rank:
        return ""
    return (
        f"; nodes hold up to {max(allocs)} {needs.resource_name}: ranksPerPod "
        f"{needs.tp} would keep each group in one pod on one node (NVLink, one Ray node)"
    )


def capacity_condition(nodes: Sequence[Mapping[str, Any]], needs: GPUNeeds) -> Condition:
    """GPUCapacity: do the nodes a rank pod may use hold one whole group?"""
    if needs.gpus_per_rank == 0:
        # CPU-only ranks (resources.gpus: 0): only placement matters, not GPUs.
        matching = sum(1 for n in nodes if node_fits(n, needs))
        if matching:
            return Condition.of(
                ConditionType.GPUCapacity,
                "True",
                "NoGPUsRequested",
                f"CPU-only ranks (resources.gpus: 0); {matching} node(s) match their placement",
            )
        return Condition.of(
            ConditionType.GPUCapacity,
            "False",
            "NoMatchingNodes",
            "CPU-only ranks (resources.gpus: 0), but no Ready node matches their "
            "nodeSelector and tolerations",
        )
    # One walk over the nodes per pass: this runs for every resource on every pass.
    allocs = _node_gpus(nodes, needs)
    too_large = _pod_too_large(allocs, needs) or _domain_condition(nodes, needs)
    if too_large is not None:
        return too_large
    slots, matching, gpus = _capacity(allocs, needs)
    need_desc = (
        f"one group needs {needs.pods} rank pod(s) x {needs.gpus_per_pod} {needs.resource_name}"
    )
    found = f"{gpus} allocatable {needs.resource_name} on {matching} matching node(s) fit"
    if slots >= needs.pods:
        return Condition.of(
            ConditionType.GPUCapacity,
            "True",
            "Sufficient",
            f"{found} {slots // needs.pods} group(s); {need_desc}{_one_pod_hint(allocs, needs)}",
        )
    return Condition.of(
        ConditionType.GPUCapacity,
        "False",
        "Insufficient",
        f"{found} {slots} rank pod(s); {need_desc}",
    )


#: Seconds past a Lease's expiry (renewTime + leaseDurationSeconds) before KubeRay counts as
#: down: a renewal that is merely late on a loaded API server is not an outage.
LEASE_SLACK_SECONDS = 10.0


def _lease_age(lease: Mapping[str, Any], now: datetime) -> tuple[float, float] | None:
    """(seconds since the last renewal, lease duration), or None when never held."""
    spec = lease.get("spec") or {}
    renew = spec.get("renewTime")
    if not spec.get("holderIdentity") or not renew:
        return None
    if (renew := parse_time(renew)) is None:
        return None
    return (now - renew).total_seconds(), float(spec.get("leaseDurationSeconds") or 15)


def kuberay_condition(
    present: bool, lease: Mapping[str, Any] | None, now: datetime | None = None
) -> Condition:
    """KubeRayAvailable: is the CRD installed, and does KubeRay's operator run?

    Liveness comes from KubeRay's leader-election Lease (renewed every few seconds while it
    runs; its Helm chart enables leader election by default). No Lease: liveness unknown,
    judged by the CRD alone.
    """
    if not present:
        msg = "KubeRay is not installed (CRD rayservices.ray.io not found)"
        return Condition.of(ConditionType.KubeRayAvailable, "False", "CRDNotFound", msg)
    if lease is None:
        return Condition.of(
            ConditionType.KubeRayAvailable, "True", "CRDPresent", "rayservices.ray.io installed"
        )
    now = now or datetime.now(UTC)
    where = f"Lease {(lease.get('metadata') or {}).get('namespace', '?')}/ray-operator-leader"
    age = _lease_age(lease, now)
    if age is not None and age[0] <= age[1] + LEASE_SLACK_SECONDS:
        return Condition.of(
            ConditionType.KubeRayAvailable,
            "True",
            "Running",
            f"rayservices.ray.io installed; {where} is held",
        )
    # The renewal time, not an age: the message must not change while nothing does, or
    # every pass would rewrite the status.
    renewed = (lease.get("spec") or {}).get("renewTime")
    since = "never held" if age is None else f"last renewed at {iso_precise(parse_time(renewed))}"
    return Condition.of(
        ConditionType.KubeRayAvailable,
        "False",
        "ControllerNotRunning",
        f"KubeRay's operator is not running ({where} {since}): RayServices are not "
        "reconciled and deleted pods are not replaced until it is back; restarts resume then",
    )


def evaluate(
    kuberay_present: bool,
    cluster_policies: Sequence[Mapping[str, Any]] | None,
    nodes: Sequence[Mapping[str, Any]],
    needs: GPUNeeds,
    kuberay_lease: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> PreflightResult:
    """Conditions GPUOperatorReady, GPUCapacity and KubeRayAvailable, and what blocks.

    ``cluster_policies`` is ``None`` when the ClusterPolicy CRD itself is absent;
    ``kuberay_lease`` is KubeRay's leader Lease, ``None`` when there is none to read. A KubeRay
    that is installed but not running is reported, not blocking: children can be written
    and it acts on them when it is back.
    """
    conds: list[Condition] = []
    blocking: list[str] = []
    warnings: list[str] = []

    kuberay = kuberay_condition(kuberay_present, kuberay_lease, now)
    conds.append(kuberay)
    if not kuberay_present:
        blocking.append(kuberay.message)
    elif kuberay.status != "True":
        warnings.append(kuberay.message)

    if cluster_policies is None:
        gpu_op = Condition.of(
            ConditionType.GPUOperatorReady,
            "False",
            "NotInstalled",
            "GPU Operator not installed (CRD clusterpolicies.nvidia.com not found)",
        )
    elif not cluster_policies:
        gpu_op = Condition.of(
            ConditionType.GPUOperatorReady, "False", "NoClusterPolicy", "no ClusterPolicy found"
        )
    else:
        states = {
            (p.get("metadata") or {}).get("name", "?"): (p.get("status") or {}).get("state")
            for p in cluster_policies
        }
        ready = [n for n, s in states.items() if s == "ready"]
        if ready:
            gpu_op = Condition.of(
                ConditionType.GPUOperatorReady,
                "True",
                "ClusterPolicyReady",
                f"ClusterPolicy {ready[0]} ready",
            )
        else:
            desc = ", ".join(f"{n}: {s or 'no state'}" for n, s in sorted(states.items()))
            gpu_op = Condition.of(
                ConditionType.GPUOperatorReady,
                "False",
                "ClusterPolicyNotReady",
                f"ClusterPolicy {desc}",
            )
    conds.append(gpu_op)
    if gpu_op.status != "True":
        if needs.require_gpu_operator:
            blocking.append(
                f"GPU Operator required (spec.gpu.requireGPUOperator): {gpu_op.message}"
            )

    cap = capacity_condition(nodes, needs)
    conds.append(cap)
    if cap.status != "True":
        what = "GPUs" if needs.gpus_per_rank else "nodes"
        warnings.append(f"insufficient {what}: {cap.message}")

    return PreflightResult(
        conditions=tuple(conds),
        blocking="; ".join(blocking) if blocking else None,
        warnings=tuple(warnings),
    )


# --- thin I/O: cluster-wide facts, cached ------------------------------------------------------


FactT = TypeVar("FactT")


@dataclass
class ClusterFacts(Generic[FactT]):
    """A cached cluster-wide answer, e.g. "is KubeRay installed, what ClusterPolicies exist?"
    (``Kube.cluster_facts``) or "KubeRay's leader Lease" (``Kube.kuberay_lease``).

    ``fetch`` is an async callable returning the answer; it is called at most once per
    ``ttl`` seconds however many resources ask.
    """

    fetch: Callable[[], Awaitable[FactT]]
    ttl: float = 15.0
    _value: FactT | None = None
    _fetched: bool = False
    _at: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self) -> FactT:
        """The cached facts, refreshed when older than ``ttl``."""
        async with self._lock:
            if not self._fetched or time.monotonic() - self._at > self.ttl:
                self._value = await self.fetch()
                self._fetched = True
                self._at = time.monotonic()
            return self._value  # type: ignore[return-value]  # set by the first fetch
