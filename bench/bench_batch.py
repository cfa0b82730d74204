"""Batch-job throughput with 1 vs 2 tensor-parallel groups (the tiny model, TP 2, CPU).

    .venv/bin/python bench/bench_batch.py [--rows 3000] [--runs 2] [--tokens 8] [--batch-size 16]

Runs ``dsi_worker.batch.job.run_job`` in local mode on one local Ray (rank resources for
two groups of TP 2) over the same JSON Lines rows, once per group count and run, each into
a fresh output directory. Prints, per group count, the median rows/s while every group was
formed (from the job's own progress reports: model loading excluded) and over the whole
job (loading included), then the 2-vs-1 ratio. Nothing is asserted.

On a 2-core machine two groups of TP 2 are four rank processes sharing two cores, so the
ratio says how much of a group's time is spent waiting (all-reduces, the driver's round
trip) rather than computing; on one GPU per rank it would approach the group count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dsi_worker.batch.progress import Progress

TP = 2


class Samples:
    """A progress reporter that keeps every report: (time, rows done, groups alive)."""

    def __init__(self) -> None:
        self.points: list[tuple[float, int, int]] = []

    def report(self, progress: Progress, final: bool = False) -> None:
        """Keep the sample."""
        self.points.append((time.monotonic(), progress.rows_done, progress.groups_alive))

    def close(self) -> None:
        """Nothing to flush."""

    def steady_rate(self, groups: int) -> float:
        """Rows/s from the first report with every group formed to the last report."""
        full = [p for p in self.points if p[2] >= groups]
        if len(full) < 2 or full[-1][0] <= full[0][0]:
            return float("nan")
        (t0, r0, _), (t1, r1, _) = full[0], full[-1]
        return (r1 - r0) / (t1 - t0)


def one_run(
    model: str, inp: Path, out: Path, groups: int, ns: argparse.Namespace
) -> dict[str, float]:
    """Run the job once; its steady and overall rows/s."""
    from dsi_worker.batch.args import parse_batch_args
    from dsi_worker.batch.job import run_job
    from dsi_worker.batch.progress import Reporters

    args = parse_batch_args(
        {
            "model": model,
            "dtype": "float32",
            "device": "cpu",
            "tensor_parallel_size": TP,
            "num_groups": groups,
            "local_mode": True,
            "torch_threads": 1,
            "input": {"path": str(inp)},
            "output": {"path": str(out)},
            "generation": {"max_tokens": ns.tokens},
            "batch_size": ns.batch_size,
            "rows_per_shard": 500,
        }
    )
    samples = Samples()
    summary = run_job(args, env={}, reporters=Reporters([samples]))
    return {
        "steady": samples.steady_rate(groups),
        "overall": summary.rows_written / summary.elapsed_s,
    }


def main() -> None:
    """Parse the command line, run every (groups, run) pair, print the medians."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8, help="max_tokens per row")
    p.add_argument("--batch-size", type=int, default=16)
    ns = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    from dsi_worker import tiny_model
    from dsi_worker.local import start_ray

    model = str(tiny_model.build())
    start_ray(2, TP, num_cpus=4)
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
            inp = Path(tmp) / "in" / "rows.jsonl"
            inp.parent.mkdir()
            words = "the quick brown fox jumps over the lazy dog".split()
            inp.write_text(
                "".join(
                    json.dumps({"prompt": " ".join(words[: 2 + i % 7]) + f" {i}"}) + "\n"
                    for i in range(ns.rows)
                )
            )
            for run in range(ns.runs):
                for groups in (1, 2):
                    out = Path(tmp) / f"out-{groups}-{run}"
                    r = one_run(model, inp.parent, out, groups, ns)
                    results[groups].append(r)
                    shown = {k: round(v, 1) for k, v in r.items()}
                    print(f"run {run} groups {groups}: {json.dumps(shown)}", flush=True)
    finally:
        ray.shutdown()
    med: dict[int, dict[str, Any]] = {
        g: {k: statistics.median(r[k] for r in rs) for k in ("steady", "overall")}
        for g, rs in results.items()
    }
    print(f"\n{ns.rows} rows, max_tokens {ns.tokens}, batch {ns.batch_size}, TP {TP}, "
          f"{os.cpu_count()} CPUs; median of {ns.runs} run(s)")  # fmt: skip
    print(f"{'groups':>6} {'rows/s (formed)':>16} {'rows/s (whole job)':>19}")
    for g in (1, 2):
        print(f"{g:>6} {med[g]['steady']:>16.1f} {med[g]['overall']:>19.1f}")
    print(
        f"ratio 2/1: {med[2]['steady'] / med[1]['steady']:.2f} (formed), "
        f"{med[2]['overall'] / med[1]['overall']:.2f} (whole job)"
    )


if __name__ == "__main__":
    main()
