"""kopf handlers: thin glue between watch events and the pure planner (:mod:`reconcile`).

Design:

* **Indexes, not reads.** kopf indexes keep the latest DSIs, worker pods, nodes, RayServices and
  master Services in memory, so a pass needs no API reads unless it is about to write.
* **One pass at a time per resource, bursts coalesced.** Every watch event (DSI, pod, node,
  RayService, Service) only *kicks* its DSI in :class:`Scheduler`; a worker pool runs
  :func:`reconcile_one` with at most one pass per DSI in flight and merges kicks that arrive
  meanwhile into one more pass.
* **A ticker instead of kopf timers.** Timers would put a kopf finalizer on every DSI (deletion
  would hang while the operator is down). One loop re-kicks every DSI every few seconds for
  the time-based triggers (grace periods, deadlines, backoff).
* **No kopf state on anything.** Only event and index handlers are used, so kopf writes no
  annotations, no status.kopf and no finalizers; children are rendered from scratch (never
  copied from the parent), so nothing of kopf's can leak onto them.
* **Read before write.** When the planner wants to write (status, children, pod deletions)
  the pass re-reads the DSI and plans again on the fresh object: status patches that record a
  restart are conditional on that resourceVersion, so a restart is never recorded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import labels as L
from . import metrics
from .kube import Kube, default_kubeconfig
from .preflight import ClusterFacts, PreflightResult
from .preflight import evaluate as evaluate_preflight
from .reconcile import Observed, Plan, gpu_needs, plan, safe_parse
from .render import render_children, spec_hash, spec_hash_by_group
from .restart import NodeInfo, PodInfo
from .spec import DeepSpeedInferenceSpec
from .status import RayServiceView, parse_time

log = logging.getLogger("dsi_operator")

Key = tuple[str, str]  # (namespace, DSI name)

#: Label KubeRay puts on every pod with its RayCluster's name.
RAY_CLUSTER_LABEL = "ray.io/cluster"

#: Seconds between ticker passes over every DSI (time-based triggers only need this).
TICK_SECONDS = float(os.environ.get("DSI_OPERATOR_TICK_SECONDS", "5"))
#: Concurrent passes (different DSIs).
WORKERS = int(os.environ.get("DSI_OPERATOR_WORKERS", "8"))
#: Seconds a restart leaves a Failed pod to KubeRay (which deletes those itself).
KUBERAY_GRACE_SECONDS = float(os.environ.get("DSI_OPERATOR_KUBERAY_GRACE", "10"))
#: Seconds the cluster-wide preflight facts (CRD, ClusterPolicy) are cached.
FACTS_TTL = float(os.environ.get("DSI_OPERATOR_FACTS_TTL", "30"))


# --- scheduler ---------------------------------------------------------------------------------


class Scheduler:
    """Coalescing work queue: at most one pass per key in flight, kicks merged."""

    def __init__(self, fn: Callable[[Key, str], Awaitable[None]], workers: int) -> None:
        self._fn = fn
        self._workers = workers
        self._pending: dict[Key, str] = {}
        self._running: set[Key] = set()
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def kick(self, key: Key, cause: str) -> None:
        """Ask for a pass over ``key`` (no-op if one is already queued)."""
        if key in self._pending:
            return
        self._pending[key] = cause
        if key not in self._running:
            self._queue.put_nowait(key)

    def start(self) -> None:
        """Start the worker tasks in the running loop."""
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self._workers)]

    async def stop(self) -> None:
        """Cancel the worker tasks."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            if key in self._running:
                continue  # re-queued when the running pass ends
            cause = self._pending.pop(key, None)
            if cause is None:
                continue
            self._running.add(key)
            try:
                await self._fn(key, cause)
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.RECONCILES.labels(cause=cause, outcome="error").inc()
                log.exception("pass over %s/%s failed; retrying on the next tick", *key)
            finally:
                self._running.discard(key)
                if key in self._pending:
                    self._queue.put_nowait(key)


# --- in-memory state ---------------------------------------------------------------------------


