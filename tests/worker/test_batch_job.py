"""The batch job end to end on a local Ray with the tiny model: groups of TP 2 rank actors in
local mode (each rank gets the env the operator would give its pod).

Every row of the input appears exactly once in the output, with its id: after a clean run,
after a rank actor is killed mid-run (its whole group is replaced and its batches retried),
and after a run is interrupted and started again (finished shards are skipped, the rest
redone). Greedy outputs equal the unsharded model's, one prompt at a time, as the serving
path answers them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dsi_localcluster.wait import wait_for

pytestmark = pytest.mark.worker

TP = 2
MAX_TOKENS = 4
#: max_model_len of the Parquet test: some of its prompts fill it, some nearly.
CONTEXT = 12
WORDS = "the quick brown fox jumps over lazy dog ray serves deepspeed groups of ranks".split()


def prompts(n: int, salt: int = 0) -> list[str]:
    """``n`` prompts of 1 to 9 words: batches mix lengths, so rows are left-padded."""
    return [
        " ".join(WORDS[(i * 7 + j * 3 + salt) % len(WORDS)] for j in range(1 + i % 9)) + f" {i}"
        for i in range(n)
    ]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))


def job_args(model_dir: Path, inp: Path, out: Path, **over: Any) -> Any:
    from dsi_worker.batch.args import parse_batch_args

    raw: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": "float32",
        "device": "cpu",
        "tensor_parallel_size": TP,
        "num_groups": 2,
        "local_mode": True,
        "torch_threads": 1,
        "form_timeout_s": 420,
        "input": {"path": str(inp)},
        "output": {"path": str(out)},
        "generation": {"max_tokens": MAX_TOKENS},
        "rows_per_shard": 250,
    }
    raw.update(over)
    return parse_batch_args(raw)


def outputs(out: Path) -> list[dict[str, Any]]:
    """Every output row, part by part."""
    from dsi_worker.batch.tables import read_part

    return [row for p in sorted(out.glob("part-*")) for row in read_part(p)]


def assert_exactly_once(out: Path, want_ids: list[Any], shards: int) -> list[dict[str, Any]]:
    """Each expected id once, nothing else, a part per shard, ``_SUCCESS``, no debris."""
    rows = outputs(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears twice"
    assert sorted(map(str, ids)) == sorted(map(str, want_ids))
    fmt = next(out.glob("part-*")).suffix
    assert sorted(p.name for p in out.glob("part-*")) == [
        f"part-{k:05d}{fmt}" for k in range(shards)
    ]
    assert (out / "_SUCCESS").exists()
    assert not list(out.glob(".*.tmp"))
    assert sorted(json.loads((out / "_dsi_done.json").read_text())["done"]) == list(range(shards))
    return rows


def quiet_reporters(buf: io.StringIO) -> Any:
    from dsi_worker.batch.progress import LogReporter, Reporters

    return Reporters([LogReporter(buf)])


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """One local Ray for the module, carrying the rank resources of 2 groups of TP 2."""
    import ray
    from dsi_worker.local import start_ray

    start_ray(2, TP, num_cpus=4)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@dataclass
class Run:
    inp: Path
    out: Path
    ids: list[str]
    summary: Any
    log: str


@pytest.fixture(scope="module")
def jsonl_run(
    ray_address: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    """2000 rows in two JSON Lines files through 2 groups of TP 2."""
    from dsi_worker.batch.job import run_job

    base = tmp_path_factory.mktemp("jsonl")
    texts = prompts(2000)
    write_jsonl(base / "in" / "a.jsonl", texts[:1200])
    write_jsonl(base / "in" / "b.jsonl", texts[1200:])
    ids = [f"a.jsonl:{i}" for i in range(1200)] + [f"b.jsonl:{i}" for i in range(800)]
    buf = io.StringIO()
    args = job_args(tiny_model_dir, base / "in", base / "out")
    summary = run_job(args, env={}, reporters=quiet_reporters(buf))
    return Run(base / "in", base / "out", ids, summary, buf.getvalue())


def test_every_row_is_answered_exactly_once(jsonl_run: Run) -> None:
    s = jsonl_run.summary
    assert (s.shards_total, s.shards_written, s.shards_skipped) == (9, 9, 0)
    assert s.rows_written == 2000 and s.group_replacements == 0
    rows = assert_exactly_once(jsonl_run.out, jsonl_run.ids, 9)
    # a.jsonl's 1200 rows are shards 0..4 (250, 250, 250, 250, 200), b.jsonl's 800 are
    # shards 5..8 (250, 250, 250, 50).
    from dsi_worker.batch.tables import read_part

    assert [r["id"] for r in read_part(jsonl_run.out / "part-00004.jsonl")][0] == "a.jsonl:1000"
    assert [r["id"] for r in read_part(jsonl_run.out / "part-00005.jsonl")][0] == "b.jsonl:0"
    for r in rows:
        assert r["finish_reason"] in ("length", "stop") and r["prompt_tokens"] > 0
        assert 0 < r["completion_tokens"] <= MAX_TOKENS or r["finish_reason"] == "stop"
    last = jsonl_run.log.strip().splitlines()[-1]
    assert last.startswith("DSI_PROGRESS ")
    final = json.loads(last.split(" ", 1)[1])
    assert final["rows_done"] == final["rows_total"] == 2000
    assert final["shards_done"] == final["shards_total"] == 9 and final["groups_alive"] == 2


def test_greedy_outputs_equal_the_unsharded_models_answers(
    jsonl_run: Run, tiny_model_dir: Path
) -> None:
    """What serving answers for one prompt alone (the TP group answers with the unsharded
    model's greedy tokens, test_multi_rank_pods): the batch job's rows were generated in
    padded batches of 16 on TP 2 groups and must be the same."""
    from dsi_worker.engine import DistEnv, GenRequest, RankEngine, SamplingParams
    from dsi_worker.model_files import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    eng = RankEngine(str(tiny_model_dir), dtype="float32", device="cpu", dist_env=DistEnv())
    eng.start()
    rows = outputs(jsonl_run.out)[::97]
    assert len(rows) > 15
    for r in rows:
        ids = tuple(tok(r["prompt"], add_special_tokens=True)["input_ids"])
        (res,) = eng.generate([GenRequest(ids, SamplingParams(max_new_tokens=MAX_TOKENS))])
        want = tok.decode(list(res.token_ids), skip_special_tokens=True)
        got = (r["text"], r["finish_reason"], r["completion_tokens"], r["prompt_tokens"])
        assert got == (want, res.finish_reason, len(res.token_ids), len(ids)), r["id"]


def test_a_rerun_redoes_only_the_missing_shard(
    jsonl_run: Run, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from dsi_worker.batch.job import run_job

    out = tmp_path / "out"
    shutil.copytree(jsonl_run.out, out)
    before = (out / "part-00003.jsonl").read_text()
    (out / "part-00003.jsonl").unlink()
    (out / "_SUCCESS").unlink()
    marker = json.loads((out / "_dsi_done.json").read_text())
    marker["done"].remove(3)
    (out / "_dsi_done.json").write_text(json.dumps(marker))
    (out / ".part-00003.jsonl.tmp").write_text('{"id": "half a row')
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    # One group is enough (the group count is not part of the fingerprint).
    args = job_args(tiny_model_dir, jsonl_run.inp, out, num_groups=1)
    summary = run_job(args, env={}, reporters=quiet_reporters(io.StringIO()))
    assert (summary.shards_written, summary.shards_skipped, summary.rows_written) == (1, 8, 250)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*") if p.name in mtimes} == mtimes
    assert (out / "part-00003.jsonl").read_text() == before  # greedy: the same rows again
    assert_exactly_once(out, jsonl_run.ids, 9)
    # Different generation arguments on the same output: refused, nothing touched.
    from dsi_worker.batch.job import JobFailed

    other = job_args(tiny_model_dir, jsonl_run.inp, out, generation={"max_tokens": 5})
    with pytest.raises(JobFailed, match="different input or different arguments"):
        run_job(other, env={}, reporters=quiet_reporters(io.StringIO()))
    assert (out / "_SUCCESS").exists()


def test_parquet_in_and_out_with_an_id_column_and_a_short_context(
    ray_address: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dsi_worker.batch.job import run_job

    (tmp_path / "in").mkdir()
    texts = prompts(240, salt=5)
    for name, lo, hi in (("p1.parquet", 0, 150), ("p2.parquet", 150, 240)):
        t = pa.table({"uid": list(range(lo, hi)), "text": texts[lo:hi]})
        pq.write_table(t, tmp_path / "in" / name, row_group_size=64)
    args = job_args(
        tiny_model_dir,
        tmp_path / "in",
        tmp_path / "out",
        num_groups=1,
        rows_per_shard=100,
        max_model_len=CONTEXT,
        input={"path": str(tmp_path / "in"), "format": "parquet", "prompt_column": "text",
               "id_column": "uid"},
        output={"path": str(tmp_path / "out"), "format": "parquet"},
    )  # fmt: skip
    summary = run_job(args, env={}, reporters=quiet_reporters(io.StringIO()))
    assert summary.shards_written == 3  # p1: 100 + 50, p2: 90
    rows = assert_exactly_once(tmp_path / "out", list(range(240)), 3)
    assert all(isinstance(r["id"], int) for r in rows)
    assert {r["id"]: r["prompt"] for r in rows} == dict(enumerate(texts))
    # A prompt that fills the context is answered without generating; one close to it
    # gets the tokens that fit.
    full = [r for r in rows if r["prompt_tokens"] >= CONTEXT]
    assert full and all(
        (r["text"], r["finish_reason"], r["completion_tokens"])
        == ("", "context_length_exceeded", 0)
        for r in full
    )
    near = [r for r in rows if CONTEXT - MAX_TOKENS < r["prompt_tokens"] < CONTEXT]
    assert near and all(r["completion_tokens"] <= CONTEXT - r["prompt_tokens"] for r in near)
    schema = pq.read_schema(tmp_path / "out" / "part-00000.parquet")
    assert schema.names == ["id", "prompt", "text", "finish_reason", "prompt_tokens",
                            "completion_tokens"]  # fmt: skip


def _done(out: Path) -> set[int]:
    try:
        return set(json.loads((out / "_dsi_done.json").read_text())["done"])
    except (OSError, ValueError):
        return set()


def _kill_rank(group: int, rank: int) -> str:
    import ray

    prefix = f"dsi-batch-g{group}-r{rank}-"
    (named,) = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]
    ray.kill(ray.get_actor(named["name"], namespace=named["namespace"]), no_restart=True)
    return str(named["name"])


def test_a_killed_rank_replaces_its_group_and_loses_no_row(
    ray_address: str, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dsi_worker.batch.job import run_job

    write_jsonl(tmp_path / "in" / "rows.jsonl", prompts(1600, salt=3))
    out = tmp_path / "out"
    args = job_args(
        tiny_model_dir, tmp_path / "in", out, rows_per_shard=100, batch_size=8,
        generation={"max_tokens": 6},
    )  # fmt: skip
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["summary"] = run_job(args, env={}, reporters=quiet_reporters(io.StringIO()))
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    with caplog.at_level(logging.INFO, logger="dsi_worker.batch"):
        t.start()
        wait_for(lambda: len(_done(out)) >= 2 or not t.is_alive(), 420, "2 shards done")
        assert len(_done(out)) < 16, "the job ended before the kill"
        killed = _kill_rank(0, 1)
        t.join(600)
    assert "error" not in result, result.get("error")
    s = result["summary"]
    assert s.group_replacements == 1
    (rep,) = s.replacements
    assert rep.group == 0 and killed.endswith(rep.old_epoch) and rep.new_epoch != rep.old_epoch
    assert any("replaced by epoch" in r.getMessage() for r in caplog.records)
    assert_exactly_once(out, [f"rows.jsonl:{i}" for i in range(1600)], 16)


def test_a_killed_driver_is_resumed_by_the_next_run(
    ray_address: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``python -m dsi_worker.batch`` killed mid-run (SIGKILL: no cleanup), then run again:
    the shards it finished are skipped, everything else is written once."""
    from dsi_worker.batch.job import run_job

    write_jsonl(tmp_path / "in" / "rows.jsonl", prompts(1200, salt=1))
    out = tmp_path / "out"
    args = job_args(
        tiny_model_dir, tmp_path / "in", out, num_groups=1, rows_per_shard=100, batch_size=8,
        generation={"max_tokens": 6},
    )  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_address, "DSI_BATCH_ARGS": args.model_dump_json()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsi_worker.batch"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: len(_done(out)) >= 2 or proc.poll() is not None, 420, "2 shards done")
    finally:
        proc.send_signal(signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=60)
    done = _done(out)
    assert 2 <= len(done) < 12, stdout[-3000:]
    assert "DSI_PROGRESS {" in stdout
    assert not (out / "_SUCCESS").exists()
    mtimes = {k: (out / f"part-{k:05d}.jsonl").stat().st_mtime_ns for k in done}
    summary = run_job(args.model_copy(update={"num_groups": 2}), env={},
                      reporters=quiet_reporters(io.StringIO()))  # fmt: skip
    assert summary.shards_skipped == len(done)
    assert summary.shards_written == 12 - len(done)
    assert {k: (out / f"part-{k:05d}.jsonl").stat().st_mtime_ns for k in done} == mtimes
    assert_exactly_once(out, [f"rows.jsonl:{i}" for i in range(1200)], 12)


def test_the_job_fails_clearly_when_the_restart_budget_is_spent(
    ray_address: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Weights that cannot load: the group fails to form, is replaced once (the budget),
    fails again, and the job fails naming the budget and the last failure."""
    from dsi_worker.batch.job import JobFailed, run_job

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    write_jsonl(tmp_path / "in" / "rows.jsonl", prompts(20))
    args = job_args(broken, tmp_path / "in", tmp_path / "out", num_groups=1, max_group_restarts=1)
    with pytest.raises(JobFailed) as e:
        run_job(args, env={}, reporters=quiet_reporters(io.StringIO()))
    msg = str(e.value)
    assert "restart budget (1 group replacements) is exhausted" in msg
    assert "forming failed" in msg and "\n" not in msg
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert not list((tmp_path / "out").glob("part-*"))
