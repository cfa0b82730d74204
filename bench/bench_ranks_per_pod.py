"""TP 2 with both ranks in one pod vs. one rank per pod, on CPU (spec.ranksPerPod 2 vs 1).

    .venv/bin/python bench/bench_ranks_per_pod.py [--sizes tiny,small] [--runs 5] [--tokens 32]

Each layout runs the worker's RankEngine in two processes, with the env the operator gives
those ranks: in one pod, ``LOCAL_SIZE=2`` (= WORLD_SIZE), so DeepSpeed all-reduces through its
shared-memory op; one rank per pod, no ``LOCAL_SIZE``, so the all-reduces go through the gloo
process group over TCP (here loopback, which flatters it: between real pods it crosses the
network). TP 1 in one process is the baseline. Prints the median decode tokens/s over
``--runs`` greedy generates at batch 1 and 8, and each rank's RSS after loading and its peak;
nothing is asserted. On GPUs the same choice is NCCL over NVLink / P2P vs. NCCL over the pod
network, which needs a machine with more than one GPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from dsi_worker.ports import free_port
from report import write_json

SIZES: dict[str, dict[str, int]] = {
    # The test model: all-reduce latency dominates.
    "tiny": {},
    # ~60M parameters: compute starts to count.
    "small": {
        "hidden_size": 512,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 8,
        "intermediate_size": 1408,
        "vocab_size": 4096,
    },
}
LAYOUTS = ("tp1", "tp2-one-pod", "tp2-two-pods")


def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    current = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rank(layout: str, rank: int, port: int, path: str, args: dict[str, Any], q: Any) -> None:
    world = 1 if layout == "tp1" else 2
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    if layout == "tp2-one-pod":
        os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE="2", LOCAL_WORLD_SIZE="2")
    else:
        os.environ.update(LOCAL_RANK="0")
        os.environ.pop("LOCAL_SIZE", None)
    try:
        q.put((rank, _measure(path, args)))
    except BaseException as e:  # report instead of hanging the parent
        q.put((rank, {"error": repr(e)}))


def _measure(path: str, args: dict[str, Any]) -> dict[str, Any]:
    from dsi_worker.engine import GenRequest, RankEngine, SamplingParams
    from dsi_worker.model_files import load_tokenizer

    eng = RankEngine(path, dtype="float32", device="cpu", torch_threads=1, form_timeout_s=600)
    t0 = time.monotonic()
    eng.start()
    load_s = time.monotonic() - t0
    loaded_rss, _ = _rss_mib()
    tok = load_tokenizer(path)
    params = SamplingParams(max_new_tokens=args["tokens"])
    out: dict[str, Any] = {
        "allreduce": eng.info()["allreduce"],
        "load_s": load_s,
        "rss_loaded": loaded_rss,
    }
    for bs in (1, 8):
        reqs = [
            GenRequest(tuple(tok(f"prompt number {i} goes")["input_ids"]), params)
            for i in range(bs)
        ]
        eng.generate(reqs)  # warm-up
        rates = []
        for _ in range(args["runs"]):
            t0 = time.perf_counter()
            res = eng.generate(reqs)
            rates.append(sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0))
        out[f"tok_s_b{bs}"] = statistics.median(rates)
    out["rss_peak"] = _rss_mib()[1]
    eng.close()
    return out


def run_layout(layout: str, path: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Start the layout's ranks, return each rank's figures (rank order)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    n = 1 if layout == "tp1" else 2
    procs = [ctx.Process(target=_rank, args=(layout, r, port, path, args, q)) for r in range(n)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for r, res in results.items():
        if "error" in res:
            raise SystemExit(f"{layout} rank {r} failed: {res['error']}")
    return [results[r] for r in range(n)]


def layout_row(size: str, layout: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from the ranks' figures: rank 0's rates and load time, the largest RSS."""
    r0 = ranks[0]
    return {
        "model": size,
        "layout": layout,
        "allreduce": r0["allreduce"],
        "tok_s_b1": r0["tok_s_b1"],
        "tok_s_b8": r0["tok_s_b8"],
        "load_s": r0["load_s"],
        "rss_mib": max(r["rss_loaded"] for r in ranks),
        "peak_mib": max(r["rss_peak"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every layout for every size and print the table."""
    from dsi_worker import tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--models", default=str(Path.home() / ".cache" / "dsi-bench-models"))
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    ns = ap.parse_args(argv)
    args = {"runs": ns.runs, "tokens": ns.tokens}
    print(f"{os.cpu_count()} CPUs; one torch thread per rank; {ns.runs} runs, {ns.tokens} tokens")
    head = (
        f"{'model':6} {'layout':13} {'all-reduce':13} {'tok/s b1':>9} {'tok/s b8':>9} "
        f"{'load s':>7} {'RSS MiB/rank':>13} {'peak MiB/rank':>14}"
    )
    print(head)
    rows: list[dict[str, Any]] = []
    for size in ns.sizes.split(","):
        kw = {**SIZES[size], **({"weight_scale": 1.0} if SIZES[size] else {})}
        path = str(tiny_model.build(Path(ns.models) / size, **kw))
        for layout in LAYOUTS:
            r = layout_row(size, layout, run_layout(layout, path, args))
            rows.append(r)
            print(
                f"{size:6} {layout:13} {r['allreduce']:13} {r['tok_s_b1']:9.1f} "
                f"{r['tok_s_b8']:9.1f} {r['load_s']:7.1f} {r['rss_mib']:13.0f} "
                f"{r['peak_mib']:14.0f}"
            )
        sys.stdout.flush()
    write_json(ns.json, {"bench": "bench_ranks_per_pod", "settings": args, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
