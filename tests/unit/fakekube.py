"""An in-memory stand-in for the API client a serving pass uses (``runtime.execute.KubeClient``,
the surface of ``runtime.kube.Kube``), not a fake API server.

It keeps the objects the operator reads and writes (DSIs, RayServices, RayClusters, master
Services, NetworkPolicies, pods, Events), answers as ``Kube`` does (``None`` for a missing
object, ``False`` for a pod already gone), records every call in order, and fails the calls a
test arms with :meth:`FakeKube.fail` (an HTTP status per verb and resource, as the operator's
metrics label them). :meth:`FakeKube.sync` plays the part of kopf's watches and indexes:
it copies what the cluster holds into a controller's caches.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dsi_operator.api import labels as L
from dsi_operator.runtime.controller import Controller
from dsi_operator.serving.restart import PodInfo
from kubernetes.client.exceptions import ApiException

Key = tuple[str, str]

#: The resource names the fake's calls are recorded and failed under (those of kube.py).
DSI = L.PLURAL
DSI_STATUS = f"{L.PLURAL}/status"


@dataclass(frozen=True)
class Call:
    """One call the operator made: verb, resource and object name."""

    verb: str
    resource: str
    name: str
    detail: Any = None


@dataclass
class FakeKube:
    """The cluster as the operator's client sees it (see the module docstring)."""

    dsis: dict[Key, dict[str, Any]] = field(default_factory=dict)
    rayservices: dict[Key, dict[str, Any]] = field(default_factory=dict)
    rayclusters: dict[Key, dict[str, Any]] = field(default_factory=dict)
    services: dict[Key, dict[str, Any]] = field(default_factory=dict)
    network_policies: dict[Key, dict[str, Any]] = field(default_factory=dict)
    #: (namespace, DSI name) -> uid -> (group, PodInfo)
    pods: dict[Key, dict[str, tuple[int, PodInfo]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    #: (verb, resource) -> what the next calls answer, in order: an HTTP status, or None
    #: to let the call through.
    faults: dict[tuple[str, str], list[int | None]] = field(default_factory=dict)
    _rv: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    # --- test set-up and inspection ---------------------------------------------------------

    def fail(self, verb: str, resource: str, status: int, times: int = 1, after: int = 0) -> None:
        """Make ``times`` calls of ``verb`` on ``resource`` answer ``status``, once ``after``
        more such calls went through."""
        self.faults.setdefault((verb, resource), []).extend([None] * after + [status] * times)

    def create_dsi(self, body: Mapping[str, Any], namespace: str = "ns") -> Key:
        """Store a DSI as the API server would (uid, generation, resourceVersion)."""
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta.setdefault("uid", f"uid-{meta['name']}-0123456789")
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = self._next_rv()
        key = (meta["namespace"], meta["name"])
        self.dsis[key] = obj
        return key

    def edit_dsi(self, key: Key, status: Mapping[str, Any] | None = None, **spec: Any) -> None:
        """Another writer changes the DSI (a new resourceVersion; generation on spec)."""
        obj = self.dsis[key]
        if spec:
            obj["spec"].update(spec)
            obj["metadata"]["generation"] += 1
        if status is not None:
            obj["status"] = _merge(obj.get("status") or {}, status)
        obj["metadata"]["resourceVersion"] = self._next_rv()

    def add_pod(self, key: Key, group: int, pod: PodInfo) -> None:
        """A pod of the DSI as the pod index shows it."""
        self.pods.setdefault(key, {})[pod.uid] = (group, pod)

    def set_pods(self, key: Key, group: int, **changes: Any) -> None:
        """Change every pod of one group (e.g. ``ready=True``)."""
        for uid, (g, p) in list(self.pods.get(key, {}).items()):
            if g == group:
                self.pods[key][uid] = (g, replace(p, **changes))

    def set_rayservice_status(self, key: Key, status: Mapping[str, Any]) -> None:
        """KubeRay reports on the RayService."""
        self.rayservices[(key[0], L.rayservice_name(key[1]))]["status"] = dict(status)

    def made(self, verb: str, resource: str | None = None) -> list[Call]:
        """The calls of this verb (and resource) made so far."""
        return [
            c for c in self.calls if c.verb == verb and (resource is None or c.resource == resource)
        ]

    def index_of(self, verb: str, resource: str) -> int:
        """The position of the first such call in :attr:`calls` (ValueError: none)."""
        return next(i for i, c in enumerate(self.calls) if (c.verb, c.resource) == (verb, resource))

    def writes(self) -> list[Call]:
        """Every call that changes the cluster."""
        return [c for c in self.calls if c.verb not in ("get", "list")]

    @property
    def pod_index(self) -> Mapping[Key, list[tuple[int, PodInfo]]]:
        """The pod index as kopf keeps it (a live view)."""
        return _PodIndex(self)

    def sync(self, ctrl: Controller) -> None:
        """What kopf's watches and indexes would have told the controller by now."""
        ctrl.pod_index = self.pod_index
        ctrl.node_index = {}
        for key, obj in self.dsis.items():
            ctrl.dsis[key] = copy.deepcopy(obj)
        for (ns, name), obj in self.rayservices.items():
            meta = obj.get("metadata") or {}
            ctrl.rayservices[(ns, name)] = {
                "metadata": {"annotations": dict(meta.get("annotations") or {})},
                "status": copy.deepcopy(dict(obj.get("status") or {})),
            }
        names: dict[Key, set[str]] = {}
        for (ns, name), obj in [*self.services.items(), *self.network_policies.items()]:
            labels = obj["metadata"]["labels"]
            if labels.get(L.LABEL_ROLE) in (L.ROLE_MASTER_SERVICE, L.ROLE_NETWORK_POLICY):
                names.setdefault((ns, labels.get(L.LABEL_INFERENCE, "")), set()).add(name)
        for key in {*ctrl.services, *names}:
            ctrl.services[key] = names.get(key, set())

    # --- the client surface (runtime.execute.KubeClient) ------------------------------------

    def warm(self, names: tuple[str, ...] = ()) -> None:
        """Nothing to import."""

    async def get_dsi(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            self._call("get", DSI, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        obj = self.dsis.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def patch_dsi_status(
        self,
        namespace: str,
        name: str,
        status_patch: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        self._call("patch", DSI_STATUS, name, (dict(status_patch), resource_version))
        obj = self.dsis.get((namespace, name))
        if obj is None:
            raise ApiException(status=404)
        if resource_version and resource_version != obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        obj["status"] = _merge(obj.get("status") or {}, status_patch)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        return copy.deepcopy(obj)

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        store, resource = self._store_of(kind)
        self._call("apply", resource, meta["name"])
        stored = copy.deepcopy(dict(obj))
        old = store.get((meta["namespace"], meta["name"]))
        if old is not None and "status" in old:
            stored["status"] = old["status"]  # apply does not touch the status
        store[(meta["namespace"], meta["name"])] = stored
        return copy.deepcopy(stored)

    async def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("rayservices", self.rayservices, namespace, name)

    async def get_raycluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("rayclusters", self.rayclusters, namespace, name)

    async def patch_raycluster(self, namespace: str, name: str, ops: list[dict[str, Any]]) -> None:
        self._call("patch", "rayclusters", name, ops)
        if (namespace, name) not in self.rayclusters:
            raise ApiException(status=404)

    async def list_master_services(self, namespace: str, name: str) -> list[str]:
        self._call("list", "services", name)
        return _owned(self.services, namespace, name, L.ROLE_MASTER_SERVICE)

    async def list_network_policies(self, namespace: str, name: str) -> list[str]:
        self._call("list", "networkpolicies", name)
        return _owned(self.network_policies, namespace, name, L.ROLE_NETWORK_POLICY)

    async def delete_service(self, namespace: str, name: str) -> None:
        self._delete("services", self.services, namespace, name)

    async def delete_network_policy(self, namespace: str, name: str) -> None:
        self._delete("networkpolicies", self.network_policies, namespace, name)

    async def delete_pod(
        self, namespace: str, name: str, uid: str, *, force: bool = False, grace: int | None = None
    ) -> bool:
        try:
            self._call("delete", "pods", name, (uid, force, grace))
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise
        for pods in self.pods.values():
            if uid in pods:  # the precondition: exactly this UID
                del pods[uid]
                return True
        return False

    async def post_event(
        self,
        involved: Mapping[str, Any],
        etype: str,
        reason: str,
        message: str,
        name: str | None = None,
    ) -> None:
        self._call("create", "events", name or "", reason)
        if name is not None and any(e["name"] == name for e in self.events):
            raise ApiException(status=409)
        self.events.append({"name": name, "type": etype, "reason": reason, "message": message})

    # --- internals --------------------------------------------------------------------------

    def _next_rv(self) -> str:
        return str(next(self._rv))

    def _call(self, verb: str, resource: str, name: str, detail: Any = None) -> None:
        self.calls.append(Call(verb, resource, name, detail))
        pending = self.faults.get((verb, resource))
        status = pending.pop(0) if pending else None
        if status is not None:
            raise ApiException(status=status, reason="injected")

    def _store_of(self, kind: str) -> tuple[dict[Key, dict[str, Any]], str]:
        return {
            L.RAYSERVICE_KIND: (self.rayservices, L.RAYSERVICE_PLURAL),
            "Service": (self.services, "services"),
            "NetworkPolicy": (self.network_policies, "networkpolicies"),
        }[kind]

    def _get(
        self, resource: str, store: dict[Key, dict[str, Any]], namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            self._call("get", resource, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        obj = store.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def _delete(
        self, resource: str, store: dict[Key, dict[str, Any]], namespace: str, name: str
    ) -> None:
        try:
            self._call("delete", resource, name)
        except ApiException as e:
            if e.status != 404:
                raise
        store.pop((namespace, name), None)


class _PodIndex(Mapping[Key, list[tuple[int, PodInfo]]]):
    def __init__(self, kube: FakeKube) -> None:
        self._kube = kube

    def __getitem__(self, key: Key) -> list[tuple[int, PodInfo]]:
        return list(self._kube.pods[key].values())

    def __iter__(self) -> Iterator[Key]:
        return iter(self._kube.pods)

    def __len__(self) -> int:
        return len(self._kube.pods)


def _owned(
    store: Mapping[Key, Mapping[str, Any]], namespace: str, dsi: str, role: str
) -> list[str]:
    """Names of the objects of one DSI with one role (the label selector kube.py lists by)."""
    want = {L.LABEL_INFERENCE: dsi, L.LABEL_ROLE: role}
    return [
        name
        for (ns, name), obj in store.items()
        if ns == namespace and want.items() <= obj["metadata"]["labels"].items()
    ]


def _merge(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386): objects merge, null deletes, anything else replaces."""
    out = copy.deepcopy(dict(target))
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
