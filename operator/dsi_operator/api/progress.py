"""Progress of a DeepSpeedBatchInference run: the one schema of it.

The job's driver (``dsi_worker.batch.progress``) fills a :class:`BatchProgress` and writes it
into the progress ConfigMap (:meth:`BatchProgress.configmap_data`: camelCase keys, string
values); the operator reads that back (:meth:`BatchProgress.read`, as it reads the progress
part of the status it wrote before) and copies it into the resource's status, whose model
(``DeepSpeedBatchInferenceStatus``) extends this one. So every progress field, its ConfigMap
key, its status key and its CRD description are declared here once.

Import-light on purpose: the worker image imports this module (pydantic only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema
from pydantic.alias_generators import to_camel

from dsi_operator.api.fields import Time, validate_leniently


def _not_negative(value: Any) -> Any:
    """A count the driver reported as a string (``"12"``); a negative one reads as 0."""
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return value  # left for validation to refuse


def _one_decimal(rate: float) -> str:
    return f"{rate:.1f}"


#: A count of rows, shards or groups.
Count = Annotated[int, Field(ge=0), BeforeValidator(_not_negative)]
#: Rows per second: a float in memory, written with one decimal (a string in the CRD).
Rate = Annotated[
    float | None,
    PlainSerializer(lambda r: None if r is None else _one_decimal(r), when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "null"}]}),
]


class BatchProgress(BaseModel):
    """How far the job got, as its driver reports it."""

    # Unknown keys are ignored: the status that extends this model, read back as progress,
    # has more.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    rows_done: Count = Field(default=0, description="Input rows whose output is written.")
    rows_total: Count | None = Field(
        default=None, description="Input rows in all (known once the job read the input)."
    )
    progress: str | None = Field(
        default=None, description="Rows done over rows in all, e.g. '900/2000 (45%)'."
    )
    rows_per_second: Rate = Field(
        default=None, description="Rows finished per second over the current run."
    )
    groups_alive: Count | None = Field(
        default=None, description="TP groups of the job working right now."
    )
    shards_done: Count | None = Field(default=None, description="Output part files written.")
    shards_total: Count | None = Field(default=None, description="Output part files in all.")
    group_restarts: Count | None = Field(
        default=None,
        description="TP groups the job replaced whole after a rank failed (this run; the "
        "budget is spec.restartPolicy.maxGroupRestarts).",
    )
    progress_updated_at: Time = Field(
        default=None, description="When the job last reported progress (RFC 3339)."
    )

    def configmap_data(self) -> dict[str, str]:
        """The progress ConfigMap's ``data``: the fields set, camelCase, every value a string
        (``rowsPerSecond`` with one decimal, ``progressUpdatedAt`` RFC 3339 UTC)."""
        dumped = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return {k: str(v) for k, v in dumped.items()}

    @classmethod
    def read(cls, data: Mapping[str, Any] | None) -> BatchProgress:
        """What the driver wrote, or the progress part of a stored status. Values that do
        not parse are left unset: the driver's report is input, not trusted to be well
        formed (``model_fields_set`` says which fields it did report)."""
        raw = dict(data or {})
        # Drivers of 0.1.0 wrote the time as "updatedAt"; a job started before
        # an operator upgrade keeps writing that key until its run ends.
        if "updatedAt" in raw and "progressUpdatedAt" not in raw:
            raw["progressUpdatedAt"] = raw.pop("updatedAt")
        return validate_leniently(cls, raw)

    def reported(self) -> dict[str, Any]:
        """The fields that are set, as status values (camelCase, JSON)."""
        out: dict[str, Any] = self.model_dump(
            mode="json", by_alias=True, exclude_unset=True, exclude_none=True
        )
        return out
