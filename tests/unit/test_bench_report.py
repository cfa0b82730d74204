"""bench/report.py renders docs/performance.md and its plots from the benchmarks' JSON, and
each benchmark's result-dict builder, on plain data: no cluster, no Ray, no timing."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the scripts import report (and each other) as siblings

import report  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN = {"cpus": 2, "platform": "Linux-x86_64", "python": "3.11.9", "date": "2026-12-05 06:00 UTC"}

WORKER: dict[str, Any] = {
    "bench": "bench_worker",
    "settings": {"model": "/models/tiny", "max_tokens": 16, "quick": True},
    "throughput": [
        {"concurrency": c, "batching": b, "req_s": rs, "tok_s": ts, "p50_ms": p50}
        | {"p99_ms": p99, "batch": bs}
        for c, b, rs, ts, p50, p99, bs in (
            (1, True, 11.5, 184.0, 87.0, 95.0, 1.0),
            (1, False, 11.0, 176.0, 90.0, 99.0, 1.0),
            (8, True, 40.25, 644.0, 190.0, 240.0, 6.0),
            (8, False, 14.5, 232.0, 540.0, 610.0, 1.0),
        )
    ],
    "overhead": {
        "runs": 20,
        "paths": [
            {"path": "direct engine.generate", "p50_ms": 30.0, "p99_ms": 33.0},
            {"path": "HTTP -> ingress -> group -> rank (TP=1)", "p50_ms": 45.5, "p99_ms": 51.0},
            {"path": "bare Serve: 1 actor", "p50_ms": 7.75, "p99_ms": 9.0},
            {"path": "bare Serve: 2 actors", "p50_ms": 8.5, "p99_ms": 10.0},
        ],
        "overhead_ms": 15.5,
        "ratio_overhead_bare": 2.0,
    },
    "tp": [
        {"concurrency": 1, "tp1_tok_s": 184.0, "tp2_tok_s": 121.5, "tp1_p50_ms": 87.0}
        | {"tp2_p50_ms": 131.0}
    ],
    "run": {**RUN, "command": "bench/bench_worker.py --quick --json w.json"},
}
RANKS: dict[str, Any] = {
    "bench": "bench_ranks_per_pod",
    "settings": {"runs": 3, "tokens": 8},
    "rows": [
        {"model": "tiny", "layout": "tp2-one-pod", "allreduce": "shm", "tok_s_b1": 123.4}
        | {"tok_s_b8": 456.7, "load_s": 1.2, "rss_mib": 321.0, "peak_mib": 345.0}
    ],
    "run": {**RUN, "command": "bench/bench_ranks_per_pod.py --sizes tiny"},
}
OPERATOR: dict[str, Any] = {
    "bench": "bench_operator",
    "settings": {"sizes": "1,100"},
    "rows": [
        {"metric": m, "unit": u, "n": n, "median": med, "p99": p99}
        for m, u, n, med, p99 in (
            ("apply -> RayService exists", "s", 1, 0.125, 0.25),
            ("apply -> RayService exists", "s", 100, 0.375, 0.5),
            ("pod failure -> group replaced", "s", 1, 4.25, 5.5),
            ("pod failure -> group replaced", "s", 100, 6.75, 8.0),
            ("operator peak RSS (VmHWM), 100 resources", "MiB", 100, 97.5, 97.5),
        )
    ],
    "run": {**RUN, "command": "bench/bench_operator.py --json o.json"},
}
SIDE_BY_SIDE: dict[str, Any] = {
    "bench": "bench_side_by_side",
    "settings": {"samples": 10, "burst": 100},
    "rows": [
        {"size": 1, "ours": {"median_s": 0.111, "p99_s": 0.222}}
        | {"kuberay": {"median_s": 0.333, "p99_s": 0.444}, "ratio_median": 0.33, "ratio_p99": 0.5},
        {"size": 100, "ours": {"median_s": 1.5, "p99_s": 2.5}}
        | {"kuberay": {"median_s": 3.0, "p99_s": 5.0}, "ratio_median": 0.5, "ratio_p99": 0.5},
    ],
    "run": {**RUN, "command": "bench/bench_side_by_side.py --json s.json"},
}
ALL = {
    "bench_worker": WORKER,
    "bench_ranks_per_pod": RANKS,
    "bench_operator": OPERATOR,
    "bench_side_by_side": SIDE_BY_SIDE,
}

# the numbers of ALL, in the page's tables
FULL_PAGE_LINES = [
    # worker: throughput, overhead, TP tables
    "| 8 | on (max 32) | 40.2 | 644.0 | 190 | 240 | 6 |",
    "| 8 | off (max 1) | 14.5 | 232.0 | 540 | 610 | 1 |",
    "| overhead (ours - direct) | 15.5 |  |",
    "| ratio overhead / bare (1 actor) | 2.00x |  |",
    "HTTP path overhead (one request at a time, 20 runs, interleaved)",
    "| 1 | 184.0 | 121.5 | 87 | 131 |",
    # ranks per pod, operator, side by side
    "| tiny | tp2-one-pod | shm | 123.4 | 456.7 | 1.2 | 321 | 345 |",
    "| pod failure -> group replaced | s | 100 | 6.750 | 8.000 |",
    "| operator peak RSS (VmHWM), 100 resources | MiB | 100 | 97.500 | 97.500 |",
    "| 1 | ours: DSI -> RayService | 0.111 | 0.222 |",
    "| 100 | KubeRay: RayService -> RayCluster | 3.000 | 5.000 |",
    "| 1 | ratio ours / KubeRay | 0.33 | 0.50 |",
]


def _render(tmp_path: Path, results: dict[str, dict[str, Any]]) -> tuple[str, Path]:
    res = tmp_path / "results"
    res.mkdir()
    for name, data in results.items():
        (res / f"{name}.json").write_text(json.dumps(data))
    out = tmp_path / "docs" / "performance.md"
    assert report.main(["--results", str(res), "--out", str(out)]) == 0
    return out.read_text(), out


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)\)", text)


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path


def test_full_page_has_every_table_and_both_plots(tmp_path: Path) -> None:
    text, out = _render(tmp_path, ALL)
    assert "not measured" not in text.lower()
    # the machine and command of each run
    assert "on 2 CPUs" in text and "`bench/bench_worker.py --quick --json w.json`" in text
    missing = [line for line in FULL_PAGE_LINES if line not in text]
    assert not missing
    # plots: embedded with relative links that resolve, and real PNGs
    links = _links(text)
    assert links == ["performance/serving-latency.png", "performance/operator-latency.png"]
    for link in links:
        _assert_png(out.parent / link)


def test_missing_json_says_not_measured_and_links_only_drawn_plots(tmp_path: Path) -> None:
    stale = tmp_path / "docs" / "performance" / report.OPERATOR_PLOT
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_SIGNATURE)  # from an earlier run
    text, out = _render(tmp_path, {"bench_worker": WORKER})
    for script in ("bench_ranks_per_pod", "bench_operator", "bench_side_by_side"):
        assert f"Not measured in this run (`bench/{script}.py` did not run)." in text
    assert "bench_worker.py` did not run" not in text
    assert not stale.exists()
    assert _links(text) == ["performance/serving-latency.png"]
    _assert_png(out.parent / "performance" / report.SERVING_PLOT)


def test_operator_plot_from_either_operator_benchmark(tmp_path: Path) -> None:
    text, out = _render(tmp_path, {"bench_side_by_side": SIDE_BY_SIDE})
    assert _links(text) == ["performance/operator-latency.png"]
    assert "Not measured in this run (`bench/bench_operator.py` did not run)." in text
    _assert_png(out.parent / "performance" / report.OPERATOR_PLOT)
    panels = report.operator_panels(OPERATOR, None)
    assert [p.title for p in panels] == ["Our operator (bench_operator)"]
    assert [(label, xs) for label, xs, _, _ in panels[0].lines][:2] == [
        ("apply -> RayService exists, p50", [1, 100]),
        ("apply -> RayService exists, p99", [1, 100]),
    ]


def test_no_results_at_all(tmp_path: Path) -> None:
    text, out = _render(tmp_path, {})
    assert text.count("Not measured in this run") == 5  # four benchmarks and the operator plot
    assert _links(text) == []
    assert not (out.parent / "performance").exists()


def test_serving_panels_split_batching_on_and_off() -> None:
    lat, tput = report.serving_panels(WORKER)
    assert [(label, xs, ys) for label, xs, ys, _ in lat.lines] == [
        ("batching on, p50", [1, 8], [87.0, 190.0]),
        ("batching on, p99", [1, 8], [95.0, 240.0]),
        ("batching off, p50", [1, 8], [90.0, 540.0]),
        ("batching off, p99", [1, 8], [99.0, 610.0]),
    ]
    assert [ys for _, _, ys, _ in tput.lines] == [[184.0, 644.0], [176.0, 232.0]]
    assert report.serving_panels({"throughput": []}) == []


def test_md_table() -> None:
    assert report.md_table(["a", "b"], [["x", 1.5]]) == "| a | b |\n| :-- | --: |\n| x | 1.5 |\n"


def test_write_json_adds_the_machine(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.json"
    report.write_json(str(path), {"bench": "x", "rows": [1]})
    data = json.loads(path.read_text())
    assert data["rows"] == [1]
    assert set(data["run"]) == {"cpus", "platform", "python", "date", "command"}
    report.write_json(None, {"bench": "x"})  # no --json: nothing written, no error


# -- the benchmarks' builders ----------------------------------------------------------------


def _module(name: str) -> ModuleType:
    # `make test` installs every extra (worker, dev, eval): a missing module is a broken
    # environment, not absent hardware, so it fails here.
    return importlib.import_module(name)


def test_worker_builders() -> None:
    bw = _module("bench_worker")
    single = [[0.010] * 5, [0.030] * 5, [0.005] * 5, [0.008] * 5]
    o = bw.overhead_result(single)
    assert o["runs"] == 5
    assert [p["p50_ms"] for p in o["paths"]] == pytest.approx([10.0, 30.0, 5.0, 8.0])
    assert o["overhead_ms"] == pytest.approx(20.0)
    assert o["ratio_overhead_bare"] == pytest.approx(4.0)
    r = {"req_s": 1.0, "tok_s": 16.0, "p50_ms": 9.0, "p99_ms": 12.0, "batch": 1.0}
    results = {(8, False): r, (1, True): r, (8, True): {**r, "tok_s": 99.0}}
    rows = bw.throughput_rows(results)
    assert [(x["concurrency"], x["batching"]) for x in rows] == [(1, True), (8, True), (8, False)]
    assert rows[1]["tok_s"] == 99.0
    tp = bw.tp_row(8, results[(8, True)], {**r, "tok_s": 50.0, "p50_ms": 20.0})
    assert tp == {
        "concurrency": 8,
        "tp1_tok_s": 99.0,
        "tp2_tok_s": 50.0,
        "tp1_p50_ms": 9.0,
        "tp2_p50_ms": 20.0,
    }
    full = bw.worker_result({"model": "m", "max_tokens": 16}, results, single, [tp])
    assert full["bench"] == "bench_worker" and full["tp"] == [tp]
    assert "| 8 | 99.0 | 50.0 | 9 | 20 |" in report.worker_section(full, set())


def test_ranks_per_pod_builder() -> None:
    rp = _module("bench_ranks_per_pod")
    rank = {"allreduce": "gloo", "tok_s_b1": 10.0, "tok_s_b8": 40.0, "load_s": 2.0}
    ranks = [
        {**rank, "rss_loaded": 300.0, "rss_peak": 310.0},
        {**rank, "tok_s_b1": 11.0, "rss_loaded": 305.0, "rss_peak": 309.0},
    ]
    row = rp.layout_row("tiny", "tp2-two-pods", ranks)
    assert row == {
        "model": "tiny",
        "layout": "tp2-two-pods",
        "allreduce": "gloo",
        "tok_s_b1": 10.0,
        "tok_s_b8": 40.0,
        "load_s": 2.0,
        "rss_mib": 305.0,
        "peak_mib": 310.0,
    }
    page = report.ranks_section({"settings": {"runs": 3, "tokens": 8}, "rows": [row]})
    assert "| tiny | tp2-two-pods | gloo | 10.0 | 40.0 | 2.0 | 305 | 310 |" in page


def test_operator_builder() -> None:
    bo = _module("bench_operator")
    args = argparse.Namespace(sizes="1", rss_sizes="100", failures=3, idle_seconds=60.0)
    rows = [("apply -> RayService exists", "s", 1, 0.5, 0.75)]
    out = bo.operator_result(rows, args)
    assert out["rows"] == [
        {"metric": "apply -> RayService exists", "unit": "s", "n": 1, "median": 0.5, "p99": 0.75}
    ]
    assert out["settings"] == {"sizes": "1", "rss_sizes": "100", "failures": 3, "idle_seconds": 60}
    assert "| apply -> RayService exists | s | 1 | 0.500 | 0.750 |" in report.operator_section(out)


def test_side_by_side_builder() -> None:
    sbs = _module("bench_side_by_side")
    args = argparse.Namespace(samples=3, burst=2)
    out = sbs.side_by_side_result([(1, [1.0, 2.0, 3.0], [2.0, 4.0, 6.0])], args)
    (row,) = out["rows"]
    assert row["size"] == 1
    assert row["ours"] == {"median_s": 2.0, "p99_s": 3.0}
    assert row["kuberay"] == {"median_s": 4.0, "p99_s": 6.0}
    assert (row["ratio_median"], row["ratio_p99"]) == (0.5, 0.5)
    assert out["settings"] == {"samples": 3, "burst": 2}
    assert "| 1 | ratio ours / KubeRay | 0.50 | 0.50 |" in report.side_by_side_section(out)
