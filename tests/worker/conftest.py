"""Shared fixtures for the worker tests (CPU: torch, ray, deepspeed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama + byte-level tokenizer, saved like a real checkpoint."""
    from dsi_worker import tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    return tiny_model.build(path)


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads() -> None:
    # Two cores shared by several processes: one torch thread per process.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
