"""Render docs/performance.md and its plots from the JSON the benchmarks wrote.

    .venv/bin/python bench/report.py [--results bench/results] [--out docs/performance.md]

`make bench` runs each benchmark with ``--json bench/results/<name>.json``, then this script.
A benchmark whose JSON is missing gets a "not measured in this run" line instead of its
tables, and its plots are not drawn (an older copy is removed, so that the page and the plot
folder agree). The benchmarks import ``write_json`` from here; matplotlib (Agg) is imported
only when a plot is drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Result = dict[str, Any]
SERVING_PLOT = "serving-latency.png"
OPERATOR_PLOT = "operator-latency.png"
# bench_operator rows drawn on the operator plot
OPERATOR_METRICS = ("apply -> RayService exists", "pod failure -> group replaced")


def run_info() -> dict[str, Any]:
    """The machine and the command line of this run."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def write_json(path: str | None, result: Result) -> None:
    """Write a benchmark's ``result``, plus the machine, to ``path`` (nothing without one)."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "run": run_info()}, indent=2) + "\n")
    print(f"\nwrote {out}")


# -- plots ----------------------------------------------------------------------------------


@dataclass
class Panel:
    """One axes of a figure: lines of (label, xs, ys, matplotlib format)."""

    title: str
    xlabel: str
    ylabel: str
    lines: list[tuple[str, list[float], list[float], str]] = field(default_factory=list)
    logx: bool = False


def draw(path: Path, panels: list[Panel]) -> None:
    """Write ``panels`` side by side as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        for label, xs, ys, fmt in p.lines:
            ax.plot(xs, ys, fmt, label=label)
        if p.logx:  # ticks at the measured points, as plain numbers
            ticks = sorted({x for _, xs, _, _ in p.lines for x in xs})
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set(title=p.title, xlabel=p.xlabel, ylabel=p.ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _p50_p99(
    p: Panel, name: str, xs: list[float], p50: list[float], p99: list[float], c: str
) -> None:
    p.lines.append((f"{name}, p50", xs, p50, f"{c}o-"))
    p.lines.append((f"{name}, p99", xs, p99, f"{c}s--"))


def serving_panels(worker: Result) -> list[Panel]:
    """Latency (p50, p99) and tokens/s per concurrency, batching on and off."""
    lat = Panel("Serving latency, TP=1", "concurrent requests", "ms", logx=True)
    tput = Panel("Serving throughput, TP=1", "concurrent requests", "tokens/s", logx=True)
    for batching, c in ((True, "C0"), (False, "C1")):
        rows = [t for t in worker.get("throughput", []) if t["batching"] is batching]
        if rows:
            xs = [t["concurrency"] for t in rows]
            name = "batching on" if batching else "batching off"
            _p50_p99(lat, name, xs, [t["p50_ms"] for t in rows], [t["p99_ms"] for t in rows], c)
            tput.lines.append((name, xs, [t["tok_s"] for t in rows], f"{c}o-"))
    return [p for p in (lat, tput) if p.lines]


def operator_panels(operator: Result | None, sbs: Result | None) -> list[Panel]:
    """Seconds vs. resources: ours next to KubeRay, and bench_operator's latency rows."""
    panels = []
    if sbs and sbs.get("rows"):
        p = Panel("Create -> child object (side by side)", "objects created at once", "s")
        xs = [r["size"] for r in sbs["rows"]]
        for side, name, c in (
            ("ours", "ours: DSI -> RayService", "C0"),
            ("kuberay", "KubeRay: RayService -> RayCluster", "C1"),
        ):
            med = [r[side]["median_s"] for r in sbs["rows"]]
            _p50_p99(p, name, xs, med, [r[side]["p99_s"] for r in sbs["rows"]], c)
        panels.append(p)
    p = Panel("Our operator (bench_operator)", "resources present", "s")
    for metric, c in zip(OPERATOR_METRICS, ("C0", "C2"), strict=True):
        rows = [r for r in (operator or {}).get("rows", []) if r["metric"] == metric]
        if rows:
            xs = [r["n"] for r in rows]
            _p50_p99(p, metric, xs, [r["median"] for r in rows], [r["p99"] for r in rows], c)
    for q in panels + [p]:
        q.logx = True
    return panels + ([p] if p.lines else [])


# -- markdown -------------------------------------------------------------------------------


def _numeric(cell: Any) -> bool:
    try:
        float(str(cell).removesuffix("x") or 0)
    except ValueError:
        return False
    return True


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: numeric columns right-aligned, the others left-aligned."""
    align = ["--:" if i and all(_numeric(r[i]) for r in rows) else ":--" for i in range(len(head))]
    lines = [head, align, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines) + "\n"


def _f(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def not_measured(*scripts: str) -> str:
    """The line standing for what did not run."""
    names = " and ".join(f"`bench/{s}.py`" for s in scripts)
    return f"Not measured in this run ({names} did not run).\n"


def _run_line(r: Result) -> str:
    run = r.get("run", {})
    return (
        f"Measured {run.get('date', '?')} on {run.get('cpus', '?')} CPUs "
        f"({run.get('platform', '?')}, Python {run.get('python', '?')}) by "
        f"`{run.get('command', '?')}`.\n"
    )


def _img(drawn: set[str], name: str, alt: str) -> str:
    return f"\n![{alt}](performance/{name})\n" if name in drawn else ""


def worker_section(r: Result, drawn: set[str]) -> str:
    """bench_worker: throughput per concurrency, the HTTP overhead, TP 2 vs TP 1."""
    s = r.get("settings", {})
    out = [
        _run_line(r),
        f"\nModel `{s.get('model')}`, {s.get('max_tokens')} new tokens a request.\n",
    ]
    if r.get("throughput"):
        head = ["concurrency", "batching", "req/s", "tok/s", "p50 ms", "p99 ms", "median batch"]
        rows = [
            [t["concurrency"], "on (max 32)" if t["batching"] else "off (max 1)"]
            + [_f(t["req_s"]), _f(t["tok_s"]), _f(t["p50_ms"], 0), _f(t["p99_ms"], 0)]
            + [_f(t["batch"], 0)]
            for t in r["throughput"]
        ]
        out += ["\nThroughput via HTTP `/generate`, TP=1, 1 group:\n\n", md_table(head, rows)]
        out.append(_img(drawn, SERVING_PLOT, "serving latency and throughput vs. concurrency"))
    if o := r.get("overhead"):
        rows = [[p["path"], _f(p["p50_ms"]), _f(p["p99_ms"])] for p in o["paths"]]
        rows.insert(2, ["overhead (ours - direct)", _f(o["overhead_ms"]), ""])
        rows.append(["ratio overhead / bare (1 actor)", f"{o['ratio_overhead_bare']:.2f}x", ""])
        title = f"HTTP path overhead (one request at a time, {o['runs']} runs, interleaved)"
        out += [f"\n{title}:\n\n", md_table(["path", "p50 ms", "p99 ms"], rows)]
    if r.get("tp"):
        head = ["concurrency", "TP=1 tok/s", "TP=2 tok/s", "TP=1 p50 ms", "TP=2 p50 ms"]
        rows = [
            [t["concurrency"], _f(t["tp1_tok_s"]), _f(t["tp2_tok_s"])]
            + [_f(t["tp1_p50_ms"], 0), _f(t["tp2_p50_ms"], 0)]
            for t in r["tp"]
        ]
        out += ["\nTP=2 vs TP=1 on CPU (gloo), batching on:\n\n", md_table(head, rows)]
    return "".join(out)


def ranks_section(r: Result) -> str:
    """bench_ranks_per_pod: decode tokens/s and memory per layout."""
    s = r.get("settings", {})
    head = ["model", "layout", "all-reduce", "tok/s b1", "tok/s b8", "load s"]
    rows = [
        [x["model"], x["layout"], x["allreduce"], _f(x["tok_s_b1"]), _f(x["tok_s_b8"])]
        + [_f(x["load_s"]), _f(x["rss_mib"], 0), _f(x["peak_mib"], 0)]
        for x in r.get("rows", [])
    ]
    intro = (
        f"\nMedian decode tokens/s of {s.get('runs')} greedy generates of {s.get('tokens')} "
        "tokens at batch 1 and 8; one torch thread per rank:\n\n"
    )
    return _run_line(r) + intro + md_table(head + ["RSS MiB/rank", "peak MiB/rank"], rows)


def operator_section(r: Result) -> str:
    """bench_operator: latency, memory and idle API rows."""
    head = ["metric", "unit", "N", "median", "p99"]
    rows = [
        [x["metric"], x["unit"], x["n"], _f(x["median"], 3), _f(x["p99"], 3)]
        for x in r.get("rows", [])
    ]
    return _run_line(r) + "\n" + md_table(head, rows)


def side_by_side_section(r: Result) -> str:
    """bench_side_by_side: ours and KubeRay per size, and the ratio."""
    rows: list[list[Any]] = []
    for x in r.get("rows", []):
        for side, name in (
            ("ours", "ours: DSI -> RayService"),
            ("kuberay", "KubeRay: RayService -> RayCluster"),
        ):
            rows.append([x["size"], name, _f(x[side]["median_s"], 3), _f(x[side]["p99_s"], 3)])
        rows.append(
            [x["size"], "ratio ours / KubeRay", _f(x["ratio_median"], 2), _f(x["ratio_p99"], 2)]
        )
    text = "\nBelow 1: ours is faster.\n\n"
    return _run_line(r) + text + md_table(["size", "side", "median s", "p99 s"], rows)


INTRO = """# Performance

Generated by `bench/report.py` from the JSON that the benchmarks wrote; do not edit by hand.
`make bench` runs `bench/bench_operator.py`, `bench/bench_side_by_side.py` (both need the local
cluster: `make cluster-up`), `bench/bench_worker.py` and `bench/bench_ranks_per_pod.py`, each
with `--json bench/results/<name>.json`, then `.venv/bin/python bench/report.py`. To redo one
section, run its script with `--json` and then the report. Each section says on which machine,
when and with which command its numbers were measured.

The numbers come from one run each, on whatever machine ran them: typically a shared 2-core
machine, with a tiny model on CPU and a simulated control plane. Absolute times there move
with whatever else runs; the ratios (ours / KubeRay, batching on / off, TP 2 / TP 1, our HTTP
overhead / a bare Ray Serve path) are what to read.
"""


def load(results: Path, name: str) -> Result | None:
    """``results/<name>.json``, or None when that benchmark did not run."""
    path = results / f"{name}.json"
    return dict(json.loads(path.read_text())) if path.exists() else None


def _plot(plot_dir: Path, name: str, panels: list[Panel], drawn: set[str]) -> None:
    """Draw ``name`` if there is anything to draw, else remove an older copy."""
    path = plot_dir / name
    if panels:
        draw(path, panels)
        drawn.add(name)
    else:
        path.unlink(missing_ok=True)


def render(results: Path, out: Path) -> str:
    """Write ``out`` and its plots (in the folder named like ``out``, without .md)."""
    worker, ranks, operator, sbs = (
        load(results, n)
        for n in ("bench_worker", "bench_ranks_per_pod", "bench_operator", "bench_side_by_side")
    )
    plot_dir, drawn = out.with_suffix(""), set[str]()
    _plot(plot_dir, SERVING_PLOT, serving_panels(worker) if worker else [], drawn)
    _plot(plot_dir, OPERATOR_PLOT, operator_panels(operator, sbs), drawn)
    parts = [INTRO, "\n## Serving path on CPU (`bench/bench_worker.py`)\n\n"]
    parts.append(worker_section(worker, drawn) if worker else not_measured("bench_worker"))
    parts.append("\n## Ranks per pod (`bench/bench_ranks_per_pod.py`)\n\n")
    parts.append(ranks_section(ranks) if ranks else not_measured("bench_ranks_per_pod"))
    parts.append("\n## Operator latency vs. number of resources\n\n")
    if OPERATOR_PLOT in drawn:
        parts.append(_img(drawn, OPERATOR_PLOT, "operator latency vs. number of resources")[1:])
    else:
        parts.append(not_measured("bench_operator", "bench_side_by_side"))
    parts.append("\n## Operator (`bench/bench_operator.py`)\n\n")
    parts.append(operator_section(operator) if operator else not_measured("bench_operator"))
    parts.append("\n## Ours next to KubeRay (`bench/bench_side_by_side.py`)\n\n")
    parts.append(side_by_side_section(sbs) if sbs else not_measured("bench_side_by_side"))
    text = "".join(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    ns = ap.parse_args(argv)
    render(Path(ns.results), Path(ns.out))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
