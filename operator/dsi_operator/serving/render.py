"""Pure rendering: a DeepSpeedInference spec -> the manifests of its children.

Nothing here talks to the API server. The input is the typed spec (parsed once, at the edge:
:func:`render_body` parses a whole object); outputs are plain dicts ready to create/patch.
Children of DSI ``<name>``:

- RayService ``<name>`` (ray.io/v1): head group without GPUs, and one worker group
  ``g<g>-r<r>`` (replicas 1) per pod of each TP group g, named by the pod's first rank r.
  A pod holds ``ranksPerPod`` ranks (one by default); it carries the torch.distributed env and
  one Ray custom resource ``dsi_g<g>_r<r>`` per rank it holds, which pins that rank's actor.
- Service ``<name>-g<g>-master`` per group: headless, selects the group's rank-0 pod, so
  MASTER_ADDR survives restarts of that pod.

Every child has an ownerReference to the DSI (controller, blockOwnerDeletion) and the
``deepspeed.ai/*`` labels; no kopf annotation is ever copied.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

from dsi_operator.api import labels as L
from dsi_operator.api.quantity import scale_quantity
from dsi_operator.api.spec import DeepSpeedInferenceSpec, SecurityLevel, parse_spec

Manifest = dict[str, Any]

#: Environment variables the operator owns on worker pods; user env cannot override them.
#: Environment variable of the head container that holds the endpoint's API key (from
#: spec.serve.apiKeySecret); the Serve ingress, which runs on the head, reads it.
API_KEY_ENV = "DSI_API_KEY"
RANK_ENV_NAMES = frozenset(
    {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "LOCAL_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES",
        "MASTER_PORT",
        "DSI_GROUP",
        "DSI_INFERENCE",
        "DSI_READY_FILE",
        API_KEY_ENV,
    }
)
#: NCCL/torch defaults for worker pods; spec.env may override any of them.
NCCL_DEFAULTS: dict[str, str] = {
    "NCCL_DEBUG": "WARN",
    # A rank that dies must make its peers' collectives fail instead of hanging forever, so
    # the group's pods exit/turn unready and the operator restarts the whole group.
    # (The old NCCL_ASYNC_ERROR_HANDLING name is deprecated in torch and only warns.)
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}

# Ray head ports (KubeRay's defaults, named as KubeRay expects).
_HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))
# Ray's dashboard agent (the raylet health endpoint), the same port on every Ray node.
RAY_AGENT_PORT = 52365
#: The rank actor holds an exclusive flock on this file once its group has formed (see
#: dsi_worker.readiness); on the shared-memory emptyDir, so it is fresh per pod and writable
#: under a read-only root filesystem.
READY_FILE = "/dev/shm/dsi-rank-formed.lock"
#: flock's exit code when the lock is taken (``-E``): distinct from "flock not found" (127)
#: and from an error, so only a held lock reads as ready.
_LOCK_HELD_EXIT = 75


# --- Small pure helpers (also used by the controller) ----------------------------------------


def owner_reference(name: str, uid: str, kind: str = L.KIND) -> dict[str, Any]:
    """ownerReference making the ``kind`` (default DSI) ``name``/``uid`` the controlling
    owner of a child."""
    return {
        "apiVersion": L.API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def expected_pods(s: DeepSpeedInferenceSpec) -> list[tuple[int, int]]:
    """Every (group, pod index) the spec asks for, in order (pod = rank at one rank per pod)."""
    return [(g, p) for g in range(s.replicas) for p in range(s.pods_per_group)]


def model_location(s: DeepSpeedInferenceSpec) -> str:
    """What the worker loads: the hub id, or the model directory inside the mounted PVC."""
    if s.model.pvc is not None:
        path = s.model.pvc.path.strip("/")
        return f"{L.MODEL_MOUNT_PATH}/{path}" if path else L.MODEL_MOUNT_PATH
    assert s.model.name is not None  # ModelSpec guarantees exactly one source
    return s.model.name


def group_capacity(s: DeepSpeedInferenceSpec, previous: int = 0) -> int:
    """Groups the RayService carries: ``replicas``, or more after a scale-down.

    Capacity only grows: a removed group stays as worker groups at 0 replicas and a switched
    off Serve deployment, because removing either is not in place (KubeRay makes a new
    RayCluster when worker groups disappear; Serve replaces every replica when the app's
    ``num_groups`` arg changes). ``previous`` is what the current RayService carries.
    """
    return max(s.replicas, previous)


def serve_app_args(s: DeepSpeedInferenceSpec, capacity: int = 0) -> dict[str, Any]:
    """``args`` of the Serve application (snake_case, as ``dsi_worker.config.AppArgs``)."""
    args: dict[str, Any] = {
        "model": model_location(s),
        "dtype": s.model.dtype.value,
        # Deployments built; which of them serve is user_config (see serve_config).
        "num_groups": max(group_capacity(s, capacity), 1),
        "max_batch_size": s.serve.max_batch_size,
        "batch_wait_timeout_s": s.serve.batch_wait_timeout_ms / 1000.0,
        "max_new_tokens": s.serve.max_new_tokens,
        "kernel_inject": s.serve.kernel_inject,
        "served_model_name": s.served_model_name,
        "request_timeout_s": float(s.serve.request_timeout_seconds),
        "form_timeout_s": float(s.restart_policy.formation_timeout_seconds),
        "device": "cuda" if s.resources.gpus > 0 else "cpu",
        "control_resource": L.HEAD_RAY_RESOURCE,
    }
    if s.model.revision is not None and s.model.pvc is None:
        args["revision"] = s.model.revision
    if s.serve.max_model_len is not None:
        args["max_model_len"] = s.serve.max_model_len
    if s.serve.api_key_secret is not None:
        # The name of the variable, not the key: serveConfigV2 is readable by anyone who can
        # read the RayService.
        args["api_key_env"] = API_KEY_ENV
    return args


#: (tensor_parallel_size, ranks_per_pod) of one group.
GroupShape = tuple[int, int]


def serve_deployment_overrides(
    s: DeepSpeedInferenceSpec, capacity: int, shapes: Mapping[int, GroupShape] | None = None
) -> list[dict[str, Any]]:
    """Per-deployment ``user_config``: which groups are on, and each group's TP shape.

    Serve applies a changed ``user_config`` by calling the replica's ``reconfigure`` (the
    app's code version hashes only import path, runtime_env and args), so the groups whose
    config stays keep their rank actors and loaded model. The TP shape is per group, not an
    app arg, so a TP-size change reaches one group at a time (``shapes``: the groups a rollout
    has not replaced yet keep theirs).
    """
    shapes = shapes or {}
    out: list[dict[str, Any]] = []
    for g in range(capacity):
        tp, k = shapes.get(g, (s.tensor_parallel_size, s.ranks_per_pod))
        config: dict[str, Any] = {"active": g < s.replicas, "tensor_parallel_size": tp}
        if k > 1:
            config["ranks_per_pod"] = k
        out.append({"name": L.serve_group_deployment(g), "user_config": config})
    out.append({"name": L.SERVE_INGRESS_DEPLOYMENT, "user_config": {"active_groups": s.replicas}})
    return out


def serve_config(
    s: DeepSpeedInferenceSpec, capacity: int = 0, shapes: Mapping[int, GroupShape] | None = None
) -> dict[str, Any]:
    """The RayService's serveConfigV2, as a dict (rendered as YAML text into the RayService).

    ``capacity``: the group capacity recorded on the current RayService (0: none recorded);
    ``shapes``: groups whose TP shape is not the spec's yet (a rollout in progress).
    """
    app: dict[str, Any] = {
        "name": L.SERVE_APP_NAME,
        "import_path": L.SERVE_IMPORT_PATH,
        "route_prefix": s.serve.route_prefix,
        "args": serve_app_args(s, capacity),
        "deployments": serve_deployment_overrides(s, group_capacity(s, capacity), shapes),
    }
    config: dict[str, Any] = {"applications": [app]}
    if s.serve.port != L.DEFAULT_SERVE_PORT:
        config["http_options"] = {"host": "0.0.0.0", "port": s.serve.port}
    return config


def worker_group_shape(workers: list[dict[str, Any]]) -> GroupShape | None:
    """(tensor_parallel_size, ranks_per_pod) of one group's worker groups, from the ranks
    each pins (``rayStartParams.resources``); None when they do not say."""
    counts: list[int] = []
    for w in workers:
        raw = str((w.get("rayStartParams") or {}).get("resources", "")).strip("'\"")
        try:
            counts.append(len(json.loads(raw)))
        except ValueError:
            return None
    return (sum(counts), counts[0]) if counts and counts[0] else None


def ray_resources_param(group: int, ranks: range) -> str:
    """rayStartParams ``resources`` value pinning ranks ``ranks`` of group ``group`` to a pod.

    KubeRay pastes the value verbatim into the ``ray start`` shell command, and (1.6+) also
    parses it as JSON after trimming surrounding quotes. A single-quoted JSON object,
    ``'{"dsi_g0_r1": 1}'``, satisfies both (KubeRay writes this form itself); the older
    ``"{\\"...\\"}"`` form works in the shell but fails KubeRay's JSON parse.
    """
    return "'" + json.dumps({L.ray_resource_name(group, r): 1 for r in ranks}) + "'"


def _hash(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


# Placeholders for hashing: the name and namespace of one object never change, so rendering
# with fixed stand-ins gives the same change detection without needing them as arguments.
_HASH_NAME, _HASH_NAMESPACE = "dsi", "ns"


def _group_hashes(workers: list[dict[str, Any]]) -> dict[int, str]:
    """Group g -> hash of group g's own worker groups (without the hash annotation).

    The RayService carries ``upgradeStrategy: None``, so KubeRay never replaces pods after a
    spec change; the operator replaces the pods of a group whose hash changed, group by group
    (:mod:`dsi_operator.serving.rollout`). A group's hash depends on nothing but its own templates.
    """
    by_group: dict[int, list[dict[str, Any]]] = {}
    for w in workers:
        parsed = L.parse_worker_group_name(w["groupName"])
        assert parsed is not None
        by_group.setdefault(parsed[0], []).append(w)
    return {g: _hash({"rayVersion": L.RAY_VERSION, "workers": ws}) for g, ws in by_group.items()}


def spec_hash_by_group(s: DeepSpeedInferenceSpec, groups: int | None = None) -> dict[int, str]:
    """Per group g (of ``groups``, default ``replicas``): a hash of the worker pod templates
    g's pods are created from.

    A changed hash means g's pods must be replaced (the rollout does it); an equal one means
    they stay. The value is also on each worker pod template as annotation
    ``deepspeed.ai/group-hash``, so every pod says which template it came from. Changes that
    stay out of the pod templates (serve settings, restartPolicy, rollout) keep every hash;
    adding groups keeps the existing groups' hashes.
    """
    workers = [
        _worker_group_spec(s, _HASH_NAME, _HASH_NAMESPACE, g, p)
        for g in range(s.replicas if groups is None else groups)
        for p in range(s.pods_per_group)
    ]
    return _group_hashes(workers)


def head_hash(s: DeepSpeedInferenceSpec) -> str:
    """Hash of the head's template (annotation ``deepspeed.ai/head-hash`` on the head pod)."""
    return _hash({"rayVersion": L.RAY_VERSION, "head": head_group_spec(s, _HASH_NAME)})


