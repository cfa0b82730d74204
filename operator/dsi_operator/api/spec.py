"""The DeepSpeedInference custom resource: pydantic v2 models of its spec and status.

This module is the single source of the CRD: :mod:`dsi_operator.api.crd` turns these models into
the OpenAPI v3 schema that the API server validates and defaults with. Every field therefore
carries a description (``kubectl explain dsi.spec.<field>`` prints it), and every default and
bound here is also enforced server-side.

Python attribute names are snake_case; the YAML/JSON names are camelCase aliases. Parse a
resource's spec with :func:`parse_spec` (accepts the dict kopf hands over) and dump with
``model_dump(by_alias=True, exclude_none=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

import dsi_operator.api.defaults as D
from dsi_operator._version import __version__
from dsi_operator.api.fields import (
    PreciseTime,
    StringList,
    Time,
    TimeList,
    no_default,
    omit_empty,
)
from dsi_operator.api.labels import DEFAULT_MASTER_PORT, DEFAULT_SERVE_PORT, LABEL_PREFIX

#: The worker image the operator renders unless spec.image says otherwise; pinned to the
#: operator's own version so operator and worker are released together.
DEFAULT_WORKER_IMAGE = f"ghcr.io/deepspeed-inference-operator/worker:{__version__}"

# Kubernetes resource.Quantity: the core API's own schema pattern, but with a whole-number
# exponent of at most two digits, as parsers require (the core pattern also matches ".5e.5" and
# "1e999999", which the Python client cannot parse and no pod needs).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?[0-9]{1,2}))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
# A label/annotation key or extended-resource name: optional DNS prefix, then a name.
QUALIFIED_NAME_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"  # noqa: E501
# DNS-1123 subdomain (object names: service accounts, secrets, PVCs, runtime classes).
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# C identifier-ish env var names (Kubernetes accepts more, but these are the portable ones).
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# A Hugging Face hub id: "org/name" or "name".
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"


def _coerce_quantity(value: Any) -> Any:
    """Accept YAML ints/floats for quantities (``cpu: 4``) and validate the string form."""
    if isinstance(value, bool):
        raise ValueError("a quantity must be a number or a string like '500m' or '16Gi'")
    if isinstance(value, int | float):
        value = str(value)
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')")
    return value


#: A Kubernetes resource quantity; int-or-string in the CRD, a string in Python.
Quantity = Annotated[
    str,
    BeforeValidator(_coerce_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


class _Model(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_enum_values=False,
        serialize_by_alias=True,
    )


# --- Spec ------------------------------------------------------------------------------------


class DType(StrEnum):
    """Weight and activation dtype."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class ModelPVC(_Model):
    """Model weights already present in a PersistentVolumeClaim."""

    claim_name: str = Field(
        description="Name of the PersistentVolumeClaim (same namespace) holding the weights. "
        "It is mounted read-only in the head and every worker pod, so with ranks on several "
        "nodes it must be ReadOnlyMany or ReadWriteMany.",
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
    )
    path: str = Field(
        default="",
        description="Directory inside the volume that holds the Hugging Face-format model "
        "(config.json, tokenizer and weights); empty means the volume root.",
        max_length=1024,
        pattern=r"^[^/].*$|^$",
    )


class ModelSpec(_Model):
    """Which model to serve: a hub id (name) or a directory in a PVC (pvc), not both."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.name) != has(self.pvc)",
                    "message": "model needs exactly one of model.name (a hub id) or model.pvc",
                }
            ]
        }
    )

    name: str | None = Field(
        default=None,
        description="Hugging Face hub id of the model, e.g. facebook/opt-66b. The rank "
        "processes download it (HF_TOKEN may come from spec.env). Mutually exclusive with pvc.",
        min_length=1,
        max_length=256,
        pattern=HUB_ID_PATTERN,
    )
    pvc: ModelPVC | None = Field(
        default=None,
        description="Load the model from a directory inside a PersistentVolumeClaim instead of "
        "the hub. Mutually exclusive with name.",
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) to load; the hub default when unset. "
        "Ignored for pvc models.",
        min_length=1,
        max_length=256,
    )
    dtype: DType = Field(
        default=DType.float16,
        description="dtype DeepSpeed loads and runs the model in. On CPU-only workers use "
        "float32 or bfloat16 (float16 is not supported there).",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model repository's own Python code to run (transformers "
        "trust_remote_code). Only enable for repositories you trust.",
    )
    served_model_name: str | None = Field(
        default=None,
        description="Model name the OpenAI-style API reports and accepts in requests; "
        "defaults to model.name, or the last element of the pvc path.",
        min_length=1,
        max_length=256,
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        if (self.name is None) == (self.pvc is None):
            raise ValueError("model needs exactly one of model.name (a hub id) or model.pvc")
        return self


class RankResources(_Model):
    """Kubernetes resources of each rank's (worker) pod."""

    gpus: int = Field(
        default=1,
        ge=0,
        le=16,
        description="GPUs per rank, requested as gpu.resourceName (requests = limits) and given "
        "to Ray as num-gpus. 0 renders CPU-only workers (testing).",
    )
    cpu: Quantity | None = Field(
        default=None,
        description="CPU request and limit of each worker pod, e.g. '8' or '7500m'. Unset: "
        "no CPU request or limit (Ray then counts the node's CPUs).",
    )
    memory: Quantity | None = Field(
        default=None,
        description="Memory request and limit of each worker pod, e.g. '64Gi'. Must hold the "
        "rank's shard while loading. Unset: no memory request or limit.",
    )


