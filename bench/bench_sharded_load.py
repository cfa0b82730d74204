"""Full load vs sharded load (dsi_worker.sharded) of one random Llama, per rank of a TP 2 group
on CPU over gloo: load time and peak resident memory.

    .venv/bin/python bench/bench_sharded_load.py [--layers 24] [--repeats 3] [--cold]

Builds a random Llama (default ~374M parameters, bfloat16, ~0.7 GiB on disk) in a temporary
directory, reshards it for TP 2 (timed once), then starts a 2-rank ``RankEngine`` group
``--repeats`` times per variant, interleaved: full (the plain model directory), sharded (the
same files plus ``dsi-shards/tp2``) and sharded without the sha256 check.  Per rank: ``load``
= from starting to load to ready to generate (``timings["load_s"]``, the weights' reading, +
``timings["init_inference_s"]``, AutoTP); deepspeed and the Llama modeling code are imported
before, outside every figure.  ``peak RSS`` = the process's peak resident set size from just
before loading to ready (Linux ``clear_refs``/``VmHWM``), also shown over the RSS it had
before.  Medians over the runs.  Every path reads from the page cache (the files were just
written) unless ``--cold`` evicts the weight files from it before each group.  The greedy
tokens of all runs are compared.  Prints a Markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from dsi_worker.ports import free_port

PROMPT = (1, 20, 300, 400, 50, 600, 70)


def build_model(out: Path, *, hidden: int, layers: int, inter: int, vocab: int) -> int:
    """Save a random LlamaForCausalLM (bfloat16) under ``out``; its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    build = AutoModelForCausalLM.from_config
    model = build(cfg, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]  # random init
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _rank(rank: int, port: int, path: str, env: dict[str, str], q: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        LOCAL_RANK="0", **env,
    )  # fmt: skip
    try:
        # Imported before the measured part on every path: their time and memory are not
        # the weights' (modeling_llama alone adds ~190 MiB of RSS).
        import deepspeed  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
        from dsi_worker.engine import GenRequest, RankEngine, SamplingParams

        eng = RankEngine(path, dtype="bfloat16", device="cpu", torch_threads=1, form_timeout_s=300)
        eng.start()
        info = eng.info()
        out = eng.generate([GenRequest(PROMPT, SamplingParams(max_new_tokens=4))])
        q.put((rank, info, out[0].token_ids))
        eng.close()
    except BaseException as e:
        q.put((rank, e, None))


def run_group(path: Path, env: dict[str, str]) -> list[tuple[int, dict[str, Any], tuple[int, ...]]]:
    """One 2-rank group with ``env`` added: (rank, engine info, greedy tokens) per rank."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(path), env, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = sorted((q.get(timeout=600) for _ in procs), key=lambda x: x[0])
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank, info, _ in got:
        if isinstance(info, BaseException):
            raise RuntimeError(f"rank {rank} failed") from info
    return got


def evict(d: Path) -> None:
    """Drop ``d``'s weight files from the page cache (only those files), so the next load
    reads them from the disk."""
    for f in d.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _figures(runs: list[list[Any]], rank: int) -> list[float]:
    """Medians over the runs for ``rank``: load s, its weight-reading and AutoTP parts, peak
    RSS MiB, peak RSS over the RSS before loading, MiB read."""
    t = [run[rank][1]["timings"] for run in runs]
    load = [run[rank][1]["load"] for run in runs]
    cols = [
        [x["load_s"] + x["init_inference_s"] for x in t],
        [x["load_s"] for x in t],
        [x["init_inference_s"] for x in t],
        [x["peak_rss_mb"] for x in load],
        [x["peak_rss_mb"] - x.get("rss_before_mb", 0) for x in load],
        [x.get("bytes_read", 0) / 2**20 for x in load],
    ]
    return [statistics.median(c) for c in cols]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="evict the files before each load")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dsi_worker import sharded

    work = Path(args.dir or tempfile.mkdtemp(prefix="dsi-bench-sharded-"))
    full_dir, shard_dir = work / "full", work / "sharded"
    try:
        t0 = time.monotonic()
        n = build_model(full_dir, hidden=args.hidden, layers=args.layers,
                        inter=args.intermediate, vocab=args.vocab)  # fmt: skip
        size = sum(f.stat().st_size for f in full_dir.glob("*.safetensors")) / 2**20
        print(f"model: {n / 1e6:.0f}M parameters, bfloat16, {size:.0f} MiB "
              f"(built in {time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
        shutil.copytree(full_dir, shard_dir)
        t0 = time.monotonic()
        sharded.reshard(shard_dir, 2)
        print(f"reshard for TP 2 (one-time, ranks one after the other): "
              f"{time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip
        variants: list[tuple[str, Path, dict[str, str]]] = [
            ("full", full_dir, {}),
            ("sharded", shard_dir, {}),
            ("sharded, no sha256", shard_dir, {"DSI_SHARDED_VERIFY": "0"}),
        ]
        runs: dict[str, list[Any]] = {name: [] for name, _, _ in variants}
        for i in range(args.repeats):
            for name, d, env in variants:  # interleaved
                if args.cold:
                    evict(d)
                runs[name].append(run_group(d, env))
                print(f"run {i + 1}/{args.repeats} {name} done", flush=True)
        _report(
            runs,
            size,
            args.repeats,
            "disk (evicted from the page cache)" if args.cold else "page cache",
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(runs: dict[str, list[Any]], size: float, repeats: int, source: str) -> None:
    print(f"\nTP 2 on CPU (gloo), weights read from the {source}, per rank, median of {repeats}:\n")
    print(
        "| path | rank | load s | of which weights read s | of which AutoTP s "
        "| peak RSS MiB | peak RSS - RSS before load MiB | weights read MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, group_runs in runs.items():
        for rank in (0, 1):
            load, read_s, tp_s, rss, grew, read = _figures(group_runs, rank)
            read = size if name == "full" else read
            print(
                f"| {name} | {rank} | {load:.2f} | {read_s:.2f} | {tp_s:.2f} | {rss:.0f} "
                f"| {grew:.0f} | {read:.0f} |"
            )
    paths = {k: sorted({r[1]["load"]["path"] for run in v for r in run}) for k, v in runs.items()}
    same = len({r[2] for v in runs.values() for run in v for r in run}) == 1
    print(f"\npaths used: {paths}; greedy tokens equal across paths, ranks and runs: {same}")


if __name__ == "__main__":
    sys.exit(main())