#: The Serve app arguments every group shares: a change of one reaches all groups at once (the
#: TP shape is per group, see serve_deployment_overrides).
_SHAPE_ARGS = (
    "model",
    "dtype",
    "revision",
    "device",
    "kernel_inject",
    "max_model_len",
)


def serve_shape_hash(s: DeepSpeedInferenceSpec) -> str:
    """Hash of the Serve app arguments that shape a group (see ``_SHAPE_ARGS``)."""
    args = serve_app_args(s)
    return _hash({k: args.get(k) for k in _SHAPE_ARGS})


def spec_hash(s: DeepSpeedInferenceSpec) -> str:
    """Hash of the whole spec (annotation on the RayService)."""
    return _hash(s.model_dump(mode="json", by_alias=True))


# --- Pod templates ---------------------------------------------------------------------------


def _quantity_resources(
    cpu: str | None, memory: str | None, extra: Mapping[str, str] | None = None
) -> dict[str, Any]:
    amounts: dict[str, Any] = {}
    if cpu is not None:
        amounts["cpu"] = cpu
    if memory is not None:
        amounts["memory"] = memory
    for key, value in (extra or {}).items():
        amounts[key] = value
    if not amounts:
        return {}
    # requests == limits: Guaranteed QoS for the ranks, and extended resources need both.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _user_env(s: DeepSpeedInferenceSpec, *, reserved: frozenset[str]) -> list[dict[str, Any]]:
    out = []
    for var in s.env:
        if var.name in reserved:
            continue
        out.append(var.model_dump(mode="json", by_alias=True, exclude_none=True))
    return out