class Toleration(_Model):
    """A pod toleration (subset of core/v1 Toleration)."""

    key: str | None = Field(
        default=None,
        description="Taint key the toleration applies to; empty with operator Exists "
        "tolerates every taint.",
        max_length=316,
    )
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal",
        description="Exists (any value) or Equal (value must match).",
    )
    value: str | None = Field(
        default=None, description="Taint value to match when operator is Equal.", max_length=63
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None,
        description="Taint effect to tolerate: NoSchedule, PreferNoSchedule or NoExecute; "
        "unset tolerates all effects.",
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=0,
        description="For NoExecute: how long the pod stays bound after the taint appears.",
    )


DEFAULT_GPU_NODE_SELECTOR: dict[str, str] = {"nvidia.com/gpu.present": "true"}
DEFAULT_GPU_TOLERATIONS: list[dict[str, str]] = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]


class GPUSpec(_Model):
    """How worker pods get their GPUs (GPU Operator conventions by default)."""

    resource_name: str = Field(
        default="nvidia.com/gpu",
        description="Extended resource the device plugin advertises GPUs as, e.g. "
        "nvidia.com/gpu, or a MIG/time-sliced name such as nvidia.com/mig-3g.40gb.",
        max_length=253,
        pattern=QUALIFIED_NAME_PATTERN,
    )
    node_selector: dict[str, str] = Field(
        default=DEFAULT_GPU_NODE_SELECTOR,
        description="Node selector of the worker pods. The default selects nodes the GPU "
        "Operator labelled nvidia.com/gpu.present=true; set {} to select any node.",
    )
    tolerations: list[Toleration] = Field(
        default=DEFAULT_GPU_TOLERATIONS,  # type: ignore[arg-type]  # validated (validate_default)
        description="Tolerations of the worker pods. The default tolerates the usual "
        "nvidia.com/gpu:NoSchedule taint of GPU nodes.",
        max_length=64,
    )
    runtime_class_name: str | None = Field(
        default=None,
        description="RuntimeClass of the worker pods, e.g. nvidia when the GPU Operator's "
        "container toolkit is not the node's default runtime. Unset: not rendered.",
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
    )
    shared_memory_size: Quantity = Field(
        default="16Gi",
        description="Size limit of the memory-backed /dev/shm mounted in each worker pod "
        "(NCCL and PyTorch need far more than the container default of 64Mi). It counts "
        "against the pod's memory.",
    )
    require_gpu_operator: bool = Field(
        default=False,
        alias="requireGPUOperator",
        description="When true, a missing or not-ready GPU Operator ClusterPolicy "
        "(nvidia.com/v1) blocks provisioning (phase stays Pending); when false it is only "
        "reported in the GPUOperatorReady condition.",
    )


class SecretKeySelector(_Model):
    """One key of a Secret in the resource's namespace."""

    name: str = Field(
        description="Name of the Secret.",
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
    )
    key: str = Field(
        default="api-key",
        description="Key in the Secret's data whose value is used.",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
    )


