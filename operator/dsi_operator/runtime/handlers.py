"""kopf wiring: watch events and indexes in, kicks to the :class:`~.controller.Controller` out.

Only event and index handlers are used, so kopf writes no annotations, no status.kopf and no
finalizers; children are rendered from scratch (never copied from the parent), so nothing of
kopf's can leak onto them. The controller lives in kopf's operator memo (``memo.ctrl``);
kopf's per-resource memos are shallow copies of it, so every handler sees the same one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from dsi_operator.api import labels as L
from dsi_operator.runtime import metrics
from dsi_operator.runtime.batch_controller import BatchController
from dsi_operator.runtime.controller import (
    FACTS_TTL,
    LEASE_TTL,
    RESYNC_SECONDS,
    TICK_SECONDS,
    WORKERS,
    Controller,
    process_age,
)
from dsi_operator.runtime.kube import Kube, default_kubeconfig, in_cluster_server
from dsi_operator.runtime.workqueue import Key, Scheduler
from dsi_operator.serving.observe import node_summary, pod_info
from dsi_operator.serving.preflight import ClusterFacts
from dsi_operator.serving.restart import PodInfo

log = logging.getLogger("dsi_operator")

#: Server-side label selectors per watched kind: the same filters the handlers below apply.
_SERVER_SIDE_LABELS: dict[tuple[str, str, str], str] = {
    ("", "v1", "pods"): L.LABEL_INFERENCE,
    ("", "v1", "services"): f"{L.LABEL_INFERENCE},{L.LABEL_ROLE}={L.ROLE_MASTER_SERVICE}",
    ("networking.k8s.io", "v1", "networkpolicies"): (
        f"{L.LABEL_INFERENCE},{L.LABEL_ROLE}={L.ROLE_NETWORK_POLICY}"
    ),
    (L.RAY_GROUP, L.RAY_VERSION_API, L.RAYJOB_PLURAL): L.LABEL_BATCH,
}

#: Seconds after the start without a single pass before the operator says why it waits.
STARTUP_WATCHDOG_SECONDS = 15.0


def new_memo(kubeconfig: str | None, *, exact_namespaces: bool = False) -> kopf.Memo:
    """The operator memo for ``kopf.run``: the kubeconfig the controller's own client uses
    (None: in-cluster), and whether the namespaces are exact names (then kopf need not
    list/watch namespaces)."""
    return kopf.Memo(
        ctrl=Controller(kubeconfig=kubeconfig, exact_namespaces=exact_namespaces),
        batch=BatchController(),
    )


def _ctrl(memo: Any) -> Controller:
    ctrl = memo.ctrl
    assert isinstance(ctrl, Controller)
    return ctrl


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf keeps no state on our objects (no change handlers), but if anything ever did it
    # would be under our own prefix on the DSI only.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=L.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=L.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{L.GROUP}/dsi-operator"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Filter on the server: kopf otherwise lists and processes every Pod and Service of the
    # watched namespaces (KubeRay's own Services, users' pods) before any pass may run.
    for selector, labels in _SERVER_SIDE_LABELS.items():
        settings.watching.label_selectors[selector] = labels
    ctrl = _ctrl(memo)
    if ctrl.exact_namespaces:
        settings.scanning.disabled = True
    # The API client is blocking and runs in threads; asyncio's default pool (cores + 4)
    # would cap in-flight calls below the number of passes that may wait on one.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=2 * WORKERS, thread_name_prefix="api")
    )
    kube = Kube(ctrl.kubeconfig if ctrl.kubeconfig is not None else default_kubeconfig())
    ctrl.kube = memo.batch.kube = kube
    ctrl.facts = ClusterFacts(kube.cluster_facts, ttl=FACTS_TTL)
    ctrl.lease = ClusterFacts(kube.kuberay_lease, ttl=LEASE_TTL)
    ctrl.scheduler = Scheduler(ctrl.reconcile_one, WORKERS)
    ctrl.scheduler.start()
    ctrl.ticker = asyncio.create_task(_ticker(ctrl))
    # While kopf lists the watched kinds (every pass waits for that), import the API classes
    # the first pass writes with and read the cluster-wide preflight facts it plans with; and
    # say so if nothing has run after a while. CoreV1Api (Events, pod deletions) follows when
    # the first pass starts: imported now, it costs the first pass about a CPU second.
    ctrl.background = [
        asyncio.create_task(asyncio.to_thread(kube.warm, ("custom", "ext", "coordination"))),
        asyncio.create_task(_prefetch_facts(ctrl)),
        asyncio.create_task(_startup_watchdog(ctrl)),
    ]


async def _prefetch_facts(ctrl: Controller) -> None:
    try:
        await ctrl.cluster_signature()
    except Exception as e:  # noqa: BLE001 - the first pass asks again and reports it
        log.warning("cluster facts unavailable at start: %s", e)


async def _startup_watchdog(ctrl: Controller, after: float = STARTUP_WATCHDOG_SECONDS) -> None:
    """One line when no pass has run ``after`` seconds after the start: kopf runs no handler
    before it has listed every indexed kind, and says nothing while it waits."""
    await asyncio.sleep(after)
    if not ctrl.first_pass_logged:
        log.warning(
            "no pass yet %.0fs after start (%.0fs since the process started): kopf is still "
            "listing pods, nodes, RayServices or Services, or no resource exists (%d seen)",
            after,
            process_age(),
            len(ctrl.dsis),
        )


@kopf.on.login()
def _login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    # Our own login: kopf's default piggybacks on the kubernetes client, whose default
    # kubeconfig path is fixed at import time (before --kubeconfig could set $KUBECONFIG).
    if _ctrl(memo).kubeconfig:
        return kopf.login_with_kubeconfig(**kwargs)
    # In a pod: the service account's token and CA, and the server the environment names
    # (as client-go and the kubernetes client do) rather than kopf's fixed DNS name.
    info = kopf.login_with_service_account(**kwargs)
    if info is None:
        return None
    return dataclasses.replace(info, server=in_cluster_server(os.environ))


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctrl = _ctrl(memo)
    for task in ctrl.background:
        task.cancel()
    if ctrl.ticker is not None:
        ctrl.ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ctrl.ticker
    if ctrl.scheduler is not None:
        await ctrl.scheduler.stop()


async def _ticker(ctrl: Controller) -> None:
    """Kick the DSIs with a clock running; all of them when the cluster-wide facts change
    and every RESYNC_SECONDS (see the :mod:`.controller` docstring)."""
    cluster: tuple[Any, ...] | None = None
    last_all = time.monotonic()
    while True:
        await asyncio.sleep(TICK_SECONDS)
        if not ctrl.dsis:
            continue
        try:
            seen: tuple[Any, ...] | None = await ctrl.cluster_signature()
        except Exception as e:  # noqa: BLE001 - the ticker must outlive API trouble
            log.warning("cluster facts unavailable: %s", e)
            seen = cluster
        if seen != cluster or time.monotonic() - last_all >= RESYNC_SECONDS:
            cause = "resync" if seen == cluster else "cluster"
            cluster, last_all = seen, time.monotonic()
            keys = list(ctrl.dsis)
        else:
            cause, keys = "tick", [k for k in ctrl.clock_waiters if k in ctrl.dsis]
        for key in keys:
            ctrl.kick(key, cause)


@kopf.on.event(L.GROUP, L.VERSION, L.PLURAL)
async def _on_dsi(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    ctrl = _ctrl(memo)
    # kopf passes every index as a keyword named after its function.
    ctrl.pod_index = kwargs["dsi_pods"]
    ctrl.node_index = kwargs["dsi_nodes"]
    obj = event["object"]
    meta = obj.get("metadata") or {}
    key = (meta.get("namespace", ""), meta.get("name", ""))
    if event["type"] == "DELETED":
        ctrl.forget(key)
        metrics.forget(*key)
        return
    children = (kwargs["dsi_master_services"], kwargs["dsi_network_policies"])
    seed_children(ctrl, key, kwargs["dsi_rayservices"], children)
    ctrl.dsis[key] = copy.deepcopy(dict(obj))
    ctrl.kick(key, "dsi")


def seed_children(
    ctrl: Controller,
    key: Key,
    rayservices: Mapping[Key, Any],
    children: Sequence[Mapping[Key, Any]],
) -> None:
    """Fill what the RayService and child watches have not told the controller yet about
    ``key`` from their indexes (complete before any handler runs).

    After a restart, kopf runs the handlers of the initial listings in no fixed order: a DSI's
    first pass could come before its RayService's and Services' handlers, see no children,
    apply them all again and plan without them (no restart decisions), once per resource,
    ahead of the one whose pod failed while the operator was away.
    """
    if key not in ctrl.rayservices:
        for summary in rayservices.get(key, ()):
            ctrl.rayservices[key] = copy.deepcopy(summary)
    names = {name for index in children for name in index.get(key, ()) if name}
    if names:
        ctrl.services.setdefault(key, set()).update(names)


# The index functions are coroutines only so that kopf calls them in the event loop: it runs a
# plain function in a worker thread, a hop per object, and a restart indexes every pod, node,
# RayService and master Service before any pass may run.


@kopf.index("", "v1", "pods", labels={L.LABEL_INFERENCE: kopf.PRESENT})
async def dsi_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, tuple[int, PodInfo]] | None:
    """Index: (namespace, DSI name) -> (group, PodInfo) of its worker pods."""
    info = pod_info(body)
    if info is None:
        return None
    return {(namespace or "", labels.get(L.LABEL_INFERENCE, "")): info}


@kopf.index("", "v1", "nodes")
async def dsi_nodes(name: str | None, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    """Index: node name -> the parts of the node preflight and the restart logic read."""
    return {name or "": node_summary(body)}


@kopf.on.event("", "v1", "pods", labels={L.LABEL_INFERENCE: kopf.PRESENT})
async def _on_pod(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    meta = event["object"].get("metadata") or {}
    key = (meta.get("namespace", ""), (meta.get("labels") or {}).get(L.LABEL_INFERENCE, ""))
    _ctrl(memo).kick(key, "pod")


@kopf.on.event("", "v1", "nodes")
async def _on_node(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctrl = _ctrl(memo)
    obj = event["object"]
    name = (obj.get("metadata") or {}).get("name", "")
    before = ctrl.node_seen.get(name)
    after = None if event["type"] == "DELETED" else node_summary(obj)
    ctrl.node_seen[name] = after
    # Heartbeats change nothing we read: only kick when readiness, capacity or taints moved.
    if before == after:
        return
    if (
        before is None
        or after is None
        or before["status"]["allocatable"] != after["status"]["allocatable"]
        or before["spec"] != after["spec"]
        or before["metadata"] != after["metadata"]
    ):
        # Capacity or placement changed: every DSI's GPUCapacity condition may change.
        affected = set(ctrl.dsis)
    else:
        affected = {k for k in ctrl.dsis if any(p.node_name == name for _, p in ctrl.pods_of(k))}
    for key in affected:
        ctrl.kick(key, "node")


def rayservice_summary(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a RayService the controller reads: its annotations and status."""
    meta = obj.get("metadata") or {}
    return {
        "metadata": {"annotations": dict(meta.get("annotations") or {})},
        "status": copy.deepcopy(dict(obj.get("status") or {})),
    }


