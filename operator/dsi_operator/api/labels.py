"""Names shared by every part of the project: API group, label keys, child object names.

These are the team contracts from the brief; everything that names a child object or reads a
label goes through this module so that a rename happens in one place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# --- The custom resource -------------------------------------------------------------------
GROUP = "deepspeed.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DeepSpeedInference"
PLURAL = "deepspeedinferences"
SINGULAR = "deepspeedinference"
SHORT_NAMES = ["dsi"]
CATEGORIES = ["deepspeed", "inference"]
CRD_NAME = f"{PLURAL}.{GROUP}"

# --- The batch custom resource ---------------------------------------------------------------
BATCH_KIND = "DeepSpeedBatchInference"
BATCH_PLURAL = "deepspeedbatchinferences"
BATCH_SINGULAR = "deepspeedbatchinference"
BATCH_SHORT_NAMES = ["dsbi"]
BATCH_CATEGORIES = ["deepspeed", "inference"]
BATCH_CRD_NAME = f"{BATCH_PLURAL}.{GROUP}"
#: On every child of a DeepSpeedBatchInference (RayJob, progress ConfigMap, RBAC, pods).
LABEL_BATCH = "deepspeed.ai/batch"

# --- KubeRay ---------------------------------------------------------------------------------
RAY_GROUP = "ray.io"
RAY_VERSION_API = "v1"
RAY_API_VERSION = f"{RAY_GROUP}/{RAY_VERSION_API}"
RAYSERVICE_KIND = "RayService"
RAYSERVICE_PLURAL = "rayservices"
RAYJOB_KIND = "RayJob"
RAYJOB_PLURAL = "rayjobs"
#: Ray version of the worker image; KubeRay uses it to pick ray start flags.
RAY_VERSION = "2.60.0"
#: Label KubeRay puts on every pod with the worker group's name.
RAY_GROUP_LABEL = "ray.io/group"
#: Label KubeRay puts on every pod with the node type (head / worker).
RAY_NODE_TYPE_LABEL = "ray.io/node-type"

# --- Labels on every child -------------------------------------------------------------------
LABEL_PREFIX = "deepspeed.ai/"
LABEL_INFERENCE = "deepspeed.ai/inference"
LABEL_GROUP = "deepspeed.ai/group"
#: On a worker pod: its first rank (the only one when ranksPerPod is 1).
LABEL_RANK = "deepspeed.ai/rank"
#: On a worker pod holding several ranks (ranksPerPod > 1): its index within the group.
#: Absent on one-rank pods, whose index is their rank (so their templates stay as before).
LABEL_POD = "deepspeed.ai/pod"
LABEL_ROLE = "deepspeed.ai/role"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "dsi-operator"
ROLE_HEAD = "head"
ROLE_WORKER = "worker"
ROLE_MASTER_SERVICE = "master"
ROLE_ENDPOINT = "endpoint"
ROLE_NETWORK_POLICY = "rank-policy"

#: Annotation on each worker pod template: hash of everything group g's pods are rendered from,
#: so the controller can tell stale pods after a spec change.
ANNOTATION_GROUP_HASH = "deepspeed.ai/group-hash"
#: Annotation on the RayService: hash of the whole rendered spec.
ANNOTATION_SPEC_HASH = "deepspeed.ai/spec-hash"
#: On the RayService once it carries groups scaled away: how many groups it carries.
ANNOTATION_GROUP_CAPACITY = "deepspeed.ai/group-capacity"
#: On the head pod template (and so the head pod): hash of the head's template.
ANNOTATION_HEAD_HASH = "deepspeed.ai/head-hash"
#: On the RayService: the template hash each group's worker groups carry now and the Serve
#: shape (model, TP size...) they were rendered under ("0=<h>/<shape>,1=..."), and the head's
#: template hash: during a rollout some groups are still at the previous spec.
ANNOTATION_GROUP_HASHES = "deepspeed.ai/group-hashes"
ANNOTATION_RS_HEAD_HASH = "deepspeed.ai/head-template"
#: On a RayCluster: changed when a restart waits too long for KubeRay's pods, so KubeRay
#: reconciles it again (see dsi_operator.serving.plan.NUDGE_AFTER_SECONDS).
ANNOTATION_NUDGE = "deepspeed.ai/nudge"

# --- Worker pod contents ---------------------------------------------------------------------
WORKER_CONTAINER = "ray-worker"
HEAD_CONTAINER = "ray-head"
MASTER_PORT_NAME = "dist"
SHM_VOLUME = "dshm"
MODEL_VOLUME = "model"
#: Where a model PVC is mounted in the head and worker pods (read only).
MODEL_MOUNT_PATH = "/mnt/model"
#: Ray Serve's HTTP port; KubeRay's serve Service targets it.
DEFAULT_SERVE_PORT = 8000
DEFAULT_MASTER_PORT = 29500
#: The Serve application every RayService runs.
SERVE_APP_NAME = "dsi"
SERVE_IMPORT_PATH = "dsi_worker.app:build_app"
SERVE_INGRESS_DEPLOYMENT = "ingress"


# Kueue's plain-pod group integration (kueue.x-k8s.io, pod integration).
KUEUE_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_NAME = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_TOTAL_COUNT = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_POD_GROUP_SERVING = "kueue.x-k8s.io/pod-group-serving"


def kueue_pod_group_name(name: str, group: int) -> str:
    """Kueue pod group (and Workload) name of group ``group``: ``<name>-g<g>``."""
    return f"{name}-g{group}"


def serve_group_deployment(group: int) -> str:
    """The Serve deployment of TP group ``group`` (built by ``dsi_worker.app``)."""
    return f"group-{group}"


def rayservice_name(name: str) -> str:
    """Name of the RayService rendered for DSI ``name`` (the same name)."""
    return name


def master_service_name(name: str, group: int) -> str:
    """Name of group ``group``'s headless master Service."""
    return f"{name}-g{group}-master"