@dataclass
class Controller:
    """Process-wide state of the operator (one per process)."""

    kubeconfig: str | None = None
    exact_namespaces: bool = False
    kube: Kube | None = None
    facts: ClusterFacts | None = None
    scheduler: Scheduler | None = None
    ticker: asyncio.Task[None] | None = None
    dsis: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # kopf indexes (live mappings), captured from the first DSI event: kopf fills them
    # completely before any regular handler runs, so a pass never sees a half-listed cluster
    # (a formed group whose pods were simply not listed yet would look deleted).
    pod_index: Mapping[Key, Any] | None = None  # Key -> Store of (group, PodInfo)
    node_index: Mapping[str, Any] | None = None  # node name -> Store of node summary
    node_seen: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    rayservices: dict[Key, dict[str, Any]] = field(default_factory=dict)
    services: dict[Key, set[str]] = field(default_factory=dict)
    # (namespace, name) -> (uid, spec hash) of the children last applied by this process.
    applied: dict[Key, tuple[str, str]] = field(default_factory=dict)
    # last Event per (key, reason) to avoid repeating identical Events every pass.
    last_events: dict[tuple[Key, str], str] = field(default_factory=dict)


CTRL = Controller()


def configure(kubeconfig: str | None, *, exact_namespaces: bool = False) -> None:
    """Set the kubeconfig the handlers' own client uses (None: in-cluster), and whether the
    namespaces are exact names (then kopf need not list/watch namespaces)."""
    CTRL.kubeconfig = kubeconfig
    CTRL.exact_namespaces = exact_namespaces


# --- conversions from watched objects ----------------------------------------------------------


def pod_info(body: Mapping[str, Any]) -> tuple[int, PodInfo] | None:
    """(group, PodInfo) of a worker pod; None for the head or foreign pods."""
    meta = body.get("metadata") or {}
    gr = L.group_of_pod(meta.get("labels"))
    if gr is None:
        return None
    g, r = gr
    status = body.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return g, PodInfo(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        rank=r,
        phase=status.get("phase") or "Pending",
        ready=ready,
        restart_count=restarts,
        reason=status.get("reason"),
        node_name=(body.get("spec") or {}).get("nodeName"),
        deletion_timestamp=parse_time(meta.get("deletionTimestamp")),
        creation_timestamp=parse_time(meta.get("creationTimestamp")),
        group_hash=(meta.get("annotations") or {}).get(L.ANNOTATION_GROUP_HASH),
        cluster=(meta.get("labels") or {}).get(RAY_CLUSTER_LABEL),
    )


def node_summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Node that preflight and the restart logic read."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "spec": {
            "taints": copy.deepcopy(list(spec.get("taints") or [])),
            "unschedulable": bool(spec.get("unschedulable")),
        },
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "conditions": [
                {
                    "type": "Ready",
                    "status": c.get("status"),
                    "lastTransitionTime": c.get("lastTransitionTime"),
                }
                for c in ready
            ],
        },
    }


def node_info(summary: Mapping[str, Any]) -> NodeInfo:
    """Readiness of a node summary."""
    conds = summary["status"]["conditions"]
    ready = bool(conds) and conds[0].get("status") == "True"
    since = parse_time(conds[0].get("lastTransitionTime")) if conds else None
    return NodeInfo(name=summary["metadata"]["name"], ready=ready, since=since)


def rayservice_view(body: Mapping[str, Any] | None) -> RayServiceView:
    """Is the RayService ready, and which RayClusters does it run? KubeRay >= 1.3 sets a
    Ready condition; older ones ``status.serviceStatus: Running``."""
    if body is None:
        return RayServiceView()
    status = body.get("status") or {}
    active_status = status.get("activeServiceStatus") or {}
    active = active_status.get("rayClusterName") or None
    pending = (status.get("pendingServiceStatus") or {}).get("rayClusterName") or None
    serve = serve_group_statuses(active_status)
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            ok = c.get("status") == "True"
            msg = c.get("message") or c.get("reason") or ""
            return RayServiceView(True, ok, msg, active, pending, serve)
    if status.get("serviceStatus") == "Running":
        return RayServiceView(True, True, "serviceStatus Running", active, pending, serve)
    return RayServiceView(True, False, status.get("serviceStatus") or "", active, pending, serve)


