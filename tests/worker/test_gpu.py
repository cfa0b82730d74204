"""GPU path (issue item 7): TP=1 on a small real-size Llama, NCCL, fp16/bf16, kernel injection.

Skipped, with the reason printed, where no CUDA device is visible.  Run on a GPU machine:
``pytest -m gpu -s tests/worker/test_gpu.py`` prints tokens/s per configuration.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from dsi_localcluster.testing import free_port

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.worker,
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU visible: GPU path not exercised"
    ),
]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~1B-parameter random Llama (real layer sizes) with the tiny tokenizer."""
    from dsi_worker import tiny_model

    path = tmp_path_factory.mktemp("gpu") / "llama-1b"
    return tiny_model.build(
        path,
        hidden_size=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=8,
        intermediate_size=5632,
        vocab_size=512,
        max_position_embeddings=2048,
        weight_scale=1.0,
    )


@pytest.fixture(scope="module", autouse=True)
def _nccl_group() -> None:
    # A real one-rank NCCL group, as a TP=1 pod would form it.
    port = free_port()
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    assert dist.get_backend() == "nccl"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kernel_inject", [False, True])
def test_tp1_gpu_tokens_per_second(small_llama: Path, dtype: str, kernel_inject: bool) -> None:
    from dsi_worker.engine import DistEnv, GenRequest, RankEngine, SamplingParams

    eng = RankEngine(
        str(small_llama),
        dtype=dtype,
        device="cuda",
        kernel_inject=kernel_inject,
        dist_env=DistEnv.from_env(),
    )
    eng.start()
    assert next(eng.model.parameters()).is_cuda
    params = SamplingParams(max_new_tokens=128)
    batch = [GenRequest(tuple(range(10, 42)), params) for _ in range(8)]
    eng.generate(batch[:1])  # warm-up (kernel build, cuda graphs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = eng.generate(batch)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    toks = sum(len(r.token_ids) for r in out)
    assert toks > 0
    print(
        f"\nGPU TP=1 dtype={dtype} kernel_inject={kernel_inject}: "
        f"{toks / dt:.0f} tok/s (batch 8 x {params.max_new_tokens}), "
        f"single stream {len(out[0].token_ids) / dt:.0f} tok/s"
    )
    del eng
    torch.cuda.empty_cache()