def _pod_metadata(
    s: DeepSpeedInferenceSpec, own: dict[str, str], annotations: Mapping[str, str]
) -> dict[str, Any]:
    # User labels first so the operator's own labels win on conflict.
    labels = {**s.pod_template.labels, **own}
    meta: dict[str, Any] = {"labels": labels}
    merged_annotations = {**s.pod_template.annotations, **annotations}
    if merged_annotations:
        meta["annotations"] = merged_annotations
    return meta


#: PodSecurity "restricted": what every pod and container must set (the rest of the level,
#: e.g. volume types and no host namespaces, the rendered pods meet anyway).
_RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
_RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _restrict(s: DeepSpeedInferenceSpec, container: dict[str, Any]) -> dict[str, Any]:
    """The container with the restricted level's settings when the spec asks for them.

    KubeRay copies the ray container's securityContext to the init container it injects, so
    setting it here covers that one too.
    """
    if s.pod_template.security_level == SecurityLevel.restricted:
        container["securityContext"] = copy.deepcopy(_RESTRICTED_CONTAINER)
    return container


def _pod_spec_common(s: DeepSpeedInferenceSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {}
    pt = s.pod_template
    if pt.security_level == SecurityLevel.restricted:
        pod["securityContext"] = copy.deepcopy(_RESTRICTED_POD)
    if pt.service_account_name:
        pod["serviceAccountName"] = pt.service_account_name
    if pt.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in pt.image_pull_secrets]
    if pt.priority_class_name:
        pod["priorityClassName"] = pt.priority_class_name
    return pod