class ServeSpec(_Model):
    """Ray Serve application settings (the OpenAI-style HTTP endpoint)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxModelLen) || self.maxModelLen > self.maxNewTokens",
                    "message": "serve.maxModelLen must be larger than serve.maxNewTokens",
                }
            ]
        }
    )

    port: int = Field(
        default=DEFAULT_SERVE_PORT,
        ge=1024,
        le=65535,
        description="HTTP port of Ray Serve on the head pod and of the serve Service.",
    )
    route_prefix: str = Field(
        default="/",
        description="Route prefix of the application; requests go to "
        "<endpoint><routePrefix>v1/completions.",
        max_length=256,
        pattern=r"^/[-A-Za-z0-9_./]*$",
    )
    max_batch_size: int = Field(
        default=D.MAX_BATCH_SIZE,
        ge=1,
        le=1024,
        description="Largest number of requests one group generates for together.",
    )
    batch_wait_timeout_ms: int = Field(
        default=D.BATCH_WAIT_TIMEOUT_MS,
        ge=0,
        le=10000,
        description=(
            "How long a group waits, from the oldest queued request's arrival, to fill a batch; "
            "requests that queued while the previous batch ran go at once, and so does a "
            "request sent while nothing else is under way."
        ),
    )
    max_new_tokens: int = Field(
        default=D.MAX_NEW_TOKENS,
        ge=1,
        le=131072,
        description="Cap on max_tokens of a request; larger requests are clamped to it.",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        le=1048576,
        description="Cap on prompt plus generated tokens; the model's own limit when unset.",
    )

    @model_validator(mode="after")
    def _context_fits_the_token_cap(self) -> ServeSpec:
        # The same rule as the CRD's CEL validation above (the API server applies that one).
        if self.max_model_len is not None and self.max_model_len <= self.max_new_tokens:
            raise ValueError("serve.maxModelLen must be larger than serve.maxNewTokens")
        return self

    request_timeout_seconds: int = Field(
        default=D.REQUEST_TIMEOUT_SECONDS,
        ge=1,
        le=86400,
        description="A request still running after this many seconds fails with 504.",
    )
    api_key_secret: SecretKeySelector | None = Field(
        default=None,
        description="When set, the endpoint requires 'Authorization: Bearer <key>' with the "
        "value of this Secret key (401 otherwise); /healthz and /metrics stay open. The key "
        "reaches only the head pod's environment (DSI_API_KEY), never the RayService spec.",
    )
    kernel_inject: bool = Field(
        default=False,
        description="Use DeepSpeed's fused inference kernels (replace_with_kernel_inject) "
        "instead of AutoTP. GPU only, and only for architectures DeepSpeed has kernels for; "
        "refused for Llama-family models (model_type llama), whose fused kernels fail with "
        "the pinned DeepSpeed and transformers (docs/gpu.md).",
    )


class BackoffSpec(_Model):
    """Exponential backoff between restarts of the same group."""

    initial_seconds: int = Field(
        default=10,
        ge=0,
        le=3600,
        description="The first restart of a quiet group is immediate; the n-th consecutive "
        "restart waits initialSeconds * multiplier^(n-2) after the previous one (so the "
        "second waits initialSeconds), capped at maxSeconds.",
    )
    max_seconds: int = Field(
        default=300, ge=0, le=86400, description="Upper bound of the delay between restarts."
    )
    multiplier: float = Field(
        default=2.0,
        ge=1.0,
        le=10.0,
        description="Factor applied to the delay after each consecutive restart.",
    )


class RestartPolicySpec(_Model):
    """When and how a whole TP group is restarted after a failure of any of its ranks."""

    max_restarts: int = Field(
        default=5,
        ge=0,
        le=10000,
        description="Restart budget per group: more than this many restarts of one group "
        "within windowSeconds sends the resource to phase Failed.",
    )
    window_seconds: int = Field(
        default=600,
        ge=1,
        le=604800,
        description="Sliding window, in seconds, in which restarts count against maxRestarts.",
    )
    backoff: BackoffSpec = Field(
        default_factory=BackoffSpec,
        description="Exponential backoff between consecutive restarts of a group.",
        json_schema_extra={"default": {}},
    )
    quiet_period_seconds: int = Field(
        default=600,
        ge=0,
        le=604800,
        description="A group that has stayed formed this long resets its backoff chain: its "
        "next restart is immediate again.",
    )
    formation_timeout_seconds: int = Field(
        default=D.FORMATION_TIMEOUT_SECONDS,
        ge=10,
        le=86400,
        description="A group whose ranks have not all become ready this many seconds after "
        "its pods were created is restarted (covers image pulls and model loading).",
    )
    max_reforms: int = Field(
        default=10,
        ge=0,
        le=10000,
        description="In-place re-forms per group (a rank process lost while its pod ran on; "
        "Ray Serve forms the group again in the same pods) allowed within windowSeconds. They "
        "do not use maxRestarts; past this many the group is restarted with new pods (trigger "
        "ReformLoop), which does.",
    )
    terminating_grace_seconds: int = Field(
        default=60,
        ge=0,
        le=86400,
        description="A group pod stuck Terminating longer than this (past its own grace "
        "period) triggers a group restart.",
    )
    node_not_ready_grace_seconds: int = Field(
        default=60,
        ge=0,
        le=86400,
        description="A group pod whose node has been NotReady or gone this long triggers a "
        "group restart.",
    )
    pod_deletion_grace_seconds: int = Field(
        default=5,
        ge=0,
        le=3600,
        description="Grace period of the pods a group restart deletes. The group is already "
        "broken, so there is nothing to drain; a long grace only delays the new pods and lets "
        "Ray place the new rank actors on pods that are about to die.",
    )

    def backoff_for(self, consecutive: int) -> float:
        """Delay after the previous restart given ``consecutive`` restarts so far: the first
        restart of a quiet group is immediate, each next one waits
        ``initialSeconds * multiplier**(n-1)``, capped at ``maxSeconds``."""
        if consecutive <= 0:
            return 0.0
        b = self.backoff
        return float(min(b.initial_seconds * (b.multiplier ** (consecutive - 1)), b.max_seconds))


class HeadResources(_Model):
    """Resources of the Ray head pod (no GPUs)."""

    cpu: Quantity = Field(default="2", description="CPU request and limit of the head pod.")
    memory: Quantity = Field(default="8Gi", description="Memory request and limit of the head pod.")


class HeadSpec(_Model):
    """The Ray head pod: GCS, Serve controller and HTTP proxy; it never holds a rank."""

    image: str | None = Field(
        default=None,
        description="Image of the head pod; spec.image when unset. A change of the head's pod "
        "template (this image, or spec.image while this is unset) restarts the head and with it "
        "every group at once: Ray keeps no worker across a head restart without GCS fault "
        "tolerance. Pin it to roll a new worker image group by group (the Ray version must "
        "match).",
        min_length=1,
        max_length=512,
    )

    resources: HeadResources = Field(
        default_factory=HeadResources,
        description="CPU and memory of the head pod.",
        json_schema_extra={"default": {}},
    )
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = Field(
        default=None,
        description="Type of KubeRay's head Service: ClusterIP (default), NodePort or "
        "LoadBalancer.",
    )
    node_selector: dict[str, str] | None = Field(
        default=None,
        description="Node selector of the head pod. When unset the head may land on any node "
        "but prefers nodes without GPUs (nodes lacking the nvidia.com/gpu.present label), so "
        "it takes no CPU or memory from GPU nodes and never blocks a rank from fitting.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Tolerations of the head pod (e.g. to run on tainted CPU nodes).",
        json_schema_extra={"default": []},
        max_length=32,
    )


class EnvVar(_Model):
    """An environment variable for every worker and head container."""

    name: str = Field(
        description="Variable name.", min_length=1, max_length=256, pattern=ENV_NAME_PATTERN
    )
    value: str | None = Field(default=None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="Source of the value, as core/v1 EnvVarSource (secretKeyRef, "
        "configMapKeyRef, fieldRef, resourceFieldRef); passed through unchanged.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class LocalObjectReference(_Model):
    """Reference to an object in the same namespace."""

    name: str = Field(
        description="Name of the object.",
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
    )


class SecurityLevel(StrEnum):
    """Pod Security Standard levels the rendered pods can be made to meet."""

    restricted = "restricted"
    baseline = "baseline"


class NetworkPolicySpec(_Model):
    """A NetworkPolicy per group around its rank pods."""

    enabled: bool = Field(
        default=False,
        description="Render one NetworkPolicy per group: its rank pods accept connections "
        "only from the group's own rank pods and from the Ray head (rendezvous, NCCL/gloo, "
        "Ray). NetworkPolicies add up, so another policy can let more in (e.g. a metrics "
        "scraper). Needs a CNI that enforces NetworkPolicy.",
    )


class GroupDomainSpec(_Model):
    """Keep each group's pods inside one topology domain (a node label's value)."""

    topology_key: str = Field(
        description="Node label key whose value names the domain, e.g. a rack, zone or "
        "NVLink-domain label (topology.kubernetes.io/zone, kubernetes.io/hostname).",
        min_length=1,
        max_length=317,
        pattern=QUALIFIED_NAME_PATTERN,
    )
    mode: Literal["Required", "Preferred"] = Field(
        default="Required",
        description="Required: a group's pods are only placed in the domain of its other "
        "pods (pods wait Pending when it is full). Preferred: the scheduler tries to.",
    )


class SpreadGroupsSpec(_Model):
    """Spread groups across topology domains (preferred), so one domain's loss hits few."""

    topology_key: str = Field(
        description="Node label key whose value names the domain the groups spread over.",
        min_length=1,
        max_length=317,
        pattern=QUALIFIED_NAME_PATTERN,
    )


