"""The DeepSpeedBatchInference custom resource: pydantic models of its spec and status.

A batch resource runs a model over a dataset once (KubeRay ``RayJob``) instead of serving it
(``RayService``). Its cluster fields (model, group shape, image, resources, GPU, head, env,
pod template, placement) are :class:`~.spec.ClusterSpec`'s, the same definitions
DeepSpeedInference uses, so both kinds render their pods the same way. Like ``spec``, this
module is the single source of its CRD (:mod:`dsi_operator.api.crd`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from dsi_operator.api.progress import BatchProgress
from dsi_operator.api.spec import (
    DNS1123_SUBDOMAIN_PATTERN,
    MAX_TOTAL_RANKS,
    RANKS_PER_POD_MESSAGE,
    ClusterSpec,
    Condition,
    _Model,
    _plain,
)

IMMUTABLE_MESSAGE = (
    "spec is immutable: delete the DeepSpeedBatchInference and create it again (a new run "
    "over the same output skips the shards already written)"
)


class DataLocation(_Model):
    """Files in a PersistentVolumeClaim (claimName + a path inside it), or a path the pods
    already see (no claimName: an absolute path, e.g. baked into the image)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.claimName) ? !self.path.startsWith('/') "
                    ": self.path.startsWith('/')",
                    "message": "path is relative to the volume with claimName, absolute without",
                },
                {
                    # No ".." segment: a path stays inside its volume.
                    "rule": "!('/' + self.path + '/').contains('/../')",
                    "message": "path must not contain a '..' segment",
                },
            ]
        }
    )

    claim_name: str | None = Field(
        default=None,
        description="PersistentVolumeClaim (same namespace) holding the files; mounted in the "
        "head and every worker pod, so with pods on several nodes it must be ReadOnlyMany / "
        "ReadWriteMany.",
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
    )
    path: str = Field(
        default="",
        description="With claimName: a file or directory relative to the volume root (empty: "
        "the root). Without: an absolute path inside the pods.",
        max_length=1024,
    )

    @model_validator(mode="after")
    def _path_fits_source(self) -> DataLocation:
        if self.claim_name is not None and self.path.startswith("/"):
            raise ValueError("path is relative to the volume with claimName, absolute without")
        if self.claim_name is None and not self.path.startswith("/"):
            raise ValueError("path is relative to the volume with claimName, absolute without")
        if "/../" in f"/{self.path}/":
            raise ValueError("path must not contain a '..' segment")
        return self


class BatchInput(DataLocation):
    """The rows to run: JSON Lines or Parquet files, one prompt per row."""

    format: Literal["jsonl", "parquet"] = Field(
        default="jsonl",
        description="jsonl (one JSON object per line) or parquet. A directory is read as all "
        "its *.jsonl / *.parquet files, in name order.",
    )
    prompt_column: str = Field(
        default="prompt",
        description="Column (key) holding the prompt text.",
        min_length=1,
        max_length=256,
    )
    id_column: str | None = Field(
        default=None,
        description="Column holding each row's id, copied to the output. Unset: "
        "'<file>:<row>' (the input file's name and the row's index in it).",
        min_length=1,
        max_length=256,
    )


class BatchOutput(DataLocation):
    """Where the results go: one part file per input shard, written atomically."""

    format: Literal["jsonl", "parquet"] = Field(
        default="jsonl", description="jsonl or parquet (columns id, prompt, text, ...)."
    )


class GenerationSpec(_Model):
    """Sampling parameters of every row (greedy by default)."""

    max_tokens: int = Field(
        default=64, ge=1, le=32768, description="Tokens generated per row at most."
    )
    temperature: float = Field(
        default=0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy."
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (with temperature > 0)."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**31 - 1,
        description="Sampling seed, so a rerun samples the same text (greedy ignores it).",
    )


