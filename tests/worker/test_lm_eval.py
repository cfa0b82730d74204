"""lm-evaluation-harness against the served endpoint (docs/evaluation.md).

The harness's `local-completions` model scores the shipped task `examples/eval/dsi_smoke`
(multiple choice, by log-likelihood: token-id prompts, `echo`, `logprobs`, several prompts per
request) through the Serve app's `/v1/completions`; its in-process `hf` model scores the same
task on the same weights. Every per-sample log-likelihood must agree, for a TP 1 group and a
TP 2 group (the sharded all-reduce changes float summation order, hence a tolerance).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dsi_localcluster.wait import wait_for
from dsi_worker.ports import free_port

pytestmark = pytest.mark.worker

ROOT = Path(__file__).resolve().parents[2]
TASK = "dsi_smoke"
SERVED_NAME = "tiny"
# float32 on CPU; sums of 2-6 token log-probs of a random model, |ll| up to ~60.
TOLERANCE = 1e-3
FORM_DEADLINE_S = 420


def evaluate(model: str, model_args: dict[str, Any]) -> dict[tuple[int, int], float]:
    """Run the task through the harness: (doc id, choice index) -> log-likelihood."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ["HF_HUB_OFFLINE"] = "1"  # the task's data and the weights are local files
    cwd = Path.cwd()
    os.chdir(ROOT)  # the task names its data file relative to the repository root
    try:
        result = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(ROOT / "examples" / "eval")),
            log_samples=True,
            batch_size=4,
        )
    finally:
        os.chdir(cwd)
    assert result is not None
    return {
        (s["doc_id"], i): float(resp[0])
        for s in result["samples"][TASK]
        for i, resp in enumerate(s["filtered_resps"])
    }


@pytest.fixture(scope="module")
def hf_loglikelihoods(tiny_model_dir: Path) -> dict[tuple[int, int], float]:
    args = {"pretrained": str(tiny_model_dir), "dtype": "float32", "device": "cpu"}
    return evaluate("hf", args)


@pytest.fixture(scope="module")
def serve_port() -> Iterator[int]:
    """One local Ray for the module, with the rank resources of one TP 2 group (a TP 1 group
    uses the first): starting Ray twice in one process is slow and flaky on 2 cores."""
    import ray
    from dsi_worker.local import start_ray
    from ray import serve

    start_ray(1, 2, num_cpus=4)
    try:
        yield free_port()
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(params=[1, 2], ids=["tp1", "tp2"])
def served(request: pytest.FixtureRequest, tiny_model_dir: Path, serve_port: int) -> Iterator[str]:
    """One group of the given TP size behind Serve; the completions URL yielded."""
    from dsi_worker.local import start_serve
    from ray import serve

    tp: int = request.param
    args = {
        "model": str(tiny_model_dir),
        "dtype": "float32",
        "tensor_parallel_size": tp,
        "num_groups": 1,
        "max_batch_size": 8,
        "max_new_tokens": 32,
        "served_model_name": SERVED_NAME,
        "torch_threads": 1,
    }
    url = start_serve(args, port=serve_port)
    try:
        wait_for(
            lambda: httpx.get(f"{url}/healthz", timeout=10).status_code == 200,
            FORM_DEADLINE_S,
            "the group to form",
        )
        yield f"{url}/v1/completions"
    finally:
        serve.delete("dsi")


def test_harness_loglikelihoods_through_the_endpoint_equal_hf(
    served: str, tiny_model_dir: Path, hf_loglikelihoods: dict[tuple[int, int], float]
) -> None:
    api = evaluate(
        "local-completions",
        {
            "model": SERVED_NAME,
            "base_url": served,
            "tokenizer_backend": "huggingface",
            "tokenizer": str(tiny_model_dir),
            "num_concurrent": 2,
            "max_retries": 1,
        },
    )
    assert api.keys() == hf_loglikelihoods.keys() and len(api) >= 30
    diff = max(abs(api[k] - hf_loglikelihoods[k]) for k in api)
    print(f"\nmax |ll(served) - ll(hf)| over {len(api)} choices: {diff:.2e}")
    assert diff <= TOLERANCE, {k: (api[k], hf_loglikelihoods[k]) for k in api}
    # Not all equal by accident: the choices of one question score differently.
    assert len({round(v, 3) for v in api.values()}) > len(api) // 2