def network_policy_name(name: str, group: int) -> str:
    """Name of group ``group``'s NetworkPolicy (spec.networkPolicy.enabled)."""
    return f"{name}-g{group}-ranks"


def master_addr(name: str, namespace: str, group: int) -> str:
    """MASTER_ADDR of group ``group``: DNS of its headless Service, stable across restarts."""
    return f"{master_service_name(name, group)}.{namespace}.svc.cluster.local"


def endpoint_service_name(name: str) -> str:
    """The operator's endpoint Service: it selects the Ray head once Serve's proxy is up.

    Not KubeRay's ``<name>-serve-svc``: that one also selects every worker pod, and Ray
    Serve runs a proxy only on nodes that host a Serve replica, so a worker that holds only
    a rank actor has nothing listening on the serve port.
    """
    return f"{name}-api"


def endpoint_url(name: str, namespace: str, port: int = DEFAULT_SERVE_PORT) -> str:
    """In-cluster URL of the model endpoint (the operator's endpoint Service)."""
    return f"http://{endpoint_service_name(name)}.{namespace}.svc.cluster.local:{port}"


#: Ray resource the head declares: the app's ingress and group deployments ask for a sliver
#: of it, so they live on the head and never die with a group's rank pods.
HEAD_RAY_RESOURCE = "dsi_head"


def worker_group_name(group: int, rank: int) -> str:
    """KubeRay worker group name of the pod whose first rank is ``rank`` in TP group ``group``
    (the pod of that rank alone when ranksPerPod is 1)."""
    return f"g{group}-r{rank}"


_WORKER_GROUP_RE = re.compile(r"^g(\d+)-r(\d+)$")


