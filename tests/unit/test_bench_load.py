"""The pure parts of bench/bench_load.py (the locustfile's SSE timing, percentiles, the
summary and the table) over plain data; no server, no locust."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_load.py"
    spec = importlib.util.spec_from_file_location("bench_load", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_load", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


bl = _load()


def _data(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj)


def _text(t: str, finish: str | None = None) -> str:
    return _data({"object": "text_completion", "choices": [{"text": t, "finish_reason": finish}]})


def test_stream_timings_from_text_chunks_and_usage() -> None:
    events = [
        (10.25, _text("Hel")),
        (10.25, ""),  # the blank line after each event
        (10.30, _text("")),  # no text: neither the first token nor a gap
        (10.35, _text("lo")),
        (10.55, _text(" you")),
        (10.60, _text("", "length")),
        (10.60, _data({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}})),
        (10.61, "data: [DONE]"),
    ]
    r = bl.parse_stream(events, t0=10.0, t_end=10.7)
    assert r.ok and r.error is None
    assert r.ttft_s == pytest.approx(0.25)
    assert r.itl_s == pytest.approx((0.10 + 0.20) / 2)
    assert r.latency_s == pytest.approx(0.7)
    assert (r.text_chunks, r.output_tokens) == (3, 5)


def test_chat_deltas_count_and_tokens_default_to_chunks() -> None:
    delta = {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}
    r = bl.parse_stream([(1.5, _data(delta)), (1.6, "data: [DONE]")], 1.0, 1.6)
    assert r.ok and r.ttft_s == pytest.approx(0.5)
    assert r.itl_s is None and r.output_tokens == 1


@pytest.mark.parametrize(
    ("events", "error"),
    [
        ([(1.0, _text("a")), (1.1, _data({"error": {"message": "generation failed"}}))], "gen"),
        ([(1.0, _text("a"))], "without [DONE]"),
        ([(1.0, "data: {not json")], "bad SSE data"),
    ],
)
def test_failures(events: list[tuple[float, str]], error: str) -> None:
    r = bl.parse_stream(events, 0.0, 2.0)
    assert not r.ok and error in r.error


def test_percentile_interpolates_like_numpy() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert bl.percentile(xs, 50) == pytest.approx(2.5)
    assert bl.percentile(xs, 99) == pytest.approx(3.97)
    assert bl.percentile(xs, 0) == 1.0 and bl.percentile([7.0], 99) == 7.0
    assert bl.percentile([], 50) is None


def _rec(start: float, end: float, ok: bool = True, tokens: int = 10) -> dict[str, Any]:
    lat = end - start
    return {
        "start": start,
        "end": end,
        "ok": ok,
        "ttft_s": lat / 4 if ok else None,
        "itl_s": 0.01 if ok else None,
        "latency_s": lat,
        "output_tokens": tokens if ok else 0,
    }


def test_summary_and_table() -> None:
    recs = [_rec(0.0, 1.0), _rec(1.0, 2.0), _rec(2.0, 4.0), _rec(3.0, 4.0, ok=False)]
    row = bl.summarize(recs, users=2)
    assert (row["requests"], row["errors"], row["span_s"]) == (4, 1, 4.0)
    assert row["req_s"] == pytest.approx(0.75) and row["error_pct"] == pytest.approx(25)
    assert row["latency_p50_ms"] == pytest.approx(1000)
    assert row["ttft_p50_ms"] == pytest.approx(250)
    assert row["out_tok_s"] == pytest.approx(30 / 4)

    empty = bl.summarize([], users=32)
    assert empty["requests"] == 0 and empty["ttft_p50_ms"] is None

    lines = bl.format_table([row, empty]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| users |")
    assert lines[1].startswith("|---") and lines[1].endswith(":|")
    assert lines[2].split("|")[1].strip() == "2" and "1000" in lines[2]
    assert "-" in lines[3].split("|")[5]  # no TTFT without successes
