"""Sharded loading (dsi_worker.sharded): reshard the tiny model for TP 2 once; a 2-rank group
then builds the model on the meta device and reads only its own shard, with the same tokens
as the unsharded model.  Shards that exist but cannot be used fail with the file's name;
shards only for another TP size leave the full load in place."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from dsi_localcluster.testing import run_spawned
from dsi_worker import sharded
from dsi_worker.engine import DistEnv, GenRequest, RankEngine, SamplingParams
from dsi_worker.model_files import load_tokenizer
from dsi_worker.ports import free_port

pytestmark = pytest.mark.worker

PROMPTS = ["Hello, world!", "DeepSpeed splits a large", "The quick brown fox"]


@pytest.fixture(scope="module")
def sharded_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model with TP 2 shards (the session's copy stays unsharded: other
    tests' TP 2 groups must keep taking the full path)."""
    d = tmp_path_factory.mktemp("sharded") / "tiny-llama"
    shutil.copytree(tiny_model_dir, d)
    sharded.reshard(d, 2)
    return d


def _record_opens() -> dict[str, list[str]]:
    """Record every file this process opens through safetensors (what transformers reads
    weights with) and every shard file ``sharded.read_shard_into`` reads; installed before
    transformers is imported."""
    import safetensors
    import safetensors.torch

    opened: list[str] = []
    shards: list[str] = []
    real_read_shard = sharded.read_shard_into
    real_open, real_load = safetensors.safe_open, safetensors.torch.load_file

    def safe_open(filename: Any, *a: Any, **kw: Any) -> Any:
        opened.append(str(filename))
        return real_open(filename, *a, **kw)

    def load_file(filename: Any, *a: Any, **kw: Any) -> Any:
        opened.append(str(filename))
        return real_load(filename, *a, **kw)

    def read_shard_into(path: Any, *a: Any, **kw: Any) -> int:
        shards.append(str(path))
        return real_read_shard(path, *a, **kw)

    safetensors.safe_open = safe_open  # type: ignore[assignment]
    safetensors.torch.load_file = load_file
    sharded.read_shard_into = read_shard_into  # type: ignore[assignment]
    return {"safetensors": opened, "shards": shards}


def _rank_main(rank: int, port: int, path: str, batch: list[GenRequest], q: Any) -> None:
    opened = _record_opens()
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        LOCAL_RANK="0",
    )  # fmt: skip
    try:
        eng = RankEngine(path, dtype="float32", device="cpu", torch_threads=1, form_timeout_s=120)
        eng.start()
        out = eng.generate(batch)
        q.put((rank, out, eng.shard_report(), eng.info(), opened))
        eng.close()
    except BaseException as e:  # report instead of hanging the parent
        q.put((rank, e, None, None, None))


def _run_group(path: Path, batch: list[GenRequest]) -> list[tuple[Any, ...]]:
    port = free_port()
    got = run_spawned(_rank_main, [(r, port, str(path), batch) for r in (0, 1)])
    for rank, res, *_ in got:
        assert not isinstance(res, BaseException), f"rank {rank} failed: {res!r}"
    return got


@pytest.fixture(scope="module")
def batch(tiny_model_dir: Path) -> list[GenRequest]:
    tok = load_tokenizer(str(tiny_model_dir))
    greedy = SamplingParams(max_new_tokens=12)
    return [GenRequest(tuple(tok(p)["input_ids"]), greedy) for p in PROMPTS]


@pytest.fixture(scope="module")
def groups(
    sharded_dir: Path, tiny_model_dir: Path, batch: list[GenRequest]
) -> dict[str, list[tuple[Any, ...]]]:
    """One TP 2 group on the resharded copy, one on the plain model (full load)."""
    return {"sharded": _run_group(sharded_dir, batch), "full": _run_group(tiny_model_dir, batch)}


