"""Validated arguments of the Serve application (what the operator's serve config passes).

Defaults come from ``dsi_operator.api.defaults``, the module the operator's spec takes its own
from, so an app started without the operator (``make serve-local``, bench) serves like one
the operator rendered. That module imports nothing, so it costs the worker no kopf or
kubernetes client.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import dsi_operator.api.defaults as D
from dsi_operator.util.errors import describe_validation_error
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class AppArgs(BaseModel):
    """Arguments of ``dsi_worker.app:build_app``; keys are snake_case, as in the RayService.

    ``model`` is a hub id or a local directory; ``None`` means the tiny test model, built on
    first use (local mode and tests only).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="hub id or local path; None = tiny test model")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Dtype = "auto"
    tensor_parallel_size: int = Field(1, ge=1, le=256)
    # Ranks sharing one pod (Ray node); tensor_parallel_size is a multiple of it. Each rank
    # actor then gets its RANK and LOCAL_RANK from the group, the rest from its pod.
    ranks_per_pod: int = Field(1, ge=1, le=64)
    num_groups: int = Field(1, ge=1, le=1024)
    max_batch_size: int = Field(D.MAX_BATCH_SIZE, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(D.BATCH_WAIT_TIMEOUT_MS / 1000.0, ge=0.0, le=10.0)
    max_new_tokens: int = Field(D.MAX_NEW_TOKENS, ge=1, description="cap on max_tokens per request")
    max_model_len: int | None = Field(None, ge=1, description="context length; default: model's")
    kernel_inject: bool = False
    served_model_name: str | None = None
    request_timeout_s: float = Field(float(D.REQUEST_TIMEOUT_SECONDS), gt=0)
    # How long a group may take to form (process group + model load) before its health
    # check fails and Serve re-creates it.
    form_timeout_s: float = Field(float(D.FORMATION_TIMEOUT_SECONDS), gt=0)
    # A rank still inside a collective step (rendezvous, TP init, a generate call) this long
    # after a peer of its epoch finished it, or silent this long, wedges the epoch: it fails
    # and re-forms (dsi_worker.formation).
    wedge_timeout_s: float = Field(float(D.WEDGE_TIMEOUT_SECONDS), gt=0)
    # Device for rank actors: "auto" = cuda when the rank sees a GPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Local mode (no Kubernetes): give each rank actor the env the operator would give its pod.
    local_mode: bool = False
    local_master_ports: list[int] | None = None
    # Ray resource (declared by the head) that the ingress and group deployments request a
    # sliver of, pinning them to the head: a group's replica on another group's rank pod
    # would die with that group. None (local mode, tests): Ray places them anywhere.
    control_resource: str | None = None
    # Name of the environment variable holding the API key clients must send as a Bearer
    # token; None: no authentication. The key itself never travels in the args.
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Threads per rank (CPU); None leaves torch's default.
    torch_threads: int | None = Field(None, ge=1)
    # Largest request body the ingress reads; a larger one is answered 413 unread.
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # Requests the ingress holds at once (a stream until its first token); past it it
    # answers 429 + Retry-After instead of queueing. None: what the groups accept together.
    max_inflight_requests: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _whole_pods(self) -> AppArgs:
        if self.tensor_parallel_size % self.ranks_per_pod:
            raise ValueError(
                f"tensor_parallel_size ({self.tensor_parallel_size}) must be a multiple of "
                f"ranks_per_pod ({self.ranks_per_pod})"
            )
        return self

    @field_validator("local_master_ports")
    @classmethod
    def _ports_in_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 < p < 65536 for p in v):
            raise ValueError("ports must be in 1..65535")
        return v

    def group_ongoing(self) -> int:
        """Requests one group's replica accepts at once: two full batches queued behind the
        running ones (streaming + plain), at least 256."""
        return max(256, 4 * self.max_batch_size)

    def inflight_limit(self) -> int:
        """Requests the ingress admits at once (``max_inflight_requests``)."""
        return self.max_inflight_requests or self.num_groups * self.group_ongoing()

    def model_name(self) -> str:
        """Name clients must send as ``model``."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or "dsi-tiny-llama"


def parse_args(args: dict[str, Any] | AppArgs | None) -> AppArgs:
    """Validate app args, raising ``ValueError`` whose message names each bad field."""
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as e:
        problems = describe_validation_error(e, whole="<args>")
        raise ValueError(f"invalid dsi_worker app args: {problems}") from None


# -- user_config ---------------------------------------------------------------------------
#
# The operator switches groups on and off with per-deployment ``user_config`` in the serve
# config's ``deployments:`` overrides. Serve hashes the app ``args`` into the code version,
# so changing them replaces every replica (every group re-forms); a changed ``user_config``
# only calls the running replicas' ``reconfigure``. ``num_groups`` is therefore a capacity:
# ``group-<g>`` deployments exist for all of them, and ``user_config`` says which are on.


class GroupUserConfig(BaseModel):
    """``user_config`` of a ``group-<g>`` deployment: ``{"active": true|false}``, and the
    group's TP shape (``tensor_parallel_size``, ``ranks_per_pod``; the app args' when
    unset)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    #: false: the group's pods are gone (its KubeRay worker groups are at 0 replicas); the
    #: replica kills its rank actors and stays up, healthy, answering "inactive".
    active: bool
    #: Per group, so a TP-size change reaches one group at a time (the operator's rollout
    #: changes a group's shape when it replaces its pods); a change re-forms the group.
    tensor_parallel_size: int | None = Field(None, ge=1, le=256)
    ranks_per_pod: int | None = Field(None, ge=1, le=64)


class IngressUserConfig(BaseModel):
    """``user_config`` of the ``ingress`` deployment: ``{"active_groups": n}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    #: Groups 0..n-1 are routed to and counted for readiness; n <= num_groups.
    active_groups: int = Field(ge=0)


UserConfig = TypeVar("UserConfig", GroupUserConfig, IngressUserConfig)


def parse_user_config(model: type[UserConfig], config: Any, deployment: str) -> UserConfig:
    """Validate ``config`` (a deployment's ``user_config``) as ``model``, raising
    ``ValueError`` whose message names the deployment and each bad key: Serve then fails the
    replica's start or update, and reports the message in the deployment's status."""
    where = f"invalid user_config of deployment {deployment}"
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(config).__name__}")
    try:
        return model.model_validate(config)
    except ValidationError as e:
        problems = describe_validation_error(e, whole="<user_config>")
        raise ValueError(f"{where}: {problems}") from None


def parse_ingress_config(config: Any, num_groups: int) -> IngressUserConfig:
    """The ingress's ``user_config``: :func:`parse_user_config`, and ``active_groups`` at
    most ``num_groups`` (the capacity: there is no ``group-<g>`` deployment beyond it)."""
    cfg = parse_user_config(IngressUserConfig, config, "ingress")
    if cfg.active_groups > num_groups:
        raise ValueError(
            "invalid user_config of deployment ingress: active_groups: "
            f"{cfg.active_groups} is more than num_groups ({num_groups})"
        )
    return cfg
