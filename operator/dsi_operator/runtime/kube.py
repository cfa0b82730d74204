"""Thin I/O helpers over the official kubernetes client (sync, run in worker threads).

Every call is counted in :mod:`metrics` by verb and resource, so an idle operator can be shown
to make no writes, and every failed call again by HTTP status. Children are written with
server-side apply (field manager ``dsi-operator``, force) so create and update are the same
idempotent call.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dsi_operator._version import __version__
from dsi_operator.api import labels as L
from dsi_operator.runtime import metrics

FIELD_MANAGER = "dsi-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
T = TypeVar("T")
#: KubeRay's leader-election Lease (``LeaderElectionID`` in ray-operator/main.go).
KUBERAY_LEASE = "ray-operator-leader"


def default_kubeconfig() -> str | None:
    """$KUBECONFIG, else .cluster/kubeconfig if present, else None (in-cluster config)."""
    env = os.environ.get("KUBECONFIG")
    if env:
        return env
    local = Path(".cluster/kubeconfig")
    if local.exists():
        return str(local.resolve())
    return None


def in_cluster_server(env: Mapping[str, str]) -> str:
    """The API server's URL from inside a pod, as client-go's ``InClusterConfig`` finds it:
    ``KUBERNETES_SERVICE_HOST``/``_PORT`` (which the kubelet sets in every container), else
    the ``kubernetes.default.svc`` name that kopf's own service-account login always uses,
    which needs cluster DNS."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return "https://kubernetes.default.svc"
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


#: Seconds (connect, read) any one API call may take.
REQUEST_TIMEOUT = (5.0, 30.0)


