"""Several ranks per pod in the worker's local mode: each rank process gets its own RANK and
LOCAL_RANK, and a group sharded over pods of several ranks answers with the unsharded
model's greedy tokens. TP 2 in one "pod" all-reduces through DeepSpeed's shared-memory op
(LOCAL_SIZE = WORLD_SIZE); TP 4 as 2 x 2 goes through gloo (ranks on two pods)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.worker

PROMPT = "The quick brown fox"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[int]:
    """Greedy tokens of the unsharded tiny model, in this process."""
    from dsi_worker.engine import DistEnv, GenRequest, RankEngine, SamplingParams
    from dsi_worker.model_files import load_tokenizer

    eng = RankEngine(str(tiny_model_dir), dtype="float32", device="cpu", dist_env=DistEnv())
    eng.start()
    ids = tuple(load_tokenizer(str(tiny_model_dir))(PROMPT)["input_ids"])
    (res,) = eng.generate([GenRequest(ids, SamplingParams(max_new_tokens=MAX_TOKENS))])
    return list(res.token_ids)


def _rank_info() -> list[dict[str, Any]]:
    from ray import serve

    handle = serve.get_deployment_handle("group-0", app_name="dsi")
    infos: list[dict[str, Any]] = handle.status.remote().result()["rank_info"]
    return infos


@pytest.mark.parametrize("tp,k", [(4, 2), (2, 2)])
def test_group_of_multi_rank_pods_serves_the_unsharded_tokens(
    tiny_server: Callable[..., AbstractContextManager[str]],
    tiny_model_dir: Path,
    reference: list[int],
    tp: int,
    k: int,
) -> None:
    args = {"tensor_parallel_size": tp, "ranks_per_pod": k, "max_new_tokens": MAX_TOKENS}
    with tiny_server(tiny_model_dir, **args) as url:
        infos = _rank_info()
        assert [i["rank"] for i in infos] == list(range(tp))
        assert [i["local_rank"] for i in infos] == [r % k for r in range(tp)]
        assert [i["pod_index"] for i in infos] == [str(r // k) for r in range(tp)]
        assert {i["world_size"] for i in infos} == {tp}
        # All ranks in one pod: DeepSpeed's shared-memory all-reduce; across pods: gloo.
        assert {i["allreduce"] for i in infos} == {"shm" if k == tp else "process-group"}
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        r = httpx.post(f"{url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == reference