def _model_volume(s: DeepSpeedInferenceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if s.model.pvc is None:
        return [], []
    volume = {
        "name": L.MODEL_VOLUME,
        "persistentVolumeClaim": {"claimName": s.model.pvc.claim_name, "readOnly": True},
    }
    mount = {"name": L.MODEL_VOLUME, "mountPath": L.MODEL_MOUNT_PATH, "readOnly": True}
    return [volume], [mount]


# The head holds no rank: on GPU nodes it would only take CPU and memory from ranks.
_AVOID_GPU_NODES = {
    "preferredDuringSchedulingIgnoredDuringExecution": [
        {
            "weight": 100,
            "preference": {
                "matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]
            },
        }
    ]
}


def _place_head(s: DeepSpeedInferenceSpec, pod_spec: dict[str, Any]) -> None:
    if s.head.node_selector:
        pod_spec["nodeSelector"] = dict(s.head.node_selector)
    else:
        pod_spec["affinity"] = {"nodeAffinity": copy.deepcopy(_AVOID_GPU_NODES)}
    if s.head.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in s.head.tolerations
        ]


def ready_files(ranks_per_pod: int) -> list[str]:
    """The lock file of each rank a pod holds: :data:`READY_FILE`, or ``READY_FILE.<local
    rank>`` on a pod of several ranks (dsi_worker.readiness applies the same rule)."""
    if ranks_per_pod == 1:
        return [READY_FILE]
    return [f"{READY_FILE}.{i}" for i in range(ranks_per_pod)]


def formed_probe(ranks_per_pod: int = 1) -> dict[str, Any]:
    """Readiness of a rank pod: each of its rank actors has formed the group and loaded its
    shard.

    True while a process holds the lock on each of :func:`ready_files`. The raylet is
    implied: Ray's workers exit with their raylet, and the locks with them. Cheap and local, so
    it runs every 2 s and one miss turns the pod unready: the group leaves READY within seconds
    of a rank dying or Serve re-forming it, instead of when KubeRay next reports Serve health.
    """
    checks = [
        f"flock -n -E {_LOCK_HELD_EXIT} {f} true; test $? -eq {_LOCK_HELD_EXIT}"
        for f in ready_files(ranks_per_pod)
    ]
    # One file keeps the exact command one-rank pods always had, so their templates (and
    # group hashes) do not change.
    check = checks[0] if len(checks) == 1 else " && ".join(f"{{ {c}; }}" for c in checks)
    return {
        "exec": {"command": ["bash", "-c", check]},
        "periodSeconds": 2,
        "timeoutSeconds": 2,
        "failureThreshold": 1,
    }


def raylet_probe(initial_delay: int, failure_threshold: int) -> dict[str, Any]:
    """Liveness of a worker container: its raylet is healthy (via the Ray dashboard agent).

    Rendered by the operator (with :func:`formed_probe` for readiness) so KubeRay does not add
    its RayService worker probes, which also require a Serve proxy on the node: Serve runs
    proxies only where a replica lives, so a pod holding only a rank actor would never
    become Ready.
    """
    check = (
        f"wget --tries 1 -T 2 -q -O- http://localhost:{RAY_AGENT_PORT}/api/local_raylet_healthz"
        " | grep success"
    )
    return {
        "exec": {"command": ["bash", "-c", check]},
        "initialDelaySeconds": initial_delay,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": failure_threshold,
    }


def head_group_spec(s: DeepSpeedInferenceSpec, name: str) -> dict[str, Any]:
    """KubeRay headGroupSpec: Ray GCS, Serve controller and proxy; no GPUs, no rank actors."""
    volumes, mounts = _model_volume(s)
    container: dict[str, Any] = {
        "name": L.HEAD_CONTAINER,
        "image": s.head.image or s.image,
        "ports": [{"name": n, "containerPort": p} for n, p in _HEAD_PORTS]
        + [{"name": "serve", "containerPort": s.serve.port}],
        "resources": _quantity_resources(s.head.resources.cpu, s.head.resources.memory),
    }
    if s.image_pull_policy:
        container["imagePullPolicy"] = s.image_pull_policy
    env = _user_env(s, reserved=RANK_ENV_NAMES)
    secret = s.serve.api_key_secret
    if secret is not None:
        ref = {"name": secret.name, "key": secret.key}
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": ref}})
    if env:
        container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {"containers": [_restrict(s, container)], **_pod_spec_common(s)}
    if volumes:
        pod_spec["volumes"] = volumes
    _place_head(s, pod_spec)
    group: dict[str, Any] = {
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",
            # No CPU-requesting task or actor lands on the head, which keeps it (often a small
            # CPU node) free for the GCS, Serve controller and proxy. Rank actors are pinned to
            # worker pods by their custom resources; the app's ingress and group deployments
            # request 0 CPUs and may run here (the model PVC is mounted here for the tokenizer).
            "num-cpus": "0",
            "num-gpus": "0",
            # The ingress and group deployments run here (see dsi_worker's control_resource):
            # a group's Serve replica must not live on another group's rank pod, or that
            # group's restart would take this one down too.
            "resources": "'" + json.dumps({L.HEAD_RAY_RESOURCE: 1000}) + "'",
        },
        "template": {
            "metadata": _pod_metadata(s, L.child_labels(name, role=L.ROLE_HEAD), {}),
            "spec": pod_spec,
        },
    }
    if s.head.service_type:
        group["serviceType"] = s.head.service_type
    return group


