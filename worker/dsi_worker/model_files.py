"""A model's files through transformers: where the model is, its weights, its tokenizer and
its context length. Offline first: files already on disk (or in the Hugging Face cache) are
never fetched again.

Shared by the rank engine (:mod:`dsi_worker.engine`), the resharder
(:mod:`dsi_worker.sharded`), the ingress (:mod:`dsi_worker.app`) and the batch job.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from dsi_worker import tiny_model

log = logging.getLogger(__name__)

#: The context length assumed when the model's config names none.
DEFAULT_CONTEXT_LEN = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def resolve_model_path(model: str | None) -> str:
    """``None`` -> the tiny test model (built on first use); anything else unchanged."""
    if model is None or model in ("tiny", "dsi-tiny-llama"):
        return str(tiny_model.build())
    return model


def is_local(model: str) -> bool:
    """Whether ``model`` names a directory on this host (not a hub id)."""
    return Path(model).expanduser().is_dir()


def load_model(model: str, *, revision: str | None, dtype: Any) -> Any:
    """Load a causal LM with transformers; offline when the files are already present."""
    from transformers import AutoModelForCausalLM

    if is_local(model):
        return AutoModelForCausalLM.from_pretrained(
            str(Path(model).expanduser()), dtype=dtype, local_files_only=True
        )
    try:
        # A hub id whose files are cached: no network needed.
        return AutoModelForCausalLM.from_pretrained(
            model, revision=revision, dtype=dtype, local_files_only=True
        )
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        log.info("model %s not cached; downloading", model)
        return AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype)


def load_tokenizer(model: str, *, revision: str | None = None) -> Any:
    """Load the tokenizer the same way as the model (offline first)."""
    from transformers import AutoTokenizer

    if is_local(model):
        return AutoTokenizer.from_pretrained(str(Path(model).expanduser()), local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(model, revision=revision, local_files_only=True)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        return AutoTokenizer.from_pretrained(model, revision=revision)


def context_len(model: str, *, revision: str | None = None) -> int:
    """The longest sequence the model's config allows (prompt and generated tokens), from
    the first of its config's usual keys; :data:`DEFAULT_CONTEXT_LEN` when it has none."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, revision=revision, local_files_only=is_local(model))
    for key in _CONTEXT_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return DEFAULT_CONTEXT_LEN