def _copy(sharded_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(sharded_dir, d)
    return d


def test_reshard_writes_one_safetensors_file_per_rank_and_a_manifest(sharded_dir: Path) -> None:
    from safetensors import safe_open

    m = sharded.find_shards(sharded_dir, 2)
    assert m is not None and m.dir == sharded_dir / "dsi-shards" / "tp2"
    data = json.loads(m.path.read_text())
    assert data["tp_size"] == 2 and data["dtype"] == "float32" and data["source_dtype"] == "float32"
    assert data["config_sha256"] == sharded.config_sha256(sharded_dir)
    assert [f["path"] for f in data["files"]] == ["rank0.safetensors", "rank1.safetensors"]
    for f in data["files"]:
        blob = (m.dir / f["path"]).read_bytes()
        assert len(blob) == f["size"] and hashlib.sha256(blob).hexdigest() == f["sha256"]
    with safe_open(str(m.file(1)), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [32, 64]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [64, 64]
    assert sharded.available_tp_sizes(sharded_dir) == [2]
    assert sharded.find_shards(sharded_dir, 4) is None  # no shards for TP 4: full load
    with pytest.raises(sharded.ShardError, match="exists; pass force"):
        sharded.reshard(sharded_dir, 2)


def test_sharded_group_matches_unsharded_token_for_token(
    groups: dict[str, list[tuple[Any, ...]]], tiny_model_dir: Path, batch: list[GenRequest]
) -> None:
    single = RankEngine(str(tiny_model_dir), dtype="float32", device="cpu", dist_env=DistEnv())
    single.start()
    expected = [r.token_ids for r in single.generate(batch)]
    for (rank, res, shards, info, _), (_, _, full_shards, full_info, _) in zip(
        groups["sharded"], groups["full"], strict=True
    ):
        assert info["load"]["path"] == "sharded" and full_info["load"]["path"] == "full"
        assert [r.token_ids for r in res] == expected, f"rank {rank}"
        # The meta-built model got exactly the layout AutoTP gives the fully loaded one.
        assert shards == full_shards, f"rank {rank}"
        assert info["timings"]["load_s"] >= 0 and info["timings"]["init_inference_s"] > 0


def test_each_rank_opened_only_its_own_shard(
    groups: dict[str, list[tuple[Any, ...]]], sharded_dir: Path, tiny_model_dir: Path
) -> None:
    m = sharded.find_shards(sharded_dir, 2)
    assert m is not None
    full_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    for rank, _, _, info, opened in groups["sharded"]:
        load = info["load"]
        assert load["files"] == [str(m.file(rank))]
        assert opened["shards"] == [str(m.file(rank))]  # every shard this process read
        assert opened["safetensors"] == []  # nor any weight file another way (the originals)
        assert load["bytes_read"] == m.files[rank].size < full_bytes
        assert load["verified"] is True and load["manifest"] == str(m.path)
    for rank, _, _, _, opened in groups["full"]:
        assert opened["safetensors"] == [str(tiny_model_dir / "model.safetensors")], rank
        assert opened["shards"] == [], rank  # the recorders work
    rss = {
        k: [(g[3]["load"]["peak_rss_mb"], g[3]["load"].get("rss_before_mb")) for g in v]
        for k, v in groups.items()
    }
    print(f"\n(peak RSS while loading, RSS before) per rank, MiB, tiny model: {rss}")


def test_shards_for_another_tp_size_leave_the_full_load(
    sharded_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    eng = RankEngine(str(sharded_dir), dtype="float32", dist_env=DistEnv(rank=0, world_size=4))
    with caplog.at_level(logging.WARNING, logger="dsi_worker.engine"):
        assert eng._start_sharded("float32") is False
    assert "shards exist for TP [2] but not 4: loading the full model" in caplog.text


def test_a_manifest_for_another_tp_size_names_the_file(sharded_dir: Path, tmp_path: Path) -> None:
    d = _copy(sharded_dir, tmp_path)
    (d / "dsi-shards" / "tp2").rename(d / "dsi-shards" / "tp4")
    with pytest.raises(sharded.ShardError, match=r"tp4/manifest.json: written for TP 2"):
        sharded.find_shards(d, 4)


def test_a_missing_or_truncated_shard_names_the_file(sharded_dir: Path, tmp_path: Path) -> None:
    d = _copy(sharded_dir, tmp_path)
    shard = d / "dsi-shards" / "tp2" / "rank1.safetensors"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-10])
    with pytest.raises(sharded.ShardError, match=r"rank1.safetensors: \d+ bytes but .* says"):
        sharded.find_shards(d, 2)
    shard.unlink()
    with pytest.raises(sharded.ShardError, match=r"rank1.safetensors: shard of rank 1 .* missing"):
        sharded.find_shards(d, 2)


def test_a_corrupt_shard_names_the_file(sharded_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    d = _copy(sharded_dir, tmp_path)
    m = sharded.find_shards(d, 2)
    assert m is not None
    shard = m.file(0)
    targets = {k: torch.zeros_like(v) for k, v in load_file(str(shard)).items()}
    assert sharded.read_shard_into(shard, targets, sha256=m.files[0].sha256) == m.files[0].size
    blob = bytearray(shard.read_bytes())
    blob[len(blob) - 100] ^= 0xFF  # one flipped byte in the tensor data: same size
    shard.write_bytes(bytes(blob))
    m = sharded.find_shards(d, 2)  # sizes still match
    assert m is not None
    with pytest.raises(sharded.ShardError, match=r"rank0.safetensors: sha256 .* \(corrupt\)"):
        sharded.read_shard_into(shard, targets, sha256=m.files[0].sha256)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(blob[18:]))
    with pytest.raises(sharded.ShardError, match=r"rank0.safetensors: corrupt safetensors header"):
        sharded.read_shard_into(shard, targets)
    wrong = {**targets, "lm_head.weight": torch.zeros(3, 3)}
    with pytest.raises(sharded.ShardError, match=r"rank1.safetensors: lm_head.weight has shape"):
        sharded.read_shard_into(m.file(1), wrong)


def test_a_changed_config_names_the_manifest_and_config(sharded_dir: Path, tmp_path: Path) -> None:
    d = _copy(sharded_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    with pytest.raises(sharded.ShardError, match=r"manifest.json: written for another .*config"):
        sharded.find_shards(d, 2)


def test_dtype_rules(sharded_dir: Path) -> None:
    import torch

    m = sharded.find_shards(sharded_dir, 2)
    assert m is not None
    sharded.check_dtype(m, torch.float32)
    sharded.check_dtype(m, torch.bfloat16)  # float32 shards hold the checkpoint's values
    rounded = sharded.Manifest(**{**m.__dict__, "dtype": "bfloat16"})
    sharded.check_dtype(rounded, torch.bfloat16)
    with pytest.raises(sharded.ShardError, match="reshard with --dtype float32"):
        sharded.check_dtype(rounded, torch.float32)