class KueueSpec(_Model):
    """Admission of each group as one Kueue pod group (all its pods or none)."""

    queue_name: str = Field(
        description="Kueue LocalQueue of the rank pods (label kueue.x-k8s.io/queue-name). "
        "Each group is a pod group (kueue.x-k8s.io/pod-group-name <name>-g<g>, "
        "pod-group-total-count its pods, pod-group-serving true); the head is not queued.",
        min_length=1,
        max_length=63,
        # A label value and a DNS subdomain; written without "](" so the generated
        # reference's Markdown does not read it as a link.
        pattern=r"^[a-z0-9]$|^[a-z0-9][-a-z0-9.]{0,61}[a-z0-9]$",
    )


class PlacementSpec(_Model):
    """Where groups' pods go: together inside a domain, groups spread, Kueue admission."""

    group_domain: GroupDomainSpec | None = Field(
        default=None,
        description="Keep each group's pods in one topology domain (pod affinity per group).",
    )
    spread_groups: SpreadGroupsSpec | None = Field(
        default=None,
        description="Prefer placing different groups in different domains (pod "
        "anti-affinity between groups, preferred).",
    )
    kueue: KueueSpec | None = Field(
        default=None,
        description="Gang admission through Kueue's plain-pod groups: a group is admitted "
        "whole or not at all. Needs Kueue with the pod integration enabled.",
    )


