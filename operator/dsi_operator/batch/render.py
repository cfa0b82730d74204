"""Render a DeepSpeedBatchInference into its children (pure).

Children: a KubeRay ``RayJob`` whose Ray cluster is rendered by the serving renderer (same
head, same one-Ray-resource-per-rank worker groups, same GPU prerequisites and rank env), one
headless rendezvous Service per group, and the progress ConfigMap with the ServiceAccount,
Role and RoleBinding that let the job's driver (on the head) write it and nothing else.

The batch pods carry ``deepspeed.ai/batch`` instead of ``deepspeed.ai/inference``: the serving
controller indexes pods by the latter, and a batch run's pods must never count as a serving
resource's (both kinds may even share a name). Rendezvous Services are ``<name>-g<g>-rdzv``
for the same reason (serving's are ``-master``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import yaml

from dsi_operator.api import labels as L
from dsi_operator.api.batch_spec import DeepSpeedBatchInferenceSpec, parse_batch_spec
from dsi_operator.api.spec import ClusterSpec, DeepSpeedInferenceSpec
from dsi_operator.serving.render import (
    Manifest,
    head_group_spec,
    model_location,
    owner_reference,
    raylet_probe,
    render_master_service,
    worker_group_specs,
)


def cluster_view(s: DeepSpeedBatchInferenceSpec) -> DeepSpeedInferenceSpec:
    """The batch spec's cluster fields as a serving spec, for the shared pod renderers (the
    serving-only fields keep their defaults and are not rendered into batch pods)."""
    shared = s.model_dump(mode="json", include=set(ClusterSpec.model_fields))
    return DeepSpeedInferenceSpec.model_validate(shared)


def rendezvous_service_name(name: str, group: int) -> str:
    """Headless Service of group ``group``'s rank 0 (its MASTER_ADDR)."""
    return f"{name}-g{group}-rdzv"


def _data_path(claim: str | None, path: str, mount: str) -> str:
    if claim is None:
        return path
    rel = path.strip("/")
    return f"{mount}/{rel}" if rel else mount


def batch_args(s: DeepSpeedBatchInferenceSpec) -> dict[str, Any]:
    """``DSI_BATCH_ARGS`` of the job (snake_case, as ``dsi_worker.batch``'s BatchArgs)."""
    inp, out, gen = s.input, s.output, s.generation
    args: dict[str, Any] = {
        "model": model_location(cluster_view(s)),
        "dtype": s.model.dtype.value,
        "tensor_parallel_size": s.tensor_parallel_size,
        "num_groups": s.replicas,
        "device": "cuda" if s.resources.gpus > 0 else "cpu",
        "input": {
            "path": _data_path(inp.claim_name, inp.path, L.BATCH_INPUT_MOUNT_PATH),
            "format": inp.format,
            "prompt_column": inp.prompt_column,
            "id_column": inp.id_column,
        },
        "output": {
            "path": _data_path(out.claim_name, out.path, L.BATCH_OUTPUT_MOUNT_PATH),
            "format": out.format,
        },
        "generation": {
            "max_tokens": gen.max_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "seed": gen.seed,
        },
        "batch_size": s.batch_size,
        "rows_per_shard": s.rows_per_shard,
        "max_group_restarts": s.restart_policy.max_group_restarts,
    }
    if s.ranks_per_pod > 1:
        args["ranks_per_pod"] = s.ranks_per_pod
    if s.model.revision is not None and s.model.pvc is None:
        args["revision"] = s.model.revision
    return args


def _relabel(obj: Any) -> Any:
    """``obj`` with every ``deepspeed.ai/inference`` label key (labels, selectors, affinity
    terms) renamed to ``deepspeed.ai/batch`` (see the module docstring)."""
    if isinstance(obj, dict):
        return {
            (L.LABEL_BATCH if k == L.LABEL_INFERENCE else k): _relabel(v) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_relabel(v) for v in obj]
    return obj


def _data_volumes(s: DeepSpeedBatchInferenceSpec) -> tuple[list[Any], list[Any]]:
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for loc, vol, mount, read_only in (
        (s.input, L.BATCH_INPUT_VOLUME, L.BATCH_INPUT_MOUNT_PATH, True),
        (s.output, L.BATCH_OUTPUT_VOLUME, L.BATCH_OUTPUT_MOUNT_PATH, False),
    ):
        if loc.claim_name is None:
            continue
        claim = {"claimName": loc.claim_name, "readOnly": read_only}
        volumes.append({"name": vol, "persistentVolumeClaim": claim})
        mounts.append({"name": vol, "mountPath": mount, "readOnly": read_only})
    return volumes, mounts


def _batch_pod(
    s: DeepSpeedBatchInferenceSpec, name: str, namespace: str, group: dict[str, Any]
) -> dict[str, Any]:
    """A head or worker group of the serving renderer, made a batch one: relabelled, its
    rendezvous address the batch Service's, the data volumes mounted, and (head) the
    driver's ServiceAccount."""
    group = _relabel(group)
    meta = group["template"]["metadata"]
    # A batch group's pods do finish: Kueue may release their quota when they exit.
    meta.get("annotations", {}).pop(L.KUEUE_POD_GROUP_SERVING, None)
    pod = group["template"]["spec"]
    volumes, mounts = _data_volumes(s)
    if volumes:
        pod["volumes"] = [*pod.get("volumes", []), *volumes]
    for c in pod["containers"]:
        if mounts:
            c["volumeMounts"] = [*c.get("volumeMounts", []), *copy.deepcopy(mounts)]
        for var in c.get("env", []):
            if var["name"] == "MASTER_ADDR":
                g = int(meta["labels"][L.LABEL_GROUP])
                var["value"] = f"{rendezvous_service_name(name, g)}.{namespace}.svc.cluster.local"
    pod["serviceAccountName"] = s.pod_template.service_account_name or L.batch_account_name(name)
    if L.LABEL_GROUP in meta["labels"]:
        # Ready = raylet up (KubeRay's own worker probe), not serving's "rank formed": KubeRay
        # submits the job only once every pod is Ready, and the ranks form inside the job.
        for c in pod["containers"]:
            c["readinessProbe"] = raylet_probe(initial_delay=10, failure_threshold=10)
    return group