def _rank_env(s: DeepSpeedInferenceSpec, pod: int) -> list[dict[str, Any]]:
    """The rank coordinates of pod ``pod`` of a group.

    One rank per pod: RANK is the pod's, LOCAL_RANK 0 (it sees its GPUs as cuda:0..), and
    LOCAL_SIZE is not set (see DESIGN: DeepSpeed's CPU shm all-reduce needs every rank on one
    host). Several: RANK and LOCAL_RANK differ per process, so the pod says where its ranks
    start, torchrun's way (NODE_RANK x LOCAL_WORLD_SIZE + LOCAL_RANK), and the group
    deployment gives each rank actor its RANK and LOCAL_RANK (dsi_worker.group.rank_env).
    """
    world = {"name": "WORLD_SIZE", "value": str(s.tensor_parallel_size)}
    k = s.ranks_per_pod
    if k == 1:
        return [{"name": "RANK", "value": str(pod)}, world, {"name": "LOCAL_RANK", "value": "0"}]
    env = [
        world,
        {"name": "NODE_RANK", "value": str(pod)},
        {"name": "LOCAL_WORLD_SIZE", "value": str(k)},
        # DeepSpeed's name for the same: with every rank of the group in this pod it turns
        # on its shared-memory all-reduce on CPU.
        {"name": "LOCAL_SIZE", "value": str(k)},
    ]
    if s.resources.gpus > 0:
        # Every rank process sees all of the pod's GPUs and uses cuda:LOCAL_RANK, as under
        # DeepSpeed's launcher or torchrun: DeepSpeed's InferenceEngine calls
        # set_device(LOCAL_RANK), which fails for LOCAL_RANK > 0 in a process that Ray has
        # limited to its one GPU. Ray still counts one GPU per rank actor.
        env.append({"name": "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "value": "1"})
    return env


def worker_env(
    s: DeepSpeedInferenceSpec, name: str, namespace: str, group: int, pod: int
) -> list[dict[str, Any]]:
    """Env of pod ``pod`` of group ``group``: torch.distributed vars, NCCL defaults, user env."""
    env: list[dict[str, Any]] = [
        *_rank_env(s, pod),
        {"name": "MASTER_ADDR", "value": L.master_addr(name, namespace, group)},
        {"name": "MASTER_PORT", "value": str(s.master_port)},
        {"name": "DSI_GROUP", "value": str(group)},
    ]
    # No DSI_NUM_GROUPS here on purpose: the group count in every pod template would make a
    # scale-up change every existing group, and KubeRay would then replace the whole RayCluster
    # instead of appending groups. The worker gets num_groups from the serve args.
    env.append({"name": "DSI_INFERENCE", "value": name})
    env.append({"name": "DSI_READY_FILE", "value": READY_FILE})
    user = _user_env(s, reserved=RANK_ENV_NAMES)
    user_names = {v["name"] for v in user}
    env += [{"name": k, "value": v} for k, v in NCCL_DEFAULTS.items() if k not in user_names]
    return env + user


def _pod_resources(s: DeepSpeedInferenceSpec) -> dict[str, Any]:
    """requests/limits of one worker pod: ``resources`` per rank, times ranksPerPod."""
    k = s.ranks_per_pod
    gpus = s.resources.gpus * k
    extra = {s.gpu.resource_name: str(gpus)} if gpus > 0 else {}
    cpu, memory = s.resources.cpu, s.resources.memory
    return _quantity_resources(
        scale_quantity(cpu, k) if cpu is not None else None,
        scale_quantity(memory, k) if memory is not None else None,
        extra,
    )


def group_affinity(s: DeepSpeedInferenceSpec, name: str, group: int) -> dict[str, Any]:
    """Pod (anti-)affinity of group ``group``'s pods from ``spec.placement`` ({} when unset).

    The group's own pods attract each other within ``groupDomain.topologyKey`` (the first
    pod of a group may go anywhere: the scheduler lets a pod that matches its own required
    term start a domain), and pods of other groups of the same resource repel them across
    ``spreadGroups.topologyKey`` (preferred only: spreading must never leave a group Pending).
    """
    pl = s.placement
    same_group = {L.LABEL_INFERENCE: name, L.LABEL_GROUP: str(group)}
    out: dict[str, Any] = {}
    if pl.group_domain is not None:
        term = {
            "labelSelector": {"matchLabels": same_group},
            "topologyKey": pl.group_domain.topology_key,
        }
        if pl.group_domain.mode == "Required":
            out["podAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [term]}
        else:
            out["podAffinity"] = {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "podAffinityTerm": term}
                ]
            }
    if pl.spread_groups is not None:
        other_groups = {
            "matchLabels": {L.LABEL_INFERENCE: name, L.LABEL_ROLE: L.ROLE_WORKER},
            "matchExpressions": [
                {"key": L.LABEL_GROUP, "operator": "NotIn", "values": [str(group)]}
            ],
        }
        out["podAntiAffinity"] = {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "podAffinityTerm": {
                        "labelSelector": other_groups,
                        "topologyKey": pl.spread_groups.topology_key,
                    },
                }
            ]
        }
    return out