class PodTemplateOverrides(_Model):
    """Extra metadata and settings merged into every pod (head and workers)."""

    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra pod labels. Keys under deepspeed.ai/ are reserved for the operator.",
        max_length=64,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(k, !k.startsWith('deepspeed.ai/'))",
                    "message": "podTemplate.labels must not use the reserved deepspeed.ai/ prefix",
                }
            ]
        },
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra pod annotations.", max_length=64
    )

    @field_validator("labels")
    @classmethod
    def _no_reserved_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in labels if k.startswith(LABEL_PREFIX))
        if reserved:
            raise ValueError(
                f"podTemplate.labels must not use the reserved {LABEL_PREFIX} prefix: {reserved}"
            )
        return labels

    service_account_name: str | None = Field(
        default=None,
        description="ServiceAccount the pods run as (namespace default when unset).",
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list,
        description="Secrets used to pull the image. Names are unique (a pod refuses duplicates).",
        max_length=32,
        # Keyed by name: the API server refuses a duplicate naming the field (found by the
        # spec fuzzer: a duplicate was accepted here and the RayService then refused).
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    @field_validator("image_pull_secrets")
    @classmethod
    def _unique_pull_secrets(cls, refs: list[LocalObjectReference]) -> list[LocalObjectReference]:
        names = [r.name for r in refs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"imagePullSecrets: duplicate name {dupes[0]!r} (names must be unique)"
            )
        return refs

    priority_class_name: str | None = Field(
        default=None,
        description="PriorityClass of the pods (none when unset).",
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
    )
    security_level: SecurityLevel = Field(
        default=SecurityLevel.restricted,
        description="Pod Security Standard the pods are rendered to meet. restricted: "
        "runAsNonRoot, RuntimeDefault seccomp, no privilege escalation, all capabilities "
        "dropped (the worker image runs as uid 1000). baseline: none of these, for an image "
        "that must run as root or a node setup that needs capabilities.",
    )


RANKS_PER_POD_MESSAGE = (
    "tensorParallelSize must be a multiple of ranksPerPod (a group is "
    "tensorParallelSize / ranksPerPod pods of ranksPerPod ranks each)"
)

#: Most ranks (pods) one resource may have: each rank is a KubeRay worker group in one
#: RayService object (~1.5 KiB each), and objects must stay well under etcd's 1.5 MiB limit.
MAX_TOTAL_RANKS = 512


class ClusterSpec(_Model):
    """The fields every kind that runs TP groups on a Ray cluster shares (the model, group
    shape, images, resources, GPU prerequisites, head, env, pod settings and placement):
    one definition, so serving and batch render their pods the same way."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.replicas * self.tensorParallelSize <= {MAX_TOTAL_RANKS}",
                    "message": f"replicas * tensorParallelSize must be at most {MAX_TOTAL_RANKS} "
                    "(each rank is a KubeRay worker group inside one RayService object)",
                },
                {
                    "rule": "self.tensorParallelSize % self.ranksPerPod == 0",
                    "message": RANKS_PER_POD_MESSAGE,
                },
            ]
        }
    )

    model: ModelSpec = Field(description="The model to serve.")
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Ranks per group; DeepSpeed shards the model over them with tensor "
        "parallelism. Each rank is one process with resources.gpus GPUs.",
    )
    ranks_per_pod: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Ranks (processes, each with resources.gpus GPUs) in one pod; "
        "tensorParallelSize must be a multiple of it. A group is tensorParallelSize / "
        "ranksPerPod pods, each requesting ranksPerPod x resources.gpus GPUs on one node, so "
        "its ranks talk over NVLink and shared memory. 1: one pod per rank.",
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=256,
        description="Number of independent TP groups (data-parallel copies). A failure "
        "restarts only the group it hit. 0 keeps the head and the endpoint without workers.",
    )
    image: str = Field(
        default=DEFAULT_WORKER_IMAGE,
        description="Worker image (Ray, DeepSpeed and the dsi_worker app) for head and workers.",
        min_length=1,
        max_length=512,
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None,
        description="Always, IfNotPresent or Never; Kubernetes' default when unset.",
    )
    resources: RankResources = Field(
        default_factory=RankResources,
        description="Resources of each rank's pod.",
        json_schema_extra={"default": {}},
    )
    gpu: GPUSpec = Field(
        default_factory=GPUSpec,
        description="GPU resource name, placement and GPU Operator requirements.",
        json_schema_extra={"default": {}},
    )
    head: HeadSpec = Field(
        default_factory=HeadSpec,
        description="The Ray head pod.",
        json_schema_extra={"default": {}},
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Extra environment variables for every container (e.g. HF_TOKEN from a "
        "Secret). They cannot override the rank variables the operator sets. Names are "
        "unique (a pod refuses duplicates).",
        max_length=128,
        # A list keyed by name: the API server refuses a duplicate name naming spec.env.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    @field_validator("env")
    @classmethod
    def _unique_env_names(cls, env: list[EnvVar]) -> list[EnvVar]:
        seen: set[str] = set()
        for var in env:
            if var.name in seen:
                raise ValueError(f"env: duplicate name {var.name!r} (names must be unique)")
            seen.add(var.name)
        return env

    pod_template: PodTemplateOverrides = Field(
        default_factory=PodTemplateOverrides,
        description="Labels, annotations, service account and pull secrets for every pod.",
        json_schema_extra={"default": {}},
    )
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec,
        description="Group placement: one topology domain per group, groups spread across "
        "domains, and Kueue gang admission.",
        json_schema_extra={"default": {}},
    )
    master_port: int = Field(
        default=DEFAULT_MASTER_PORT,
        ge=1024,
        le=65535,
        description="TCP port of torch.distributed's rendezvous on each group's rank 0 "
        "(MASTER_PORT).",
    )

    @model_validator(mode="after")
    def _bounded_size(self) -> ClusterSpec:
        if self.replicas * self.tensor_parallel_size > MAX_TOTAL_RANKS:
            raise ValueError(
                f"replicas * tensorParallelSize must be at most {MAX_TOTAL_RANKS} "
                "(each rank is a KubeRay worker group inside one RayService object)"
            )
        if self.tensor_parallel_size % self.ranks_per_pod:
            raise ValueError(
                f"{RANKS_PER_POD_MESSAGE}; got tensorParallelSize "
                f"{self.tensor_parallel_size} and ranksPerPod {self.ranks_per_pod}"
            )
        return self

    @property
    def pods_per_group(self) -> int:
        """Pods of one group: tensorParallelSize / ranksPerPod."""
        return self.tensor_parallel_size // self.ranks_per_pod

    def pod_ranks(self, pod: int) -> range:
        """The ranks pod ``pod`` (0-based, within its group) holds."""
        k = self.ranks_per_pod
        return range(pod * k, (pod + 1) * k)

    @property
    def served_model_name(self) -> str:
        """The model name the API serves: explicit, else hub id, else the pvc path's tail."""
        if self.model.served_model_name:
            return self.model.served_model_name
        if self.model.name:
            return self.model.name
        assert self.model.pvc is not None  # guaranteed by ModelSpec's validator
        tail = self.model.pvc.path.rstrip("/").rsplit("/", 1)[-1]
        return tail or self.model.pvc.claim_name


class RolloutSpec(_Model):
    """How a change of the pods' templates reaches the running groups."""

    max_unavailable: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Groups replaced at once. A group is replaced by deleting its pods, which "
        "come back from the new template in the same RayCluster: no extra GPUs. Groups that are "
        "not ready count against it; a stale group that is not ready is replaced first.",
    )
    paused: bool = Field(
        default=False,
        description="Stop replacing groups where the rollout stands (Serve settings still apply "
        "at once). Groups already replaced stay; a failed group comes back at the template it "
        "has.",
    )


