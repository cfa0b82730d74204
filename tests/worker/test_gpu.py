"""GPU path: TP=1 on a small real-size Llama, NCCL, fp16/bf16; kernel injection refused on Llama.

Skipped, with the reason printed, where no CUDA device is visible.  Run on a GPU machine:
``pytest -m gpu -s tests/worker/test_gpu.py`` prints tokens/s per configuration.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from dsi_worker.ports import free_port

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


def test_kernel_inject_on_llama_is_refused_by_name(small_llama: Path) -> None:
    """DeepSpeed 0.19.8's fused Llama kernels failed here under transformers 5 (H200, 2026-12):
    the engine refuses them naming the spec field."""
    from dsi_worker.engine import DistEnv, RankEngine

    eng = RankEngine(
        str(small_llama), dtype="float16", device="cuda", kernel_inject=True,
        dist_env=DistEnv.from_env(),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"serve\.kernelInject"):
        eng.start()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tp1_gpu_autotp_tokens_per_second(small_llama: Path, dtype: str) -> None:
    from dsi_worker.engine import DistEnv, GenRequest, RankEngine, SamplingParams

    eng = RankEngine(
        str(small_llama),
        dtype=dtype,
        device="cuda",
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
        f"\nGPU TP=1 dtype={dtype} DeepSpeed AutoTP: "
        f"{toks / dt:.0f} tok/s (batch 8 x {params.max_new_tokens}), "
        f"single stream {len(out[0].token_ids) / dt:.0f} tok/s"
    )
    del eng
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", ["float16"])
def test_tp1_gpu_plain_hf_tokens_per_second(small_llama: Path, dtype: str) -> None:
    """The baseline the DeepSpeed rows are read against: transformers' own generate()."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(small_llama), dtype=getattr(torch, dtype))
    model = model.to("cuda").eval()
    ids = torch.tensor([list(range(10, 42))] * 8, device="cuda")
    kwargs = {"max_new_tokens": 128, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(ids[:1], **kwargs)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    toks = out.shape[0] * (out.shape[1] - ids.shape[1])  # rows finished early count padding
    assert toks > 0
    print(f"\nGPU TP=1 dtype={dtype} plain transformers: {toks / dt:.0f} tok/s (batch 8 x 128)")
    del model
    torch.cuda.empty_cache()