def serve_group_statuses(service_status: Mapping[str, Any]) -> dict[int, str]:
    """Group index -> Serve status of its ``group-<g>`` deployment, from a KubeRay
    ``RayServiceStatus`` (``applicationStatuses.<app>.serveDeploymentStatuses``)."""
    apps = service_status.get("applicationStatuses") or {}
    deployments = (apps.get(L.SERVE_APP_NAME) or {}).get("serveDeploymentStatuses") or {}
    out: dict[int, str] = {}
    for name, st in deployments.items():
        prefix, _, index = str(name).partition("-")
        if prefix == "group" and index.isdigit():
            out[int(index)] = str((st or {}).get("status") or "")
    return out


def select_cluster_pods(pods: list[PodInfo], rs: RayServiceView) -> list[PodInfo]:
    """The pods of the RayCluster that counts: the active one (serving), else the pending one.

    During a KubeRay blue/green upgrade two RayClusters carry pods with the same group and
    rank labels; the groups of the serving cluster are the ones kept whole.
    """
    for name in (rs.active_cluster, rs.pending_cluster):
        if name and any(p.cluster == name for p in pods):
            return [p for p in pods if p.cluster == name]
    return pods


# --- kopf wiring -------------------------------------------------------------------------------


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
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
    if CTRL.exact_namespaces:
        settings.scanning.disabled = True
    CTRL.kube = Kube(CTRL.kubeconfig if CTRL.kubeconfig is not None else default_kubeconfig())
    CTRL.facts = ClusterFacts(CTRL.kube.cluster_facts, ttl=FACTS_TTL)
    CTRL.scheduler = Scheduler(reconcile_one, WORKERS)
    CTRL.scheduler.start()
    CTRL.ticker = asyncio.create_task(_ticker())


@kopf.on.login()
def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # Our own login: kopf's default piggybacks on the kubernetes client, whose default
    # kubeconfig path is fixed at import time (before --kubeconfig could set $KUBECONFIG).
    if CTRL.kubeconfig:
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_with_service_account(**kwargs)


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    if CTRL.ticker is not None:
        CTRL.ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await CTRL.ticker
    if CTRL.scheduler is not None:
        await CTRL.scheduler.stop()


async def _ticker() -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        if CTRL.scheduler is None:
            continue
        for key in list(CTRL.dsis):
            CTRL.scheduler.kick(key, "tick")


def _kick(key: Key, cause: str) -> None:
    if CTRL.scheduler is not None and key in CTRL.dsis:
        CTRL.scheduler.kick(key, cause)


@kopf.on.event(L.GROUP, L.VERSION, L.PLURAL)
async def _on_dsi(event: kopf.RawEvent, **kwargs: Any) -> None:
    # kopf passes every index as a keyword named after its function.
    CTRL.pod_index = kwargs["dsi_pods"]
    CTRL.node_index = kwargs["dsi_nodes"]
    obj = event["object"]
    meta = obj.get("metadata") or {}
    key = (meta.get("namespace", ""), meta.get("name", ""))
    if event["type"] == "DELETED":
        CTRL.dsis.pop(key, None)
        CTRL.applied.pop(key, None)
        metrics.forget(*key)
        return
    CTRL.dsis[key] = copy.deepcopy(dict(obj))
    _kick(key, "dsi")


@kopf.index("", "v1", "pods", labels={L.LABEL_INFERENCE: kopf.PRESENT})
def dsi_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, tuple[int, PodInfo]] | None:
    """Index: (namespace, DSI name) -> (group, PodInfo) of its worker pods."""
    info = pod_info(body)
    if info is None:
        return None
    return {(namespace or "", labels.get(L.LABEL_INFERENCE, "")): info}