def kueue_metadata(
    s: DeepSpeedInferenceSpec, name: str, group: int
) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) that make group ``group`` one Kueue pod group ({} when unset).

    ``pod-group-serving``: a serving group never finishes, so Kueue keeps its Workload (and
    quota) across pod replacements instead of treating exited pods as a completed job.
    """
    kq = s.placement.kueue
    if kq is None:
        return {}, {}
    labels = {
        L.KUEUE_QUEUE_NAME: kq.queue_name,
        L.KUEUE_POD_GROUP_NAME: L.kueue_pod_group_name(name, group),
    }
    annotations = {
        L.KUEUE_POD_GROUP_TOTAL_COUNT: str(s.pods_per_group),
        L.KUEUE_POD_GROUP_SERVING: "true",
    }
    return labels, annotations


def _worker_group_spec(
    s: DeepSpeedInferenceSpec, name: str, namespace: str, group: int, pod: int
) -> dict[str, Any]:
    """workerGroupSpec of pod ``pod`` of group ``group`` without the group-hash annotation."""
    ranks = s.pod_ranks(pod)
    k = s.ranks_per_pod
    volumes, mounts = _model_volume(s)
    container: dict[str, Any] = {
        "name": L.WORKER_CONTAINER,
        "image": s.image,
        "env": worker_env(s, name, namespace, group, pod),
        "resources": _pod_resources(s),
        "volumeMounts": [{"name": L.SHM_VOLUME, "mountPath": "/dev/shm"}, *mounts],
        "readinessProbe": formed_probe(k),
        # KubeRay's own default: a raylet silent for 10 minutes is dead.
        "livenessProbe": raylet_probe(initial_delay=30, failure_threshold=120),
    }
    if s.image_pull_policy:
        container["imagePullPolicy"] = s.image_pull_policy
    if pod == 0:
        # The master Service targets this named port on the pod of the group's rank 0.
        container["ports"] = [{"name": L.MASTER_PORT_NAME, "containerPort": s.master_port}]
    pod_spec: dict[str, Any] = {
        "containers": [_restrict(s, container)],
        "volumes": [
            {
                "name": L.SHM_VOLUME,
                # Sized per rank: NCCL's shared-memory transport and DeepSpeed's CPU all-reduce
                # keep buffers per local rank.
                "emptyDir": {
                    "medium": "Memory",
                    "sizeLimit": scale_quantity(s.gpu.shared_memory_size, k),
                },
            },
            *volumes,
        ],
        **_pod_spec_common(s),
    }
    if s.gpu.node_selector:
        pod_spec["nodeSelector"] = dict(s.gpu.node_selector)
    if s.gpu.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in s.gpu.tolerations
        ]
    if s.gpu.runtime_class_name:
        pod_spec["runtimeClassName"] = s.gpu.runtime_class_name
    affinity = group_affinity(s, name, group)
    if affinity:
        pod_spec["affinity"] = affinity
    own_labels = L.child_labels(
        name, role=L.ROLE_WORKER, group=group, rank=ranks[0], pod=pod if k > 1 else None
    )
    kueue_labels, kueue_annotations = kueue_metadata(s, name, group)
    return {
        "groupName": L.worker_group_name(group, ranks[0]),
        "replicas": 1,
        "minReplicas": 1,
        "maxReplicas": 1,
        "rayStartParams": {
            "num-gpus": str(s.resources.gpus * k),
            "resources": ray_resources_param(group, ranks),
        },
        "template": {
            "metadata": _pod_metadata(s, {**kueue_labels, **own_labels}, kueue_annotations),
            "spec": pod_spec,
        },
    }


def worker_group_specs(
    s: DeepSpeedInferenceSpec, name: str, namespace: str, capacity: int = 0
) -> list[dict[str, Any]]:
    """Every workerGroupSpec (``g<g>-r<first rank>``, one pod each), in (group, pod) order,
    each pod template annotated with its group's ``deepspeed.ai/group-hash``; groups past
    ``replicas`` (up to the capacity, see :func:`group_capacity`) at 0 replicas."""
    cap = group_capacity(s, capacity)
    hashes = spec_hash_by_group(s, cap)
    out = []
    for g in range(cap):
        for p in range(s.pods_per_group):
            w = _worker_group_spec(s, name, namespace, g, p)
            meta = w["template"]["metadata"]
            meta["annotations"] = {
                **meta.get("annotations", {}),
                L.ANNOTATION_GROUP_HASH: hashes[g],
            }
            if g >= s.replicas:
                # A group scaled away: its template stays (so scaling back is in place for
                # KubeRay, which ignores replica counts when comparing specs), no pods.
                w.update(replicas=0, minReplicas=0, maxReplicas=0)
            out.append(w)
    return out


# --- Children --------------------------------------------------------------------------------


def _child_meta(
    obj_name: str, namespace: str, labels: dict[str, str], owner: str, uid: str
) -> dict[str, Any]:
    """metadata of a child: its name and labels, owned (controller) by DSI ``owner``."""
    return {
        "name": obj_name,
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(owner, uid)],
    }


@dataclass(frozen=True)
class Kept:
    """Templates a rollout keeps from the current RayService (see
    :mod:`dsi_operator.serving.rollout`): the groups not replaced yet, and the head until its
    turn."""

    head: dict[str, Any] | None = None  # headGroupSpec as the RayService carries it now
    groups: Mapping[int, list[dict[str, Any]]] = field(default_factory=dict)  # g -> its workers
    shapes: Mapping[int, str] = field(default_factory=dict)  # g -> serve shape it formed under


class GroupTemplate(NamedTuple):
    """What the RayService records of one group's templates (``deepspeed.ai/group-hashes``)."""

    hash: str  # deepspeed.ai/group-hash of its worker templates
    shape: str  # serve_shape_hash they were rendered under
    tp: int = 0  # tensor_parallel_size (0: not recorded)
    ranks_per_pod: int = 0


