"""Shared fixtures for the worker tests (CPU: torch, ray, deepspeed)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from dsi_localcluster.wait import wait_for
from dsi_worker.ports import free_port

# How long a tiny group may take to form on 2 busy cores.
FORM_DEADLINE_S = 420


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


@contextmanager
def serve_tiny(model_dir: Path, **args: Any) -> Iterator[str]:
    """Groups of the tiny model behind Serve on a fresh local Ray (one TP 1 group unless
    ``args`` say otherwise); its base URL.

    ``args`` are extra app args (AppArgs names). /healthz needs no API key, so the wait for
    the group to form works with ``api_key_env`` set too.
    """
    import ray
    from dsi_worker.local import start_ray, start_serve
    from ray import serve

    # Every rank-pinning resource the app will ask for (as the operator's pods declare them).
    start_ray(args.get("num_groups", 1), args.get("tensor_parallel_size", 1), num_cpus=4)
    try:
        app = {
            "model": str(model_dir),
            "dtype": "float32",
            "max_new_tokens": 8,
            "served_model_name": "tiny",
            "torch_threads": 1,
            **args,
        }
        base = start_serve(app, port=free_port())
        wait_for(
            lambda: httpx.get(f"{base}/healthz", timeout=10).status_code == 200,
            FORM_DEADLINE_S,
            "the group to form",
        )
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_server() -> Callable[..., AbstractContextManager[str]]:
    """:func:`serve_tiny`, for module fixtures: ``with tiny_server(model_dir, **args) as url``."""
    return serve_tiny