def runtime_env(s: DeepSpeedBatchInferenceSpec, name: str, namespace: str) -> dict[str, Any]:
    """The job's Ray runtime env: its arguments and where to report progress."""
    return {
        "env_vars": {
            L.BATCH_ARGS_ENV: json.dumps(batch_args(s), sort_keys=True),
            L.BATCH_PROGRESS_ENV: L.batch_progress_name(name),
            L.BATCH_NAMESPACE_ENV: namespace,
        }
    }


def render_rayjob(name: str, namespace: str, uid: str, s: DeepSpeedBatchInferenceSpec) -> Manifest:
    """The RayJob ``<name>``: the Ray cluster, the entrypoint and its retry budget."""
    view = cluster_view(s)
    head = head_group_spec(view, name)
    # The driver runs on the head (Ray Data's planning); Serve's port is not needed there.
    head["template"]["spec"]["containers"][0]["ports"] = [
        p for p in head["template"]["spec"]["containers"][0]["ports"] if p["name"] != "serve"
    ]
    workers = worker_group_specs(view, name, namespace)
    spec: dict[str, Any] = {
        # KubeRay submits the job to the head's dashboard itself. The default (a submitter
        # Job) would add a pod KubeRay renders without the head's node selector,
        # tolerations or security context: on tainted GPU pools or in a restricted
        # namespace it would never run.
        "submissionMode": "HTTPMode",
        "entrypoint": L.BATCH_ENTRYPOINT,
        "runtimeEnvYAML": yaml.safe_dump(runtime_env(s, name, namespace), sort_keys=True),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
        "backoffLimit": s.restart_policy.max_job_retries,
        "rayClusterSpec": {
            "rayVersion": L.RAY_VERSION,
            "headGroupSpec": _batch_pod(s, name, namespace, head),
            "workerGroupSpecs": [_batch_pod(s, name, namespace, w) for w in workers],
        },
    }
    if s.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = s.active_deadline_seconds
    return {
        "apiVersion": L.RAY_API_VERSION,
        "kind": L.RAYJOB_KIND,
        "metadata": _meta(L.rayjob_name(name), namespace, name, uid),
        "spec": spec,
    }


def _meta(obj_name: str, namespace: str, owner: str, uid: str) -> dict[str, Any]:
    return {
        "name": obj_name,
        "namespace": namespace,
        "labels": L.batch_labels(owner),
        "ownerReferences": [owner_reference(owner, uid, L.BATCH_KIND)],
    }


def render_rendezvous_services(
    name: str, namespace: str, uid: str, s: DeepSpeedBatchInferenceSpec
) -> list[Manifest]:
    """One headless rendezvous Service per group (serving's master Service, relabelled)."""
    out = []
    view = cluster_view(s)
    for g in range(s.replicas):
        svc = _relabel(render_master_service(name, namespace, uid, view, g))
        svc["metadata"] = {**_meta(rendezvous_service_name(name, g), namespace, name, uid)}
        svc["metadata"]["labels"][L.LABEL_GROUP] = str(g)
        out.append(svc)
    return out


def render_progress_access(name: str, namespace: str, uid: str, account: str | None) -> list[Any]:
    """The progress ConfigMap, and the Role + RoleBinding letting the job's ServiceAccount
    (``account``, or a ServiceAccount rendered here when None) get and patch it only."""
    cm_name, rbac_name = L.batch_progress_name(name), L.batch_account_name(name)
    out: list[Manifest] = []
    if account is None:
        account = rbac_name
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _meta(account, namespace, name, uid),
            }
        )
    out.append(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(cm_name, namespace, name, uid)}
    )
    rule = {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [cm_name],
        "verbs": ["get", "patch"],
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(rbac_name, namespace, name, uid),
        "rules": [rule],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(rbac_name, namespace, name, uid),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": rbac_name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }
    return [*out, role, binding]


def render_batch_children(
    name: str, namespace: str, uid: str, s: DeepSpeedBatchInferenceSpec
) -> list[Manifest]:
    """Every child, in apply order: what the driver needs first (progress access, the
    rendezvous Services), then the RayJob."""
    return [
        *render_progress_access(name, namespace, uid, s.pod_template.service_account_name),
        *render_rendezvous_services(name, namespace, uid, s),
        render_rayjob(name, namespace, uid, s),
    ]


def render_batch_body(body: Mapping[str, Any]) -> list[Manifest]:
    """:func:`render_batch_children` from a whole object (``metadata`` + ``spec``)."""
    meta = body["metadata"]
    spec = parse_batch_spec(body["spec"])
    return render_batch_children(meta["name"], meta["namespace"], meta["uid"], spec)