def format_group_hashes(groups: Mapping[int, GroupTemplate]) -> str:
    """``deepspeed.ai/group-hashes``: ``g=<hash>/<serve shape>/<tp>/<ranks per pod>``."""
    return ",".join(
        f"{g}={t.hash}/{t.shape}/{t.tp}/{t.ranks_per_pod}" for g, t in sorted(groups.items())
    )


def parse_group_hashes(value: str | None) -> dict[int, GroupTemplate]:
    """Inverse of :func:`format_group_hashes` (malformed entries are skipped; older values
    without the shape fields read as 0)."""
    out: dict[int, GroupTemplate] = {}
    for part in (value or "").split(","):
        g, _, rest = part.partition("=")
        fields = rest.split("/")
        if not g.isdigit() or not fields[0]:
            continue
        nums = [int(x) if x.isdigit() else 0 for x in fields[2:4]] + [0, 0]
        out[int(g)] = GroupTemplate(fields[0], fields[1] if len(fields) > 1 else "", *nums[:2])
    return out


def _mixed_workers(
    s: DeepSpeedInferenceSpec, name: str, namespace: str, capacity: int, kept: Kept
) -> tuple[list[dict[str, Any]], dict[int, GroupTemplate]]:
    """Worker groups in group order, kept groups as they are; and what each group is at."""
    shape = serve_shape_hash(s)
    by_group: dict[int, list[dict[str, Any]]] = {}
    for w in worker_group_specs(s, name, namespace, capacity):
        parsed = L.parse_worker_group_name(w["groupName"])
        assert parsed is not None
        by_group.setdefault(parsed[0], []).append(w)
    workers: list[dict[str, Any]] = []
    templates: dict[int, GroupTemplate] = {}
    for g in sorted(by_group):
        old = kept.groups.get(g) if g < s.replicas else None
        group = copy.deepcopy(old) if old else by_group[g]
        ann = group[0]["template"]["metadata"].get("annotations") or {}
        tp, k = (old and worker_group_shape(old)) or (s.tensor_parallel_size, s.ranks_per_pod)
        templates[g] = GroupTemplate(
            ann.get(L.ANNOTATION_GROUP_HASH, ""), kept.shapes.get(g, "") if old else shape, tp, k
        )
        workers.extend(group)
    return workers, templates


def render_rayservice(
    name: str,
    namespace: str,
    uid: str,
    s: DeepSpeedInferenceSpec,
    capacity: int = 0,
    kept: Kept | None = None,
) -> Manifest:
    """The RayService ``<name>`` (``capacity``: see :func:`group_capacity`; ``kept``: the
    templates a rollout in progress keeps from the current RayService)."""
    kept = kept or Kept()
    workers, templates = _mixed_workers(s, name, namespace, capacity, kept)
    shapes = {g: (t.tp, t.ranks_per_pod) for g, t in templates.items() if g in kept.groups}
    head = copy.deepcopy(kept.head) if kept.head else head_group_spec(s, name)
    if not kept.head:
        head["template"]["metadata"].setdefault("annotations", {})[L.ANNOTATION_HEAD_HASH] = (
            head_hash(s)
        )
    annotations = {
        L.ANNOTATION_SPEC_HASH: spec_hash(s),
        L.ANNOTATION_GROUP_HASHES: format_group_hashes(templates),
        L.ANNOTATION_RS_HEAD_HASH: (head["template"]["metadata"].get("annotations") or {}).get(
            L.ANNOTATION_HEAD_HASH, ""
        ),
    }
    cap = group_capacity(s, capacity)
    if cap > s.replicas or capacity:
        annotations[L.ANNOTATION_GROUP_CAPACITY] = str(cap)
    ray_cluster: dict[str, Any] = {"rayVersion": L.RAY_VERSION, "headGroupSpec": head}
    if workers:
        ray_cluster["workerGroupSpecs"] = workers
    return {
        "apiVersion": L.RAY_API_VERSION,
        "kind": L.RAYSERVICE_KIND,
        "metadata": {
            "name": L.rayservice_name(name),
            "namespace": namespace,
            "labels": L.child_labels(name),
            "annotations": annotations,
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            # KubeRay never replaces pods after a spec change (its NewCluster strategy would
            # hold a second cluster, twice the GPUs, for the whole upgrade): the operator
            # rolls the groups itself, one RayCluster throughout (dsi_operator.serving.rollout).
            "upgradeStrategy": {"type": "None"},
            "serveConfigV2": yaml.safe_dump(serve_config(s, capacity, shapes), sort_keys=False),
            "rayClusterConfig": ray_cluster,
        },
    }