@kopf.index(L.RAY_GROUP, L.RAY_VERSION_API, L.RAYSERVICE_PLURAL)
async def dsi_rayservices(
    namespace: str | None, name: str | None, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    """Index: (namespace, DSI name) -> RayService summary. An index so that kopf lists the
    RayServices before it runs any handler (see :func:`seed_children`)."""
    return {(namespace or "", name or ""): rayservice_summary(body)}


@kopf.index(
    "",
    "v1",
    "services",
    labels={L.LABEL_INFERENCE: kopf.PRESENT, L.LABEL_ROLE: L.ROLE_MASTER_SERVICE},
)
async def dsi_master_services(
    namespace: str | None, name: str | None, labels: kopf.Labels, **_: Any
) -> dict[Key, str]:
    """Index: (namespace, DSI name) -> names of its master Services."""
    return {(namespace or "", labels.get(L.LABEL_INFERENCE, "")): name or ""}


@kopf.index(
    "networking.k8s.io",
    "v1",
    "networkpolicies",
    labels={L.LABEL_INFERENCE: kopf.PRESENT, L.LABEL_ROLE: L.ROLE_NETWORK_POLICY},
)
async def dsi_network_policies(
    namespace: str | None, name: str | None, labels: kopf.Labels, **_: Any
) -> dict[Key, str]:
    """Index: (namespace, DSI name) -> names of its NetworkPolicies."""
    return {(namespace or "", labels.get(L.LABEL_INFERENCE, "")): name or ""}


@kopf.on.event(L.RAY_GROUP, L.RAY_VERSION_API, L.RAYSERVICE_PLURAL)
async def _on_rayservice(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    ctrl = _ctrl(memo)
    obj = event["object"]
    meta = obj.get("metadata") or {}
    key = (meta.get("namespace", ""), meta.get("name", ""))
    if event["type"] == "DELETED":
        ctrl.rayservices.pop(key, None)
    else:
        ctrl.rayservices[key] = rayservice_summary(obj)
    ctrl.kick(key, "rayservice")


@kopf.on.event(
    "",
    "v1",
    "services",
    labels={L.LABEL_INFERENCE: kopf.PRESENT, L.LABEL_ROLE: L.ROLE_MASTER_SERVICE},
)
async def _on_service(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _track_group_child(_ctrl(memo), event)


@kopf.on.event(
    "networking.k8s.io",
    "v1",
    "networkpolicies",
    labels={L.LABEL_INFERENCE: kopf.PRESENT, L.LABEL_ROLE: L.ROLE_NETWORK_POLICY},
)
async def _on_network_policy(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _track_group_child(_ctrl(memo), event)


def _track_group_child(ctrl: Controller, event: kopf.RawEvent) -> None:
    """A per-group child (master Service, NetworkPolicy) appeared, changed or went away:
    a deleted one is noticed and applied again."""
    obj = event["object"]
    meta = obj.get("metadata") or {}
    key = (meta.get("namespace", ""), (meta.get("labels") or {}).get(L.LABEL_INFERENCE, ""))
    names = ctrl.services.setdefault(key, set())
    if event["type"] == "DELETED":
        names.discard(meta.get("name", ""))
    else:
        names.add(meta.get("name", ""))
    ctrl.kick(key, "service")