class Kube:
    """The operator's API client. Construct once; methods are coroutines."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        cfg = client.Configuration()
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        # Threads share one pool; enough connections for concurrent passes.
        cfg.connection_pool_maxsize = 16
        self.api = client.ApiClient(cfg)
        self.api.user_agent = f"dsi-operator/{__version__}"

    # The API classes are made on first use: the client imports each one's module (and the
    # pydantic models its methods validate) lazily, CoreV1Api's alone in about a CPU second
    # here. A restarted operator's first write (a status patch) needs only the custom-objects
    # API (and the preflight facts' two); warm() imports them off the event loop.

    @functools.cached_property
    def core(self) -> client.CoreV1Api:
        """Pods, Services, Events, ConfigMaps, ServiceAccounts."""
        return client.CoreV1Api(self.api)

    @functools.cached_property
    def custom(self) -> client.CustomObjectsApi:
        """The DSIs, RayServices, RayClusters, RayJobs, ClusterPolicies."""
        return client.CustomObjectsApi(self.api)

    @functools.cached_property
    def ext(self) -> client.ApiextensionsV1Api:
        """CRDs (is KubeRay installed)."""
        return client.ApiextensionsV1Api(self.api)

    @functools.cached_property
    def coordination(self) -> client.CoordinationV1Api:
        """Leases (is KubeRay alive)."""
        return client.CoordinationV1Api(self.api)

    @functools.cached_property
    def networking(self) -> client.NetworkingV1Api:
        """NetworkPolicies."""
        return client.NetworkingV1Api(self.api)

    @functools.cached_property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        """A batch run's Role and RoleBinding."""
        return client.RbacAuthorizationV1Api(self.api)

    def warm(self, names: tuple[str, ...] = ("custom", "ext", "coordination", "core")) -> None:
        """Make these API classes now (imports; blocking: run it in a thread).
        NetworkPolicies and the batch kind's RBAC are imported when first used."""
        for name in names:
            getattr(self, name)

    async def _call(self, verb: str, resource: str, fn: Callable[..., T], *a: Any, **kw: Any) -> T:
        metrics.API_REQUESTS.labels(verb=verb, resource=resource).inc()
        # The client waits forever by default: one call stuck on a dead connection would
        # hold its resource's pass (and a worker) for good.
        kw.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return await asyncio.to_thread(fn, *a, **kw)
        except ApiException as e:
            # Counted here, not by callers: some answers (404 on get) are expected and handled
            # above, so the code label lets a dashboard tell those from real failures.
            metrics.API_ERRORS.labels(verb=verb, resource=resource, code=str(e.status)).inc()
            raise
        except Exception:
            metrics.API_ERRORS.labels(verb=verb, resource=resource, code="none").inc()
            raise

    # --- the DSI ---------------------------------------------------------------------------

    async def _get_custom(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        """A namespaced custom object as a dict, or None when it is gone."""
        try:
            obj = await self._call(
                "get",
                plural,
                self.custom.get_namespaced_custom_object,
                group,
                version,
                namespace,
                plural,
                name,
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return _d(obj)

    async def get_dsi(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The DSI as a dict, or None when it is gone."""
        return await self._get_custom(L.GROUP, L.VERSION, L.PLURAL, namespace, name)

    async def patch_dsi_status(
        self,
        namespace: str,
        name: str,
        status_patch: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """Merge-patch the status subresource; with ``resource_version`` it is conditional
        (409 Conflict when someone else wrote in between)."""
        body: dict[str, Any] = {"status": dict(status_patch)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        obj = await self._call(
            "patch",
            f"{L.PLURAL}/status",
            self.custom.patch_namespaced_custom_object_status,
            L.GROUP,
            L.VERSION,
            namespace,
            L.PLURAL,
            name,
            body,
            _content_type=MERGE,
        )
        return _d(obj)

    # --- the batch kind ----------------------------------------------------------------------

    async def get_batch(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The DeepSpeedBatchInference as a dict, or None when it is gone."""
        return await self._get_custom(L.GROUP, L.VERSION, L.BATCH_PLURAL, namespace, name)

    async def patch_batch_status(
        self, namespace: str, name: str, status_patch: Mapping[str, Any]
    ) -> None:
        """Merge-patch a DeepSpeedBatchInference's status subresource."""
        await self._call(
            "patch",
            f"{L.BATCH_PLURAL}/status",
            self.custom.patch_namespaced_custom_object_status,
            L.GROUP,
            L.VERSION,
            namespace,
            L.BATCH_PLURAL,
            name,
            {"status": dict(status_patch)},
            _content_type=MERGE,
        )

    async def get_rayjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A RayJob as a dict, or None when it is gone."""
        return await self._get_custom(
            L.RAY_GROUP, L.RAY_VERSION_API, L.RAYJOB_PLURAL, namespace, name
        )

    async def get_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data, or None when it is gone."""
        try:
            cm = await self._call(
                "get", "configmaps", self.core.read_namespaced_config_map, name, namespace
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(cm.data or {})

    # --- children --------------------------------------------------------------------------

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply one child (RayService, RayJob, Service, NetworkPolicy, or a batch
        run's ConfigMap, ServiceAccount, Role and RoleBinding)."""
        api_version = obj["apiVersion"]
        kind = obj["kind"]
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        typed = {
            ("v1", "Service"): ("services", self.core.patch_namespaced_service),
            ("networking.k8s.io/v1", "NetworkPolicy"): (
                "networkpolicies",
                self.networking.patch_namespaced_network_policy,
            ),
            ("v1", "ConfigMap"): ("configmaps", self.core.patch_namespaced_config_map),
            ("v1", "ServiceAccount"): (
                "serviceaccounts",
                self.core.patch_namespaced_service_account,
            ),
            ("rbac.authorization.k8s.io/v1", "Role"): ("roles", self.rbac.patch_namespaced_role),
            ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
                "rolebindings",
                self.rbac.patch_namespaced_role_binding,
            ),
        }.get((api_version, kind))
        if typed is not None:
            res = await self._call(
                "apply",
                typed[0],
                typed[1],
                name,
                ns,
                dict(obj),
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY,
            )
            return _d(self.api.sanitize_for_serialization(res))  # type: ignore[no-untyped-call]
        group, version = api_version.split("/", 1)
        plural = {"RayService": L.RAYSERVICE_PLURAL}.get(kind, kind.lower() + "s")
        out = await self._call(
            "apply",
            plural,
            self.custom.patch_namespaced_custom_object,
            group,
            version,
            ns,
            plural,
            name,
            dict(obj),
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,
        )
        return _d(out) if isinstance(out, dict) else {}

    async def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A RayService as a dict (the templates a rollout keeps); None when gone."""
        return await self._get_custom(
            L.RAY_GROUP, L.RAY_VERSION_API, "rayservices", namespace, name
        )

    async def get_raycluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A RayCluster (KubeRay's, made for our RayService) as a dict; None when gone."""
        return await self._get_custom(
            L.RAY_GROUP, L.RAY_VERSION_API, "rayclusters", namespace, name
        )

    async def patch_raycluster(self, namespace: str, name: str, ops: list[dict[str, Any]]) -> None:
        """Apply a JSON patch (with its ``test`` ops) to a RayCluster."""
        await self._call(
            "patch",
            "rayclusters",
            self.custom.patch_namespaced_custom_object,
            L.RAY_GROUP,
            L.RAY_VERSION_API,
            namespace,
            "rayclusters",
            name,
            ops,
            _content_type="application/json-patch+json",
        )

    async def _names(
        self, resource: str, fn: Callable[..., Any], namespace: str, name: str, role: str
    ) -> list[str]:
        selector = f"{L.LABEL_INFERENCE}={name},{L.LABEL_ROLE}={role}"
        res = await self._call("list", resource, fn, namespace, label_selector=selector)
        return [s.metadata.name for s in res.items if s.metadata and s.metadata.name]

    async def list_master_services(self, namespace: str, name: str) -> list[str]:
        """Names of the per-group master Services of DSI ``name``."""
        fn = self.core.list_namespaced_service
        return await self._names("services", fn, namespace, name, L.ROLE_MASTER_SERVICE)

    async def list_network_policies(self, namespace: str, name: str) -> list[str]:
        """Names of the per-group NetworkPolicies of DSI ``name``."""
        fn = self.networking.list_namespaced_network_policy
        return await self._names("networkpolicies", fn, namespace, name, L.ROLE_NETWORK_POLICY)

    async def delete_network_policy(self, namespace: str, name: str) -> None:
        """Delete a NetworkPolicy; already gone is fine."""
        try:
            await self._call(
                "delete",
                "networkpolicies",
                self.networking.delete_namespaced_network_policy,
                name,
                namespace,
            )
        except ApiException as e:
            if e.status != 404:
                raise

    async def delete_service(self, namespace: str, name: str) -> None:
        """Delete a Service; already gone is fine."""
        try:
            await self._call(
                "delete", "services", self.core.delete_namespaced_service, name, namespace
            )
        except ApiException as e:
            if e.status != 404:
                raise

    async def delete_pod(
        self, namespace: str, name: str, uid: str, *, force: bool = False, grace: int | None = None
    ) -> bool:
        """Delete exactly the pod with this UID (a precondition guards against deleting its
        replacement). ``force`` uses grace period 0 (pod stuck Terminating); ``grace``
        overrides the pod's own grace period otherwise. Returns False when the pod was
        already gone or replaced."""
        opts = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=uid),
            grace_period_seconds=0 if force else grace,
        )
        try:
            await self._call(
                "delete", "pods", self.core.delete_namespaced_pod, name, namespace, body=opts
            )
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise
        return True

    # --- Events ----------------------------------------------------------------------------

    async def post_event(
        self,
        involved: Mapping[str, Any],
        etype: str,
        reason: str,
        message: str,
        name: str | None = None,
    ) -> None:
        """Post a core/v1 Event about ``involved`` (a DSI or batch body), named ``name`` (the API
        server then answers 409 to a second post) or with a generated name."""
        meta = involved.get("metadata", {})
        ns = meta.get("namespace") or "default"
        now = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=name, generate_name=None if name else f"{meta.get('name', 'dsi')}."
            ),
            involved_object=client.V1ObjectReference(
                api_version=L.API_VERSION,
                kind=involved.get("kind") or L.KIND,
                name=meta.get("name"),
                namespace=ns,
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=etype,
            reason=reason,
            message=message[:1024],
            source=client.V1EventSource(component=FIELD_MANAGER),
            reporting_component=FIELD_MANAGER,
            reporting_instance=os.environ.get("HOSTNAME", FIELD_MANAGER),
            first_timestamp=_now(),
            last_timestamp=_now(),
            count=1,
        )
        await self._call("create", "events", self.core.create_namespaced_event, ns, now)

    # --- cluster-wide facts for preflight -------------------------------------------------

    async def cluster_facts(self) -> tuple[bool, list[dict[str, Any]] | None]:
        """(rayservices.ray.io CRD present, ClusterPolicy objects or None when no CRD)."""
        kuberay = True
        try:
            await self._call(
                "get",
                "customresourcedefinitions",
                self.ext.read_custom_resource_definition,
                f"{L.RAYSERVICE_PLURAL}.{L.RAY_GROUP}",
            )
        except ApiException as e:
            if e.status != 404:
                raise
            kuberay = False
        try:
            res = await self._call(
                "list",
                "clusterpolicies",
                self.custom.list_cluster_custom_object,
                "nvidia.com",
                "v1",
                "clusterpolicies",
            )
        except ApiException as e:
            if e.status == 404:
                return kuberay, None
            raise
        return kuberay, [_d(x) for x in _d(res).get("items", [])]

    async def kuberay_lease(self) -> dict[str, Any] | None:
        """KubeRay's leader-election Lease (``ray-operator-leader``, any namespace) as a dict,
        or None when there is none or it may not be read (liveness then stays unknown)."""
        try:
            res = await self._call(
                "list",
                "leases",
                self.coordination.list_lease_for_all_namespaces,
                field_selector=f"metadata.name={KUBERAY_LEASE}",
            )
        except ApiException as e:
            if e.status in (403, 404):
                return None
            raise
        leases: list[dict[str, Any]] = [
            _d(self.api.sanitize_for_serialization(x))  # type: ignore[no-untyped-call]
            for x in res.items
        ]
        if not leases:
            return None
        # Several (one KubeRay per namespace): the most recently renewed speaks for KubeRay.
        return max(leases, key=lambda x: str((x.get("spec") or {}).get("renewTime") or ""))


def _d(obj: object) -> dict[str, Any]:
    """The client returns custom objects as plain dicts typed ``object``."""
    return cast(dict[str, Any], obj)


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