class DeepSpeedInferenceSpec(ClusterSpec):
    """Desired state: a model served by replicas groups of tensorParallelSize ranks each."""

    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec,
        description="Group-by-group rollout of spec changes that touch the pods.",
        json_schema_extra={"default": {}},
    )

    serve: ServeSpec = Field(
        default_factory=ServeSpec,
        description="Ray Serve application settings.",
        json_schema_extra={"default": {}},
    )
    restart_policy: RestartPolicySpec = Field(
        default_factory=RestartPolicySpec,
        description="Whole-group restart triggers, budget and backoff.",
        json_schema_extra={"default": {}},
    )
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec,
        description="NetworkPolicies that fence each group's rank pods.",
        json_schema_extra={"default": {}},
    )


# --- Status ----------------------------------------------------------------------------------


class Phase(StrEnum):
    """Lifecycle phase of a DeepSpeedInference."""

    Pending = "Pending"
    Provisioning = "Provisioning"
    Forming = "Forming"
    Ready = "Ready"
    Degraded = "Degraded"
    Restarting = "Restarting"
    Failed = "Failed"


class ConditionType(StrEnum):
    """The condition types the operator reports."""

    GPUOperatorReady = "GPUOperatorReady"
    GPUCapacity = "GPUCapacity"
    KubeRayAvailable = "KubeRayAvailable"
    RayServiceReady = "RayServiceReady"
    GroupsFormed = "GroupsFormed"
    Progressing = "Progressing"


