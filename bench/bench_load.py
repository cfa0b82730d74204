"""Load test of the OpenAI-style API with locust: streaming latency vs. concurrency.

    .venv/bin/python bench/bench_load.py [--url http://127.0.0.1:8000] [--users 1 8 32]
        [--seconds 30] [--max-tokens 32] [--png docs/load-concurrency.png] [--json out.json]

Without ``--url`` it starts the worker's local mode (``python -m dsi_worker.local``, the tiny
model unless ``--model``) in a subprocess, waits for ``/healthz`` and stops it at the end.
For each concurrency level it runs ``locust -f bench/locustfile.py --headless`` (always in a
subprocess: locust monkey-patches the standard library with gevent) for ``--seconds``, reads
the per-request records the locustfile writes and prints one markdown table row: requests,
req/s, error %, time to first token, inter-token latency, end-to-end latency (p50/p99) and
output tokens/s. The PNG plots TTFT and latency (p50/p99) against the number of users.

This module's top level imports only the standard library: the locustfile imports its
``parse_stream`` to turn the SSE lines of one response into timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsi_worker.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
DEFAULT_PNG = ROOT / "docs" / "load-concurrency.png"
#: Seconds the local worker may take to start and form its group(s).
START_TIMEOUT_S = 600.0
#: Seconds the local worker gets to stop after SIGTERM before its processes are killed.
STOP_GRACE_S = 30.0
#: Seconds locust lets in-flight requests finish after the run time.
LOCUST_STOP_TIMEOUT_S = 60


# ---------------------------------------------------------------------------- pure parts


@dataclass
class StreamResult:
    """Timings of one streamed completion, in seconds from sending the request."""

    ok: bool
    error: str | None
    ttft_s: float | None  # first SSE chunk that carries text
    itl_s: float | None  # mean gap between consecutive text-carrying chunks
    latency_s: float  # until the stream ended
    text_chunks: int
    output_tokens: int  # usage.completion_tokens, else the number of text chunks


def _chunk_text(obj: dict[str, Any]) -> str:
    """The text a completions or chat completions chunk carries ('' if none)."""
    text = ""
    for choice in obj.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


def parse_stream(events: Iterable[tuple[float, str]], t0: float, t_end: float) -> StreamResult:
    """Turn (arrival time, SSE line) pairs of one response into a :class:`StreamResult`.

    ``t0`` is when the request was sent, ``t_end`` when the stream closed (same clock). A
    ``data: {"error": ...}`` event, unparsable data or a stream without ``data: [DONE]`` is
    a failure.
    """
    times: list[float] = []
    usage_tokens: int | None = None
    error: str | None = None
    done = False
    for t, line in events:
        if not line.startswith("data:"):
            continue  # blank separators, comments, "event:" / "id:" fields
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except ValueError:
            error = f"bad SSE data: {data[:80]!r}"
            break
        if "error" in obj:
            err = obj["error"]
            error = str(err.get("message", err) if isinstance(err, dict) else err)
            break
        if _chunk_text(obj):
            times.append(t)
        if obj.get("usage"):
            usage_tokens = int(obj["usage"].get("completion_tokens", 0))
    if error is None and not done:
        error = "stream ended without [DONE]"
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return StreamResult(
        ok=error is None,
        error=error,
        ttft_s=times[0] - t0 if times else None,
        itl_s=sum(gaps) / len(gaps) if gaps else None,
        latency_s=t_end - t0,
        text_chunks=len(times),
        output_tokens=usage_tokens if usage_tokens is not None else len(times),
    )


def percentile(xs: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0-100) with linear interpolation (numpy's default); None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def summarize(records: Sequence[dict[str, Any]], users: int) -> dict[str, Any]:
    """One concurrency level's figures from the locustfile's per-request records.

    Rates divide by the span from the first request's start to the last one's end; latency
    percentiles are over successful requests; ITL percentiles over their per-request means.
    """
    ok = [r for r in records if r["ok"]]
    span = max(r["end"] for r in records) - min(r["start"] for r in records) if records else 0
    rate = (lambda x: x / span) if span > 0 else (lambda x: 0.0)

    def pct(key: str, p: float) -> float | None:
        return _ms(percentile([r[key] for r in ok if r[key] is not None], p))

    return {
        "users": users,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "span_s": span,
        "req_s": rate(len(ok)),
        "error_pct": 100 * (len(records) - len(ok)) / len(records) if records else 0.0,
        "ttft_p50_ms": pct("ttft_s", 50),
        "ttft_p99_ms": pct("ttft_s", 99),
        "itl_p50_ms": pct("itl_s", 50),
        "itl_p99_ms": pct("itl_s", 99),
        "latency_p50_ms": pct("latency_s", 50),
        "latency_p99_ms": pct("latency_s", 99),
        "out_tok_s": rate(sum(r["output_tokens"] for r in ok)),
    }


COLUMNS = [
    ("users", "users", "{:d}"),
    ("requests", "requests", "{:d}"),
    ("req_s", "req/s", "{:.2f}"),
    ("error_pct", "error %", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("itl_p99_ms", "ITL p99 ms", "{:.1f}"),
    ("latency_p50_ms", "latency p50 ms", "{:.0f}"),
    ("latency_p99_ms", "latency p99 ms", "{:.0f}"),
    ("out_tok_s", "output tok/s", "{:.1f}"),
]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize` rows (``-`` where a figure is missing)."""
    head = [title for _, title, _ in COLUMNS]
    body = [
        ["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


# ---------------------------------------------------------------------------- plotting


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Latency vs. concurrency: TTFT and end-to-end latency, p50 and p99, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [r["users"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    series = [
        ("ttft_p50_ms", "TTFT p50", "tab:blue", "-"),
        ("ttft_p99_ms", "TTFT p99", "tab:blue", "--"),
        ("latency_p50_ms", "latency p50", "tab:orange", "-"),
        ("latency_p99_ms", "latency p99", "tab:orange", "--"),
    ]
    for key, label, color, style in series:
        pts = [(u, r[key]) for u, r in zip(users, rows, strict=True) if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, color=color, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(users, [str(u) for u in users])
    ax.set_xlabel("concurrent users (closed loop)")
    ax.set_ylabel("ms")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- processes


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_local_worker(ns: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m dsi_worker.local`` and wait for ``/healthz``; one more try if it
    exits while starting (Ray gives its raylet 30 s to register, short on a busy machine)."""
    for attempt in (1, 2):
        proc, url = _spawn_local_worker(ns, log)
        t0 = time.monotonic()
        try:
            while not _healthy(url) and proc.poll() is None:
                if time.monotonic() - t0 > START_TIMEOUT_S:
                    raise SystemExit(f"the local worker was not healthy after {START_TIMEOUT_S}s")
                time.sleep(1)
        except BaseException:  # the timeout, Ctrl-C, SIGTERM
            stop_local_worker(proc)
            raise
        if proc.poll() is None:
            print(f"local worker healthy at {url} after {time.monotonic() - t0:.0f}s", flush=True)
            return proc, url
        stop_local_worker(proc)
        tail = log.read_text(errors="replace")[-3000:]
        if attempt == 2:
            raise SystemExit(f"the local worker exited while starting:\n{tail}")
        print(f"the local worker exited while starting; retrying:\n{tail}", flush=True)
    raise AssertionError("unreachable")


def _spawn_local_worker(ns: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m dsi_worker.local`` in its own session, output to ``log``; (process, URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "dsi_worker.local", "--port", str(port), "--tp", str(ns.tp)]
    cmd += ["--max-batch-size", str(ns.max_batch_size), "--served-model-name", ns.served_name]
    cmd += ["--max-new-tokens", str(max(64, ns.max_tokens))]
    if ns.model:
        cmd += ["--model", ns.model]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"starting the local worker (log: {log}): {' '.join(cmd[1:])}", flush=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc, f"http://127.0.0.1:{port}"


def _alive(p: Any) -> bool:
    """Running and not a zombie (killed processes wait there until someone reaps them)."""
    import psutil

    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def stop_local_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (local mode then stops Serve and Ray in bounded time); then kill what is left."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 5  # Ray's processes exit on their own once their parent did
    while (left := [p for p in tree if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=5)
    print(f"local worker stopped ({len(left)} leftover process(es) killed)", flush=True)


def discover_model(url: str) -> str:
    """The first model ``GET /v1/models`` lists."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        return str(json.load(r)["data"][0]["id"])


def run_locust(url: str, users: int, ns: argparse.Namespace, records: Path) -> list[dict[str, Any]]:
    """One headless locust run of ``users`` closed-loop users; its per-request records."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    cmd += ["--host", url, "-u", str(users), "-r", str(users), "-t", f"{ns.seconds}s"]
    cmd += ["--stop-timeout", str(LOCUST_STOP_TIMEOUT_S), "--only-summary", "--loglevel", "ERROR"]
    cmd += ["--model", ns.served_name, "--max-tokens", str(ns.max_tokens)]
    cmd += ["--records", str(records)]
    limit = ns.seconds + LOCUST_STOP_TIMEOUT_S + 60
    print(f"  {users:>3} users for {ns.seconds}s ...", flush=True)
    with open(records.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(limit)
        except BaseException as e:  # past the limit, Ctrl-C, SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            print(f"  locust ran past {limit}s and was killed", flush=True)
    if not records.exists():
        tail = records.with_suffix(".log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"locust wrote no records (exit {proc.returncode}):\n{tail}")
    return [json.loads(line) for line in records.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- driver


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default=None, help="served endpoint; default: start local mode")
    p.add_argument("--served-name", default=None, help="model name (default: GET /v1/models)")
    p.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=int, default=30, help="locust run time per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--png", type=Path, default=DEFAULT_PNG)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--title", default=None, help="plot title (default: model, max tokens)")
    local = p.add_argument_group("local mode (without --url)")
    local.add_argument("--model", default=None, help="model dir or hub id (default: tiny)")
    local.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    local.add_argument("--max-batch-size", type=int, default=8)
    return p.parse_args(argv)


def measure(url: str, ns: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """A short warm-up, then one locust run per level; the summarized rows."""
    print("warm-up:", flush=True)
    run_locust(url, 1, argparse.Namespace(**{**vars(ns), "seconds": 3}), work / "warmup.jsonl")
    rows = []
    for users in ns.users:
        records = run_locust(url, users, ns, work / f"u{users}.jsonl")
        rows.append(summarize(records, users))
        errors = [r["error"] for r in records if not r["ok"]]
        if errors:
            print(f"  {len(errors)} failed; first: {errors[0]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Start the worker unless ``--url``, measure every level, print, plot, stop."""
    ns = parse_cli(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups below
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        proc = None
        if ns.url is None:
            ns.served_name = ns.served_name or "tiny"
            proc, url = start_local_worker(ns, work / "worker.log")  # stops it if it fails
        else:
            url = ns.url.rstrip("/")
        try:
            ns.served_name = ns.served_name or discover_model(url)
            rows = measure(url, ns, work)
        finally:
            if proc is not None:
                stop_local_worker(proc)
    print(
        f"\nendpoint={url} model={ns.served_name} max_tokens={ns.max_tokens} "
        f"seconds/level={ns.seconds} (streaming /v1/completions, closed loop)\n"
    )
    print(format_table(rows), flush=True)
    title = ns.title or f"{ns.served_name}: streaming /v1/completions, max_tokens={ns.max_tokens}"
    plot(rows, ns.png, title)
    print(f"\nplot: {ns.png}")
    if ns.json is not None:
        meta = {"url": url, "model": ns.served_name, "max_tokens": ns.max_tokens}
        ns.json.write_text(json.dumps({**meta, "seconds": ns.seconds, "rows": rows}, indent=2))
        print(f"figures: {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