def parse_worker_group_name(group_name: str) -> tuple[int, int] | None:
    """Inverse of :func:`worker_group_name`; ``None`` for any other name (e.g. the head)."""
    m = _WORKER_GROUP_RE.match(group_name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def ray_resource_name(group: int, rank: int) -> str:
    """Ray custom resource that pins rank ``rank`` of group ``group`` to its pod."""
    return f"dsi_g{group}_r{rank}"


def child_labels(
    name: str,
    *,
    role: str | None = None,
    group: int | None = None,
    rank: int | None = None,
    pod: int | None = None,
) -> dict[str, str]:
    """The labels every child of DSI ``name`` carries (plus group/rank/pod/role when given)."""
    labels = {LABEL_INFERENCE: name, LABEL_MANAGED_BY: MANAGED_BY}
    if role is not None:
        labels[LABEL_ROLE] = role
    if group is not None:
        labels[LABEL_GROUP] = str(group)
    if rank is not None:
        labels[LABEL_RANK] = str(rank)
    if pod is not None:
        labels[LABEL_POD] = str(pod)
    return labels


def selector_for(name: str, *, group: int | None = None, rank: int | None = None) -> str:
    """A label selector string for the worker pods of DSI ``name`` (optionally one group/rank)."""
    parts = [f"{LABEL_INFERENCE}={name}", f"{LABEL_ROLE}={ROLE_WORKER}"]
    if group is not None:
        parts.append(f"{LABEL_GROUP}={group}")
    if rank is not None:
        parts.append(f"{LABEL_RANK}={rank}")
    return ",".join(parts)


def group_of_pod(labels: Mapping[str, str] | None) -> tuple[int, int] | None:
    """(group, pod index within the group) of a worker pod from its labels; ``None`` for the
    head or foreign pods. The index is the rank on one-rank pods."""
    gr = _group_and_rank(labels)
    if gr is None:
        return None
    pod = (labels or {}).get(LABEL_POD)
    if pod is None:
        return gr
    return (gr[0], int(pod)) if pod.isdigit() else None


def _group_and_rank(labels: Mapping[str, str] | None) -> tuple[int, int] | None:
    """(group, rank) of a worker pod from its labels; ``None`` for the head or foreign pods."""
    if not labels:
        return None
    if labels.get(LABEL_ROLE, ROLE_WORKER) != ROLE_WORKER:
        return None
    g, r = labels.get(LABEL_GROUP), labels.get(LABEL_RANK)
    if g is None or r is None or not g.isdigit() or not r.isdigit():
        return None
    return int(g), int(r)


# --- Batch children ---------------------------------------------------------------------------
#: Where the batch input / output PVCs are mounted in the head and worker pods.
BATCH_INPUT_MOUNT_PATH = "/mnt/dsi-input"
BATCH_OUTPUT_MOUNT_PATH = "/mnt/dsi-output"
BATCH_INPUT_VOLUME = "dsi-input"
BATCH_OUTPUT_VOLUME = "dsi-output"
#: The job's arguments (JSON) in its runtime env; read by ``python -m dsi_worker.batch``.
BATCH_ARGS_ENV = "DSI_BATCH_ARGS"
#: The ConfigMap the job driver writes its progress to (name in this env var).
BATCH_PROGRESS_ENV = "DSI_PROGRESS_CONFIGMAP"
BATCH_NAMESPACE_ENV = "DSI_NAMESPACE"
BATCH_ENTRYPOINT = "python -m dsi_worker.batch"


def rayjob_name(name: str) -> str:
    """Name of the RayJob rendered for DeepSpeedBatchInference ``name`` (the same name)."""
    return name


def batch_progress_name(name: str) -> str:
    """The ConfigMap the job of batch ``name`` writes its progress to."""
    return f"{name}-progress"


def batch_account_name(name: str) -> str:
    """ServiceAccount, Role and RoleBinding that let batch ``name``'s driver write progress."""
    return f"{name}-batch"


def batch_labels(name: str) -> dict[str, str]:
    """The labels every child of batch ``name`` carries."""
    return {LABEL_BATCH: name, LABEL_MANAGED_BY: MANAGED_BY}