def render_master_service(
    name: str, namespace: str, uid: str, s: DeepSpeedInferenceSpec, group: int
) -> Manifest:
    """Headless Service ``<name>-g<g>-master`` selecting group g's rank-0 pod."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _child_meta(
            L.master_service_name(name, group),
            namespace,
            L.child_labels(name, role=L.ROLE_MASTER_SERVICE, group=group),
            name,
            uid,
        ),
        "spec": {
            "clusterIP": "None",
            # Rank 0 listens before it is Ready (the group forms before readiness), so its
            # address must resolve while the pod is not ready yet.
            "publishNotReadyAddresses": True,
            "selector": {
                L.LABEL_INFERENCE: name,
                L.LABEL_GROUP: str(group),
                L.LABEL_RANK: "0",
                L.LABEL_ROLE: L.ROLE_WORKER,
            },
            "ports": [
                {
                    "name": L.MASTER_PORT_NAME,
                    "port": s.master_port,
                    "targetPort": s.master_port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_master_services(
    name: str, namespace: str, uid: str, s: DeepSpeedInferenceSpec
) -> list[Manifest]:
    """One headless master Service per group."""
    return [render_master_service(name, namespace, uid, s, g) for g in range(s.replicas)]


def render_endpoint_service(
    name: str, namespace: str, uid: str, s: DeepSpeedInferenceSpec
) -> Manifest:
    """``<name>-api``: the model endpoint, selecting the head once its Serve proxy is healthy
    (KubeRay keeps the head's ``ray.io/serve`` label in step with the proxy's health)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": L.endpoint_service_name(name),
            "namespace": namespace,
            "labels": L.child_labels(name, role=L.ROLE_ENDPOINT),
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "selector": {
                L.LABEL_INFERENCE: name,
                "ray.io/node-type": "head",
                "ray.io/serve": "true",
            },
            "ports": [
                {
                    "name": "serve",
                    "port": s.serve.port,
                    "targetPort": s.serve.port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_network_policy(name: str, namespace: str, uid: str, group: int) -> Manifest:
    """NetworkPolicy ``<name>-g<g>-ranks``: group g's rank pods accept connections only from
    the group's own rank pods (rendezvous, gloo/NCCL) and from the Ray head (GCS, Serve
    controller, the group deployment calling its rank actors). Ingress only: the ranks must
    still reach the head, DNS and the model store."""
    workers = {
        L.LABEL_INFERENCE: name,
        L.LABEL_ROLE: L.ROLE_WORKER,
        L.LABEL_GROUP: str(group),
    }
    head = {L.LABEL_INFERENCE: name, L.LABEL_ROLE: L.ROLE_HEAD}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _child_meta(
            L.network_policy_name(name, group),
            namespace,
            L.child_labels(name, role=L.ROLE_NETWORK_POLICY, group=group),
            name,
            uid,
        ),
        "spec": {
            "podSelector": {"matchLabels": workers},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": workers}}]},
                {"from": [{"podSelector": {"matchLabels": head}}]},
            ],
        },
    }


def render_children(
    name: str,
    namespace: str,
    uid: str,
    s: DeepSpeedInferenceSpec,
    capacity: int = 0,
    kept: Kept | None = None,
) -> list[Manifest]:
    """Every child of the DSI: the RayService, the master Services in group order, the
    endpoint Service, then (spec.networkPolicy.enabled) the per-group NetworkPolicies.

    ``capacity``: groups the current RayService carries (its ``deepspeed.ai/group-capacity``
    annotation, or its group count; 0 for a new resource), see :func:`group_capacity`.
    """
    policies = (
        [render_network_policy(name, namespace, uid, g) for g in range(s.replicas)]
        if s.network_policy.enabled
        else []
    )
    return [
        render_rayservice(name, namespace, uid, s, capacity, kept),
        *render_master_services(name, namespace, uid, s),
        render_endpoint_service(name, namespace, uid, s),
        *policies,
    ]


def render_body(body: Mapping[str, Any]) -> list[Manifest]:
    """:func:`render_children` from a whole DSI object (``metadata`` + ``spec``)."""
    meta = body["metadata"]
    spec = parse_spec(body["spec"])
    return render_children(meta["name"], meta["namespace"], meta["uid"], spec)