class Condition(BaseModel):
    """A metav1.Condition."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    type: str = Field(
        description="Condition type: GPUOperatorReady, GPUCapacity, KubeRayAvailable, "
        "RayServiceReady, GroupsFormed or Progressing.",
        max_length=316,
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        description="CamelCase machine-readable reason for the last transition.",
        max_length=1024,
    )
    message: str = Field(default="", description="Human-readable details.", max_length=32768)
    last_transition_time: str | None = Field(
        default=None,
        description="When the status last changed (RFC 3339).",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed for."
    )

    @classmethod
    def of(cls, type_: str, status: str, reason: str, message: str = "") -> Condition:
        """A condition before it is merged into status (no transition time yet)."""
        return cls.model_validate(
            {"type": type_, "status": status, "reason": reason, "message": message}
        )


class GroupStatus(BaseModel):
    """Observed state of one TP group, including the controller's restart bookkeeping."""

    # Also the in-memory state the restart logic works with (dsi_operator.serving.restart):
    # times are datetimes and UID lists tuples, written as RFC 3339 strings and JSON lists
    # (dsi_operator.api.fields). Immutable: change it with model_copy(update=...). Unset fields
    # (None, empty lists) are left out when it is written. (Comments, not the docstring: the
    # docstring is the CRD's description.)

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    index: int = Field(ge=0, description="Group index g (pods labelled deepspeed.ai/group=g).")
    phase: str | None = Field(
        default=None, description="Group state: Pending, Forming, Ready, Restarting or Failed."
    )
    ranks: int | None = Field(default=None, ge=0, description="Ranks the group should have.")
    ready_ranks: int = Field(default=0, ge=0, description="Ranks whose pods are ready.")
    pods: int | None = Field(
        default=None, ge=0, description="Pods the group should have (ranks / ranksPerPod)."
    )
    ready_pods: int = Field(default=0, ge=0, description="Pods of the group that are ready.")
    ready: bool | None = Field(default=None, description="Whether every rank is ready.")
    restarts: int = Field(default=0, ge=0, description="Restarts of this group so far.")
    reforms: int = Field(
        default=0,
        ge=0,
        description="In-place re-forms of this group so far: its rank processes formed the "
        "group again inside the same pods (not counted in restarts).",
    )
    last_reform_reason: str | None = Field(
        default=None, description="Cause and rank of the last in-place re-form."
    )
    last_reform_time: Time = Field(
        default=None, description="When the last in-place re-form began (RFC 3339)."
    )
    reforming_since: PreciseTime = Field(
        default=None,
        description="When the in-place re-form in progress began (RFC 3339); unset when none.",
    )
    reform_times: TimeList = Field(
        default=(),
        description="Start times of the re-forms inside the budget window.",
        json_schema_extra=no_default,
    )
    last_restart_reason: str | None = Field(
        default=None, description="Trigger and pod of the last restart."
    )
    last_restart_time: Time = Field(
        default=None,
        description="When the last restart began (RFC 3339).",
    )
    restart_trigger: str | None = Field(
        default=None, description="Trigger of the restart in progress, if any."
    )
    serve_status: str | None = Field(
        default=None,
        description="Ray Serve status of this group's group-<g> deployment as KubeRay reports "
        "it (HEALTHY, UNHEALTHY, UPDATING, ...). UNHEALTHY while the pods run means a rank "
        "process died inside its pod; Serve re-forms the group.",
    )
    restarting_since: PreciseTime = Field(
        default=None,
        description="When the restart in progress began (RFC 3339); unset when none.",
    )
    # UIDs rather than creation times: see dsi_operator.serving.restart.
    restart_pods: StringList = Field(
        default=(),
        description="UIDs of the pods being replaced by the restart in progress.",
        json_schema_extra=no_default,
    )
    backoff_until: Time = Field(
        default=None,
        description="The next restart of this group waits until this time (RFC 3339).",
    )
    restart_times: TimeList = Field(
        default=(),
        description="Start times of the restarts inside the budget window.",
        json_schema_extra=no_default,
    )
    members: StringList = Field(
        default=(),
        description="Pod UIDs by rank when the group last formed.",
        json_schema_extra=no_default,
    )
    # A pod lost before the group formed (KubeRay replaces it at once, maybe while no operator
    # runs) is still a failure of the group, seen from what it left.
    forming_pods: StringList = Field(
        default=(),
        description="Pod UIDs by pod index of a group that has not formed yet: one of them "
        "lost before the group forms is a restart (PodDeleted), even when KubeRay replaced it "
        "while no operator ran.",
        json_schema_extra=no_default,
    )
    forming_since: PreciseTime = Field(
        default=None,
        description="When the group's current pods started forming (RFC 3339).",
    )
    formed_at: Time = Field(
        default=None,
        description="When all ranks last became ready (RFC 3339).",
    )
    hash: str | None = Field(
        default=None, description="deepspeed.ai/group-hash the group's pods were rendered with."
    )
    # Force-deleted, held by a finalizer or a dead kubelet: the triggers ignore them so they
    # cannot cause another restart.
    abandoned_pods: StringList = Field(
        default=(),
        description="UIDs of old pods a finished restart left stuck Terminating (ignored by "
        "the restart triggers).",
        json_schema_extra=no_default,
    )
    # KubeRay's blue/green upgrade switches clusters, and the new cluster's pods replacing the
    # members is a roll, not a failure.
    ray_cluster: str | None = Field(
        default=None, description="The RayCluster whose pods formed the group."
    )

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = omit_empty(handler(self))
        return out


