"""The batch job's parts that need no Ray: arguments, sharding and row ids, the resume
marker and its fingerprint, reading and writing parts, and progress reporting."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dsi_operator.api.progress import BatchProgress
from dsi_worker.batch import progress as P
from dsi_worker.batch.args import BatchArgs, BatchArgsError, load_batch_args, parse_batch_args
from dsi_worker.batch.job import plan_job
from dsi_worker.batch.shards import (
    MARKER,
    SUCCESS,
    InputError,
    Marker,
    OutputMismatch,
    fingerprint,
    input_paths,
    load_marker,
    part_name,
    plan_shards,
)
from dsi_worker.batch.tables import OUTPUT_COLUMNS, read_part, read_shard, scan_file, write_part


def _args(tmp_path: Path, **over: Any) -> BatchArgs:
    raw: dict[str, Any] = {
        "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "rows_per_shard": 2,
    }
    raw.update(over)
    return parse_batch_args(raw)


def _jsonl(path: Path, rows: list[Any], blank_after: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    path.write_text("\n".join(lines) + "\n")


# -- arguments ------------------------------------------------------------------------------


def test_defaults_are_the_contract_and_the_serving_apps() -> None:
    from dsi_worker.config import AppArgs

    a = parse_batch_args({"input": {"path": "i"}, "output": {"path": "o"}})
    assert (a.input.format, a.input.prompt_column, a.input.id_column) == ("jsonl", "prompt", None)
    g = a.generation
    assert (g.max_tokens, g.temperature, g.top_p, g.seed) == (64, 0.0, 1.0, None)
    assert (a.batch_size, a.rows_per_shard, a.max_group_restarts) == (16, 1000, 3)
    app = AppArgs()
    for name in ("tensor_parallel_size", "num_groups", "dtype", "device", "form_timeout_s"):
        assert getattr(a, name) == getattr(app, name), name
    # Sharing AppArgs' field definitions must not change AppArgs itself.
    assert AppArgs.model_fields["tensor_parallel_size"].metadata == (
        BatchArgs.model_fields["tensor_parallel_size"].metadata
    )
    assert len(AppArgs.model_fields["tensor_parallel_size"].metadata) == 2


@pytest.mark.parametrize(
    "over,field,allowed",
    [
        ({"input": {"path": "i", "format": "csv"}}, "input.format", "'jsonl' or 'parquet'"),
        ({"output": {"path": "o", "format": "csv"}}, "output.format", "'jsonl' or 'parquet'"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size", "greater than or equal to 1"),
        ({"dtype": "int8"}, "dtype", "'auto', 'float32', 'float16' or 'bfloat16'"),
        ({"generation": {"temperature": 3}}, "generation.temperature", "less than or equal"),
        ({"generation": {"max_tokens": 0}}, "generation.max_tokens", "greater than or equal"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"generation": {"top_k": 5}}, "generation.top_k", "Extra inputs are not permitted"),
        # AppArgs' own cross-field rules, with AppArgs' messages:
        ({"tensor_parallel_size": 3, "ranks_per_pod": 2}, "tensor_parallel_size", "multiple"),
        ({"local_master_ports": [70000]}, "local_master_ports", "1..65535"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(
    over: dict[str, Any], field: str, allowed: str
) -> None:
    raw: dict[str, Any] = {"input": {"path": "i"}, "output": {"path": "o"}, **over}
    with pytest.raises(BatchArgsError) as e:
        parse_batch_args(raw)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("invalid batch args: ") and field in msg and allowed in msg, msg


def test_args_come_from_the_cli_or_the_environment(tmp_path: Path) -> None:
    body = {"input": {"path": "i"}, "output": {"path": "o"}, "num_groups": 3}
    env = {"DSI_BATCH_ARGS": json.dumps({**body, "num_groups": 2})}
    assert load_batch_args([], env).num_groups == 2
    assert load_batch_args(["--args-json", json.dumps(body)], env).num_groups == 3
    f = tmp_path / "args.json"
    f.write_text(json.dumps({**body, "num_groups": 4}))
    assert load_batch_args(["--args-file", str(f)], env).num_groups == 4
    with pytest.raises(BatchArgsError, match="set DSI_BATCH_ARGS"):
        load_batch_args([], {})
    with pytest.raises(BatchArgsError, match="DSI_BATCH_ARGS is not valid JSON"):
        load_batch_args([], {"DSI_BATCH_ARGS": "{nope"})
    with pytest.raises(BatchArgsError, match="expected a JSON object, got list"):
        load_batch_args(["--args-json", "[]"], {})


def test_the_command_exits_2_with_one_line_naming_the_field() -> None:
    bad = {"input": {"path": "i", "format": "csv"}, "output": {"path": "o"}}
    env = {**os.environ, "DSI_BATCH_ARGS": json.dumps(bad)}
    r = subprocess.run(
        [sys.executable, "-m", "dsi_worker.batch"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "input.format" in lines[0] and "'jsonl' or 'parquet'" in lines[0]


def test_a_foreign_output_directory_fails_the_job_with_exit_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dsi_worker.batch.__main__ import main

    _jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": "x"}])
    out = tmp_path / "out"
    out.mkdir()
    Marker("someone-elses", 1, {0}).save(out)
    args = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(out)}}
    with caplog.at_level(logging.ERROR):
        assert main(["--args-json", json.dumps(args)]) == 1
    last = caplog.records[-1].getMessage()
    assert last.startswith("batch job failed: output.path") and "different input" in last


# -- sharding, ids, reading -------------------------------------------------------------------


def test_shards_are_consecutive_rows_of_one_file_numbered_over_sorted_files(
    tmp_path: Path,
) -> None:
    _jsonl(tmp_path / "in" / "b.jsonl", [{"prompt": f"b{i}"} for i in range(3)])
    _jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": f"a{i}"} for i in range(5)], blank_after=2)
    (tmp_path / "in" / "notes.txt").write_text("not input")
    args = _args(tmp_path)
    paths = input_paths(args.input)
    assert [name for _, name in paths] == ["a.jsonl", "b.jsonl"]
    files = [scan_file(p, n, "jsonl", 2) for p, n in paths]
    assert [f.rows for f in files] == [5, 3]  # the blank line is not a row
    shards = plan_shards(files, 2)
    assert [(s.id, s.file.name, s.start, s.rows) for s in shards] == [
        (0, "a.jsonl", 0, 2),
        (1, "a.jsonl", 2, 2),
        (2, "a.jsonl", 4, 1),
        (3, "b.jsonl", 0, 2),
        (4, "b.jsonl", 2, 1),
    ]
    got = [(r.id, r.prompt) for s in shards for r in read_shard(s, args.input)]
    want = [(f"a.jsonl:{i}", f"a{i}") for i in range(5)] + [
        (f"b.jsonl:{i}", f"b{i}") for i in range(3)
    ]
    assert got == want
    assert part_name(3, "jsonl") == "part-00003.jsonl"
    assert part_name(12345, "parquet") == "part-12345.parquet"


def test_an_id_column_gives_the_ids_and_bad_rows_are_named(tmp_path: Path) -> None:
    _jsonl(tmp_path / "in" / "a.jsonl", [{"q": "x", "key": 7}, {"q": "y", "key": "k"}, {"q": 1}])
    args = _args(
        tmp_path, input={"path": str(tmp_path / "in"), "prompt_column": "q", "id_column": "key"}
    )
    (f,) = [scan_file(p, n, "jsonl", 2) for p, n in input_paths(args.input)]
    first, second = plan_shards([f], 2)
    assert [(r.id, r.prompt) for r in read_shard(first, args.input)] == [(7, "x"), ("k", "y")]
    with pytest.raises(InputError, match=r"a.jsonl row 2: prompt column 'q': int, not text"):
        read_shard(second, args.input)
    no_id = args.model_copy(update={"input": args.input.model_copy(update={"id_column": "id"})})
    with pytest.raises(InputError, match=r"a.jsonl row 0: id column 'id' is missing"):
        read_shard(first, no_id.input)
    with pytest.raises(InputError, match="no such file or directory"):
        input_paths(args.input.model_copy(update={"path": str(tmp_path / "nope")}))


def test_parquet_shards_span_row_groups(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    table = pa.table({"prompt": [f"p{i}" for i in range(10)], "n": list(range(10))})
    pq.write_table(table, tmp_path / "in" / "x.parquet", row_group_size=3)
    args = _args(
        tmp_path, input={"path": str(tmp_path / "in"), "format": "parquet"}, rows_per_shard=4
    )
    (f,) = [scan_file(p, n, "parquet", 4) for p, n in input_paths(args.input)]
    shards = plan_shards([f], 4)
    assert [(s.start, s.rows) for s in shards] == [(0, 4), (4, 4), (8, 2)]
    got = [(r.id, r.prompt) for s in shards for r in read_shard(s, args.input)]
    assert got == [(f"x.parquet:{i}", f"p{i}") for i in range(10)]
    bad = args.input.model_copy(update={"prompt_column": "text"})
    with pytest.raises(InputError, match="x.parquet: no column 'text'"):
        read_shard(shards[0], bad)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_parts_are_written_whole_with_the_contract_columns(tmp_path: Path, fmt: Any) -> None:
    rows = [
        {"id": f"a:{i}", "prompt": "p", "text": "t ü", "finish_reason": "length",
         "prompt_tokens": 3, "completion_tokens": 4}
        for i in range(3)
    ]  # fmt: skip
    path = tmp_path / part_name(0, fmt)
    write_part(path, rows, fmt)
    assert read_part(path) == rows
    assert list(read_part(path)[0]) == list(OUTPUT_COLUMNS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


# -- marker and fingerprint -------------------------------------------------------------------


def test_the_fingerprint_follows_what_changes_the_output(tmp_path: Path) -> None:
    _jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    base = _args(tmp_path)

    def fp(args: BatchArgs) -> str:
        return fingerprint(input_paths(args.input), args)

    same = fp(base)
    assert fp(_args(tmp_path, batch_size=3, num_groups=4, tensor_parallel_size=2)) == same
    assert fp(_args(tmp_path, generation={"max_tokens": 5})) != same
    assert fp(_args(tmp_path, rows_per_shard=1)) != same
    assert fp(_args(tmp_path, model="other")) != same
    _jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": "x"}, {"prompt": "z"}])
    assert fp(base) != same


def test_plan_resumes_from_the_marker_and_refuses_foreign_outputs(tmp_path: Path) -> None:
    _jsonl(tmp_path / "in" / "a.jsonl", [{"prompt": f"p{i}"} for i in range(7)])
    args = _args(tmp_path)
    plan = plan_job(args)
    out = plan.out
    assert [s.id for s in plan.todo] == [0, 1, 2, 3]
    assert json.loads((out / MARKER).read_text())["done"] == []
    # Shards 0, 1 and 3 finished, 3 without its file; 2 was being written when killed.
    for k in (0, 1):
        (out / part_name(k, "jsonl")).write_text("{}\n")
    plan.marker.done |= {0, 1, 3}
    plan.marker.save(out)
    (out / ".part-00002.jsonl.tmp").write_text("half")
    (out / SUCCESS).write_text("")
    again = plan_job(args)
    assert [s.id for s in again.todo] == [2, 3]
    assert not (out / ".part-00002.jsonl.tmp").exists() and not (out / SUCCESS).exists()
    # Different generation args: refused, nothing touched.
    with pytest.raises(OutputMismatch, match="different input or different arguments"):
        plan_job(_args(tmp_path, generation={"max_tokens": 9}))
    assert (out / part_name(0, "jsonl")).exists()
    (out / MARKER).unlink()
    with pytest.raises(OutputMismatch, match="holds part-00000.jsonl but no _dsi_done.json"):
        load_marker(out, "fp", 4)


# -- progress ---------------------------------------------------------------------------------


def _counts(done: int, total: int, rate: float, alive: int, shards: int, of: int) -> BatchProgress:
    return BatchProgress(
        rows_done=done,
        rows_total=total,
        rows_per_second=rate,
        groups_alive=alive,
        shards_done=shards,
        shards_total=of,
        group_restarts=0,
    )


def _progress() -> BatchProgress:
    return _counts(1200, 5000, 12.54, 2, 3, 5)


def test_configmap_data_is_strings_under_the_contract_keys() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    assert P.configmap_data(_progress(), at) == {
        "rowsDone": "1200",
        "rowsTotal": "5000",
        "rowsPerSecond": "12.5",
        "groupsAlive": "2",
        "shardsDone": "3",
        "shardsTotal": "5",
        "groupRestarts": "0",
        "progressUpdatedAt": "2026-01-02T03:04:05Z",
    }


def test_progress_is_import_light() -> None:
    code = (
        "import sys, dsi_worker.batch.progress as p; "
        "p.configmap_data(p.BatchProgress(rows_done=0, rows_total=0)); "
        "print(sorted(m for m in ('ray', 'torch', 'kubernetes', 'transformers') "
        "if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_the_log_reporter_prints_at_most_every_2s_and_always_the_last() -> None:
    now = [0.0]
    buf = io.StringIO()
    rep = P.LogReporter(buf, clock=lambda: now[0])
    for t in (0.0, 0.5, 1.9, 2.0, 3.0):
        now[0] = t
        rep.report(_progress())
    rep.report(_progress(), final=True)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3  # t=0, t=2, final
    prefix, body = lines[-1].split(" ", 1)
    assert prefix == "DSI_PROGRESS"
    assert json.loads(body) == {
        "rows_done": 1200,
        "rows_total": 5000,
        "rows_per_second": 12.54,
        "groups_alive": 2,
        "shards_done": 3,
        "shards_total": 5,
        "group_restarts": 0,
    }


class _FakeApi:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[Any, ...]] = []

    def patch_namespaced_config_map(self, name: str, namespace: str, body: Any, **kw: Any) -> None:
        self.calls.append((name, namespace, body, kw))
        if self.fail:
            raise RuntimeError("Forbidden: configmaps is forbidden\nmore")


def test_the_configmap_reporter_merge_patches_the_latest_progress() -> None:
    api = _FakeApi()
    rep = P.ConfigMapReporter("job-progress", "ns1", api=api, every_s=0.01)
    rep.report(_progress())
    rep.report(_counts(5000, 5000, 20.0, 0, 5, 5), final=True)
    rep.close()
    name, ns, body, kw = api.calls[-1]
    assert (name, ns) == ("job-progress", "ns1")
    assert kw["_content_type"] == "application/merge-patch+json"
    assert body["data"]["rowsDone"] == "5000" and body["data"]["groupsAlive"] == "0"
    assert set(body) == {"data"}


def test_a_failed_configmap_patch_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    api = _FakeApi(fail=True)
    rep = P.ConfigMapReporter("cm", "ns", api=api, every_s=0.01)
    with caplog.at_level(logging.WARNING):
        rep.report(_progress(), final=True)
        rep.close()
    assert rep.failures >= 1 and rep.patches == 0
    assert any(
        "progress ConfigMap ns/cm not updated: Forbidden" in r.getMessage() for r in caplog.records
    )


def test_reporters_from_env_find_the_namespace(tmp_path: Path) -> None:
    assert len(P.reporters_from_env({}).reporters) == 1
    r = P.reporters_from_env({"DSI_PROGRESS_CONFIGMAP": "cm", "DSI_NAMESPACE": "team-a"})
    cm = r.reporters[1]
    assert isinstance(cm, P.ConfigMapReporter) and cm.namespace == "team-a"
    cm.close()
    sa = tmp_path / "namespace"
    sa.write_text("team-b\n")
    assert P.service_account_namespace({}, sa) == "team-b"
    with pytest.raises(RuntimeError, match="DSI_NAMESPACE"):
        P.service_account_namespace({}, tmp_path / "missing")
