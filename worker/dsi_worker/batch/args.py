"""``BatchArgs``: the arguments of the batch job, as the operator passes them.

JSON object with snake_case keys, from ``--args-json``, ``--args-file`` or the environment
variable ``DSI_BATCH_ARGS``. The group fields (model, dtype, TP size, ...) are the serving
app's own :class:`~dsi_worker.config.AppArgs` field definitions, shared rather than copied,
and cross-field rules are checked by building an ``AppArgs`` from them, so a value the
serving app refuses is refused here with the same message.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from dsi_operator.util.errors import describe_validation_error
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dsi_worker.config import AppArgs, Dtype
from dsi_worker.protocol import GenerateRequest

ENV_VAR = "DSI_BATCH_ARGS"

Format = Literal["jsonl", "parquet"]

#: The AppArgs fields a batch job shares with serving (same meaning, defaults and bounds).
APP_FIELDS = (
    "model",
    "revision",
    "dtype",
    "tensor_parallel_size",
    "ranks_per_pod",
    "num_groups",
    "device",
    "kernel_inject",
    "torch_threads",
    "form_timeout_s",
    "max_model_len",
    "local_mode",
    "local_master_ports",
)


def _field_of(model: type[BaseModel], name: str) -> Any:
    """``model``'s definition of field ``name`` (default, bounds, description), to share.

    A copy: pydantic merges the annotation's metadata into a FieldInfo it is given, which
    must not touch the original model's field.
    """
    return copy.deepcopy(model.model_fields[name])


class InputSpec(BaseModel):
    """Where the prompts are: a file, or a directory of ``*.<format>`` files (sorted)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    format: Format = "jsonl"
    prompt_column: str = Field("prompt", min_length=1)
    #: Column holding each row's id; None: ``<relative file name>:<row index>``.
    id_column: str | None = Field(None, min_length=1)


class OutputSpec(BaseModel):
    """Directory of the ``part-<k>`` files, the resume marker and ``_SUCCESS``."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    format: Format = "jsonl"


class GenerationSpec(BaseModel):
    """How to continue each prompt (greedy by default); bounds as in the HTTP API."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(64, ge=1)
    temperature: float = _field_of(GenerateRequest, "temperature")
    top_p: float = _field_of(GenerateRequest, "top_p")
    seed: int | None = _field_of(GenerateRequest, "seed")


class BatchArgs(BaseModel):
    """Arguments of ``python -m dsi_worker.batch`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = _field_of(AppArgs, "model")
    revision: str | None = _field_of(AppArgs, "revision")
    dtype: Dtype = _field_of(AppArgs, "dtype")
    tensor_parallel_size: int = _field_of(AppArgs, "tensor_parallel_size")
    ranks_per_pod: int = _field_of(AppArgs, "ranks_per_pod")
    num_groups: int = _field_of(AppArgs, "num_groups")
    device: Literal["auto", "cpu", "cuda"] = _field_of(AppArgs, "device")
    kernel_inject: bool = _field_of(AppArgs, "kernel_inject")
    torch_threads: int | None = _field_of(AppArgs, "torch_threads")
    form_timeout_s: float = _field_of(AppArgs, "form_timeout_s")
    max_model_len: int | None = _field_of(AppArgs, "max_model_len")
    local_mode: bool = _field_of(AppArgs, "local_mode")
    local_master_ports: list[int] | None = _field_of(AppArgs, "local_master_ports")

    input: InputSpec
    output: OutputSpec
    generation: GenerationSpec = Field(default_factory=lambda: GenerationSpec.model_validate({}))
    #: Rows per batch sent to a group (every rank of the group gets the same batch).
    batch_size: int = Field(16, ge=1, le=4096)
    #: Rows per input shard (one output file each; the unit of resume).
    rows_per_shard: int = Field(1000, ge=1)
    #: Group replacements allowed within one run; past it a failed group is not replaced.
    max_group_restarts: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _valid_for_serving(self) -> BatchArgs:
        # AppArgs' cross-field rules (whole pods, port range), with AppArgs' messages.
        self.app_args()
        return self

    def app_args(self) -> AppArgs:
        """The shared fields as the serving app's ``AppArgs`` (what ``engine_kwargs``,
        ``rank_env`` and ``process_env`` take)."""
        try:
            return AppArgs.model_validate(self.model_dump(include=set(APP_FIELDS)))
        except ValidationError as e:
            raise ValueError(describe_validation_error(e)) from None


class BatchArgsError(ValueError):
    """Bad batch arguments; the message is one line naming each bad field."""


def parse_batch_args(raw: Any) -> BatchArgs:
    """Validate a decoded JSON value as :class:`BatchArgs` (:class:`BatchArgsError`)."""
    if not isinstance(raw, dict):
        got = type(raw).__name__
        raise BatchArgsError(f"invalid batch args: expected a JSON object, got {got}")
    try:
        return BatchArgs.model_validate(raw)
    except ValidationError as e:
        raise BatchArgsError(f"invalid batch args: {describe_validation_error(e)}") from None


def _decode(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BatchArgsError(f"invalid batch args: {source} is not valid JSON: {e}") from None


def load_batch_args(argv: list[str] | None, env: Mapping[str, str]) -> BatchArgs:
    """Arguments from the command line (``--args-json`` / ``--args-file``) or, without
    either, from ``env[DSI_BATCH_ARGS]``; :class:`BatchArgsError` when absent or bad."""
    p = argparse.ArgumentParser(prog="python -m dsi_worker.batch", description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--args-json", help="BatchArgs as a JSON object")
    src.add_argument("--args-file", help="file holding BatchArgs as a JSON object")
    ns = p.parse_args(argv)
    if ns.args_json is not None:
        return parse_batch_args(_decode(ns.args_json, "--args-json"))
    if ns.args_file is not None:
        try:
            text = Path(ns.args_file).read_text()
        except OSError as e:
            raise BatchArgsError(f"invalid batch args: --args-file: {e}") from None
        return parse_batch_args(_decode(text, f"--args-file {ns.args_file}"))
    if ENV_VAR in env:
        return parse_batch_args(_decode(env[ENV_VAR], ENV_VAR))
    raise BatchArgsError(f"no batch args: set {ENV_VAR} or pass --args-json or --args-file")