class RolloutStatus(BaseModel):
    """Where the rollout of the current spec stands."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    target_hash: str | None = Field(
        default=None, description="deepspeed.ai/spec-hash of the spec being rolled out."
    )
    updated_groups: int = Field(
        default=0, ge=0, description="Groups whose pods all run the current templates."
    )
    ready_updated_groups: int = Field(
        default=0, ge=0, description="Updated groups that are ready (serving)."
    )
    updating: list[int] | None = Field(
        default=None, description="Groups being replaced now (pods deleted, not back yet)."
    )
    head_updated: bool | None = Field(
        default=None, description="Whether the head pod runs the current head template."
    )
    updated: str | None = Field(
        default=None,
        description="Ready updated groups over desired groups, e.g. '1/2' (printer column).",
    )


class DeepSpeedInferenceStatus(BaseModel):
    """Observed state, written by the operator: the only description of it. The status module
    computes a status and passes it through this model before writing, so a field missing
    here (and so in the CRD) fails at once instead of being pruned by the API server."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    phase: Phase | None = Field(
        default=None,
        description="Pending, Provisioning, Forming, Ready, Degraded, Restarting or Failed.",
    )
    message: str | None = Field(default=None, description="Human-readable summary of the phase.")
    failed_reason: str | None = Field(
        default=None, description="Why the resource is Failed (e.g. restart budget exhausted)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the status was computed for."
    )
    replicas: int | None = Field(default=None, ge=0, description="Groups desired (spec.replicas).")
    ready_replicas: int = Field(default=0, ge=0, description="Groups with every rank ready.")
    ready: str | None = Field(
        default=None, description="Ready groups over desired groups, e.g. '1/2' (printer column)."
    )
    restarts: int = Field(default=0, ge=0, description="Group restarts so far, all groups.")
    reforms: int = Field(default=0, ge=0, description="In-place group re-forms so far, all groups.")
    endpoint: str | None = Field(
        default=None, description="In-cluster URL of the model's HTTP endpoint."
    )
    selector: str | None = Field(
        default=None, description="Label selector of the worker pods (for the scale subresource)."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="GPUOperatorReady, GPUCapacity, KubeRayAvailable, RayServiceReady, "
        "GroupsFormed, Progressing.",
    )
    groups: list[GroupStatus] = Field(default_factory=list, description="Per-group state.")
    rollout: RolloutStatus | None = Field(
        default=None, description="Group-by-group rollout of the current spec."
    )


class DeepSpeedInference(BaseModel):
    """A whole DeepSpeedInference object (used for examples and tests)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    api_version: str = Field(default="deepspeed.ai/v1alpha1", description="API version.")
    kind: str = Field(default="DeepSpeedInference", description="Kind.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Object metadata.")
    spec: DeepSpeedInferenceSpec = Field(description="Desired state.")
    status: DeepSpeedInferenceStatus | None = Field(default=None, description="Observed state.")


def parse_spec(spec: Mapping[str, Any] | DeepSpeedInferenceSpec) -> DeepSpeedInferenceSpec:
    """Validate a spec (the dict kopf hands over, or an already parsed model)."""
    if isinstance(spec, DeepSpeedInferenceSpec):
        return spec
    return DeepSpeedInferenceSpec.model_validate(_plain(spec))


def _plain(obj: Any) -> Any:
    # kopf hands over read-only mapping views; pydantic wants plain dicts and lists.
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