@kopf.index("", "v1", "nodes")
def dsi_nodes(name: str | None, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    """Index: node name -> the parts of the node preflight and the restart logic read."""
    return {name or "": node_summary(body)}


def pods_of(key: Key) -> list[tuple[int, PodInfo]]:
    """(group, PodInfo) of every worker pod of a DSI, from the index."""
    if CTRL.pod_index is None:
        return []
    return list(CTRL.pod_index.get(key, ()))


def all_nodes() -> dict[str, dict[str, Any]]:
    """Node summaries by name, from the index."""
    if CTRL.node_index is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, store in CTRL.node_index.items():
        for summary in store:
            out[name] = summary
    return out


@kopf.on.event("", "v1", "pods", labels={L.LABEL_INFERENCE: kopf.PRESENT})
async def _on_pod(event: kopf.RawEvent, **_: Any) -> None:
    meta = event["object"].get("metadata") or {}
    key = (meta.get("namespace", ""), (meta.get("labels") or {}).get(L.LABEL_INFERENCE, ""))
    _kick(key, "pod")


@kopf.on.event("", "v1", "nodes")
async def _on_node(event: kopf.RawEvent, **_: Any) -> None:
    obj = event["object"]
    name = (obj.get("metadata") or {}).get("name", "")
    before = CTRL.node_seen.get(name)
    after = None if event["type"] == "DELETED" else node_summary(obj)
    CTRL.node_seen[name] = after
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
        affected = set(CTRL.dsis)
    else:
        affected = {key for key in CTRL.dsis if any(p.node_name == name for _, p in pods_of(key))}
    for key in affected:
        _kick(key, "node")


@kopf.on.event(L.RAY_GROUP, L.RAY_VERSION_API, L.RAYSERVICE_PLURAL)
async def _on_rayservice(event: kopf.RawEvent, **_: Any) -> None:
    obj = event["object"]
    meta = obj.get("metadata") or {}
    key = (meta.get("namespace", ""), meta.get("name", ""))
    if event["type"] == "DELETED":
        CTRL.rayservices.pop(key, None)
    else:
        CTRL.rayservices[key] = {
            "metadata": {"annotations": dict(meta.get("annotations") or {})},
            "status": copy.deepcopy(dict(obj.get("status") or {})),
        }
    _kick(key, "rayservice")


@kopf.on.event(
    "",
    "v1",
    "services",
    labels={L.LABEL_INFERENCE: kopf.PRESENT, L.LABEL_ROLE: L.ROLE_MASTER_SERVICE},
)
async def _on_service(event: kopf.RawEvent, **_: Any) -> None:
    obj = event["object"]
    meta = obj.get("metadata") or {}
    key = (meta.get("namespace", ""), (meta.get("labels") or {}).get(L.LABEL_INFERENCE, ""))
    names = CTRL.services.setdefault(key, set())
    if event["type"] == "DELETED":
        names.discard(meta.get("name", ""))
    else:
        names.add(meta.get("name", ""))
    _kick(key, "service")


# --- one pass ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """A DSI spec parsed once per (uid, generation) with the hashes derived from it."""

    spec: DeepSpeedInferenceSpec | None
    error: str | None
    spec_hash: str | None = None
    group_hashes: dict[int, str] | None = None


_PARSED: dict[tuple[str, Any], Parsed] = {}


def _parsed(body: Mapping[str, Any]) -> Parsed:
    meta = body.get("metadata") or {}
    ck = (meta.get("uid", ""), meta.get("generation"))
    hit = _PARSED.get(ck)
    if hit is not None:
        return hit
    spec, err = safe_parse(body.get("spec") or {})
    if spec is None:
        out = Parsed(None, err)
    else:
        out = Parsed(spec, None, spec_hash(spec), spec_hash_by_group(spec))
    if len(_PARSED) > 4096:
        _PARSED.clear()
    _PARSED[ck] = out
    return out


async def _preflight(body: Mapping[str, Any]) -> PreflightResult | None:
    parsed = _parsed(body).spec
    if parsed is None or CTRL.facts is None:
        return None
    kuberay, policies = await CTRL.facts.get()
    return evaluate_preflight(kuberay, policies, list(all_nodes().values()), gpu_needs(parsed))


def _children_current(key: Key, body: Mapping[str, Any]) -> tuple[bool, bool, str | None]:
    """(children exist, children up to date, desired spec hash)."""
    parsed = _parsed(body)
    if parsed.spec is None or parsed.spec_hash is None:
        return False, False, None
    want = parsed.spec_hash
    rs = CTRL.rayservices.get(key)
    exists = rs is not None
    services = CTRL.services.get(key, set())
    wanted_services = {L.master_service_name(key[1], g) for g in range(parsed.spec.replicas)}
    current = (
        exists
        and rs is not None
        and rs["metadata"]["annotations"].get(L.ANNOTATION_SPEC_HASH) == want
        and services == wanted_services
    )
    uid = (body.get("metadata") or {}).get("uid", "")
    if CTRL.applied.get(key) == (uid, want) and exists:
        # Applied by us; the watch may lag behind our own write.
        current = current or services >= wanted_services
    return exists, current, want


def _observe(key: Key, body: Mapping[str, Any], pre: PreflightResult | None) -> Observed:
    meta = body.get("metadata") or {}
    rs = rayservice_view(CTRL.rayservices.get(key))
    entries = pods_of(key)
    keep = {p.uid for p in select_cluster_pods([p for _, p in entries], rs)}
    pods_by_group: dict[int, list[PodInfo]] = {}
    for g, p in entries:
        if p.uid in keep:
            pods_by_group.setdefault(g, []).append(p)
    parsed = _parsed(body)
    hashes = parsed.group_hashes
    exists, _, _ = _children_current(key, body)
    return Observed(
        name=key[1],
        namespace=key[0],
        generation=meta.get("generation"),
        spec=body.get("spec") or {},
        status=body.get("status") or {},
        now=datetime.now(UTC),
        pods=pods_by_group,
        nodes={n: node_info(s) for n, s in all_nodes().items()},
        preflight=pre,
        children_created=exists,
        rayservice=rs,
        desired_hashes=hashes,
        parsed=parsed.spec,
    )


async def reconcile_one(key: Key, cause: str) -> None:
    """One pass over one DSI: plan from memory; re-read, act and write only when needed."""
    body = CTRL.dsis.get(key)
    if body is None:
        return
    pre = await _preflight(body)
    p = plan(_observe(key, body, pre))
    _, current, _ = _children_current(key, body)
    if not p.patch and not p.acts and (current or p.blocked) and not _new_events(key, p):
        metrics.RECONCILES.labels(cause=cause, outcome="noop").inc()
        return

    started = time.monotonic()
    assert CTRL.kube is not None
    kube = CTRL.kube
    fresh = await kube.get_dsi(*key)
    if fresh is None:
        return
    body = fresh
    CTRL.dsis[key] = copy.deepcopy(fresh)
    p = plan(_observe(key, body, pre))

    if not p.blocked:
        await _ensure_children(key, body)
        p = plan(_observe(key, body, pre))

    await _execute(key, body, p)
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    metrics.RECONCILES.labels(cause=cause, outcome="acted").inc()


async def _ensure_children(key: Key, body: Mapping[str, Any]) -> None:
    exists, current, want = _children_current(key, body)
    if current or want is None:
        return
    assert CTRL.kube is not None
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    children = render_children(key[1], key[0], uid, body.get("spec") or {})
    for child in children:
        await CTRL.kube.apply(child)
        if child["kind"] == L.RAYSERVICE_KIND:
            # Record our own write so the pass does not wait for the watch to catch up; the
            # watch event that follows overwrites this with the real object.
            prev = CTRL.rayservices.get(key) or {}
            CTRL.rayservices[key] = {
                "metadata": {"annotations": dict(child["metadata"].get("annotations") or {})},
                "status": copy.deepcopy(prev.get("status") or {}),
            }
        elif child["metadata"]["labels"].get(L.LABEL_ROLE) == L.ROLE_MASTER_SERVICE:
            CTRL.services.setdefault(key, set()).add(child["metadata"]["name"])
    wanted = {c["metadata"]["name"] for c in children if c["kind"] == "Service"}
    for svc in await CTRL.kube.list_master_services(*key):
        if svc not in wanted:
            await CTRL.kube.delete_service(key[0], svc)
            CTRL.services.get(key, set()).discard(svc)
    CTRL.applied[key] = (uid, want)
    log.info("%s/%s: children applied (spec hash %s, existed: %s)", *key, want, exists)


def _new_events(key: Key, p: Plan) -> bool:
    return any(CTRL.last_events.get((key, e.reason)) != e.message for e in p.events)


def _restart_grace(body: Mapping[str, Any]) -> int | None:
    spec = _parsed(body).spec
    return spec.restart_policy.pod_deletion_grace_seconds if spec is not None else None


async def _execute(key: Key, body: Mapping[str, Any], p: Plan) -> None:
    assert CTRL.kube is not None
    kube = CTRL.kube
    ns, name = key
    if p.patch:
        rv = (body.get("metadata") or {}).get("resourceVersion") if p.restarts else None
        try:
            updated = await kube.patch_dsi_status(ns, name, p.patch, rv)
        except ApiException as e:
            if e.status == 409:
                # Someone wrote in between: the next pass plans again on the new object.
                log.info("%s/%s: status conflict; replanning", ns, name)
                _kick(key, "conflict")
                return
            if e.status == 404:
                return
            raise
        metrics.STATUS_WRITES.inc()
        CTRL.dsis[key] = copy.deepcopy(updated)
    metrics.set_phase(ns, name, p.status.get("phase"), p.status.get("readyReplicas"))

    for ev in p.events:
        if CTRL.last_events.get((key, ev.reason)) == ev.message:
            continue
        CTRL.last_events[(key, ev.reason)] = ev.message
        try:
            await kube.post_event(body, ev.type, ev.reason, ev.message)
        except ApiException as err:  # an Event is best effort
            log.warning("%s/%s: could not post Event %s: %s", ns, name, ev.reason, err.reason)

    by_uid = {p_.uid: p_ for _, p_ in pods_of(key)}
    nodes = all_nodes()

    def on_dead_node(pod: PodInfo) -> bool:
        # The kubelet of a NotReady/gone node never confirms a graceful delete.
        node = nodes.get(pod.node_name or "")
        return pod.node_name is not None and (node is None or not node_info(node).ready)

    started = {
        g["index"]: parse_time(g.get("restartingSince")) for g in p.status.get("groups") or []
    }
    now = datetime.now(UTC)

    def leave_to_kuberay(pod: PodInfo) -> bool:
        # KubeRay deletes Failed/Succeeded worker pods itself, at once. Racing it for the
        # same pod leaves its scale expectations unsatisfied and stalls the replacement for
        # minutes, so such pods get KUBERAY_GRACE_SECONDS before we delete them ourselves.
        # Pods already Terminating are finished by the kubelet, or forced once stuck.
        if on_dead_node(pod):
            return False
        if pod.deletion_timestamp is not None:
            return True
        if pod.phase in ("Failed", "Succeeded"):
            since = started.get(_group_of_uid(pod.uid)) or now
            return (now - since).total_seconds() < KUBERAY_GRACE_SECONDS
        return False

    def _group_of_uid(uid: str) -> int:
        for g, p_ in pods_of(key):
            if p_.uid == uid:
                return g
        return -1

    grace = _restart_grace(body)
    for r in p.restarts:
        metrics.RESTARTS.labels(namespace=ns, name=name, trigger=r.trigger).inc()
        log.warning("%s/%s: restarting group %d: %s %s", ns, name, r.group, r.trigger, r.reason)
        for uid in r.pods:
            pod = by_uid.get(uid)
            if pod is not None and not leave_to_kuberay(pod):
                await kube.delete_pod(ns, pod.name, uid, force=on_dead_node(pod), grace=grace)
    for c in p.continues:
        for uid in c.delete:
            pod = by_uid.get(uid)
            if pod is not None and not leave_to_kuberay(pod):
                await kube.delete_pod(ns, pod.name, uid, force=on_dead_node(pod), grace=grace)
        for uid in c.force:
            pod = by_uid.get(uid)
            if pod is not None:
                await kube.delete_pod(ns, pod.name, uid, force=True)