class BatchRestartSpec(_Model):
    """How many failures a run absorbs before it is Failed."""

    max_group_restarts: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Times the job may replace a TP group whose rank died (the group's "
        "in-flight batches are retried on the new group) before the run fails.",
    )
    max_job_retries: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Times the whole job is run again after it failed (KubeRay's RayJob "
        "backoffLimit); a retry skips the shards already written.",
    )


class DeepSpeedBatchInferenceSpec(ClusterSpec):
    """Desired state: run the model over every input row once, with replicas TP groups."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.replicas * self.tensorParallelSize <= {MAX_TOTAL_RANKS}",
                    "message": f"replicas * tensorParallelSize must be at most {MAX_TOTAL_RANKS} "
                    "(each rank is a KubeRay worker group inside one RayJob object)",
                },
                {
                    "rule": "self.tensorParallelSize % self.ranksPerPod == 0",
                    "message": RANKS_PER_POD_MESSAGE,
                },
                {"rule": "self == oldSelf", "message": IMMUTABLE_MESSAGE},
            ]
        }
    )

    replicas: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Number of TP groups working through the rows in parallel.",
    )
    input: BatchInput = Field(description="The rows to run.")
    output: BatchOutput = Field(description="Where the results go.")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec,
        description="Sampling parameters of every row.",
        json_schema_extra={"default": {}},
    )
    batch_size: int = Field(default=16, ge=1, le=1024, description="Rows sent to a group at once.")
    rows_per_shard: int = Field(
        default=1000,
        ge=1,
        le=10_000_000,
        description="Rows per output part file: the unit written atomically and skipped when "
        "the job runs again.",
    )
    restart_policy: BatchRestartSpec = Field(
        default_factory=BatchRestartSpec,
        description="Group replacements and whole-job retries a run may use.",
        json_schema_extra={"default": {}},
    )
    ttl_seconds_after_finished: int = Field(
        default=60,
        ge=0,
        le=7 * 24 * 3600,
        description="Seconds the Ray cluster (and its GPUs) stays after the job ended, for "
        "logs; then KubeRay deletes it. The resource and its status stay.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Fail the run when it has not finished this many seconds after it started.",
    )


# --- Status ----------------------------------------------------------------------------------


class BatchPhase(StrEnum):
    """Lifecycle phase of a DeepSpeedBatchInference."""

    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"


class DeepSpeedBatchInferenceStatus(BatchProgress):
    """Observed state, written by the operator from the RayJob and the job's progress."""

    # The progress fields (rowsDone, progress, ...) are BatchProgress's: the driver reports them.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    phase: BatchPhase | None = Field(
        default=None, description="Pending, Running, Succeeded or Failed."
    )
    message: str | None = Field(default=None, description="Human-readable summary of the phase.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the status was computed for."
    )
    job_id: str | None = Field(default=None, description="The Ray job's submission id.")
    job_status: str | None = Field(
        default=None, description="The Ray job's status (PENDING, RUNNING, SUCCEEDED, ...)."
    )
    job_deployment_status: str | None = Field(
        default=None, description="KubeRay's RayJob deployment status."
    )
    failed_attempts: int = Field(
        default=0, ge=0, description="Whole-job runs that failed so far (retries used)."
    )
    ray_cluster: str | None = Field(default=None, description="The job's RayCluster.")
    start_time: str | None = Field(default=None, description="When the job started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job ended (RFC 3339).")
    conditions: list[Condition] = Field(
        default_factory=list, description="Complete and Failed, as a Kubernetes Job reports."
    )


def parse_batch_spec(
    spec: Mapping[str, Any] | DeepSpeedBatchInferenceSpec,
) -> DeepSpeedBatchInferenceSpec:
    """Validate a batch spec (the dict kopf hands over, or an already parsed model)."""
    if isinstance(spec, DeepSpeedBatchInferenceSpec):
        return spec
    return DeepSpeedBatchInferenceSpec.model_validate(_plain(spec))
