"""Worker benchmark on CPU: batching, HTTP overhead, TP=2 vs TP=1 (tiny model by default).

    .venv/bin/python bench/bench_worker.py [--model DIR] [--max-tokens 16] [--quick]

Prints tables of medians (and p99) from one run; nothing is asserted.  Numbers on a
2-core machine with a tiny model measure the serving path's overheads, not model speed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import httpx
from dsi_localcluster.testing import free_port


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def _load(url: str, conc: int, n: int, max_tokens: int) -> dict[str, float]:
    """``n`` /generate requests, ``conc`` in flight at a time."""
    lat: list[float] = []
    toks = 0
    batch: list[int] = []
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=conc)) as c:

        async def one(i: int) -> None:
            nonlocal toks
            async with sem:
                t0 = time.perf_counter()
                r = await c.post(
                    f"{url}/generate",
                    json={"prompt": f"request {i} says hello", "max_tokens": max_tokens},
                )
                lat.append(time.perf_counter() - t0)
                r.raise_for_status()
                body = r.json()
                toks += body["completion_tokens"]
                batch.append(body["batch_size"])

        t0 = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(n)])
        wall = time.perf_counter() - t0
    return {
        "req_s": n / wall,
        "tok_s": toks / wall,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": _pct(lat, 99) * 1000,
        "batch": statistics.median(batch),
    }


def _deploy(args: dict[str, Any], port: int) -> str:
    from dsi_worker.app import build_app
    from ray import serve

    serve.run(build_app({**args, "local_mode": True}), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("app did not become healthy within 600s")


def _undeploy() -> None:
    from ray import serve

    serve.delete("bench")
    time.sleep(2)  # let rank actors and their MASTER_PORT go


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def _table(title: str, head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(f"\n{title}")
    print(_row(head, widths))
    print(_row(["-" * w for w in widths], widths))
    for r in rows:
        print(_row(r, widths))
    sys.stdout.flush()


def main() -> None:
    """Run all measurements and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="model dir or hub id (default: tiny model)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ns = ap.parse_args()

    import ray
    from dsi_worker.engine import (
        DistEnv,
        GenRequest,
        RankEngine,
        SamplingParams,
        load_tokenizer,
        resolve_model_path,
    )
    from dsi_worker.local import start_ray
    from ray import serve

    model = resolve_model_path(ns.model)
    base = {
        "model": model,
        "dtype": "float32",
        "num_groups": 1,
        "max_new_tokens": max(64, ns.max_tokens),
        "request_timeout_s": 600,
        "torch_threads": 1,
        "batch_wait_timeout_s": 0.01,
    }
    levels = [1, 8, 32]
    n_for = (lambda c: max(8, 2 * c)) if ns.quick else (lambda c: max(16, 4 * c))

    # Direct engine call: the floor the HTTP path is compared with.
    tok = load_tokenizer(model)
    prompt = tuple(tok("request 0 says hello")["input_ids"])
    eng = RankEngine(model, dtype="float32", device="cpu", dist_env=DistEnv(), torch_threads=1)
    eng.start()
    req = GenRequest(prompt, SamplingParams(max_new_tokens=ns.max_tokens))
    eng.generate([req])  # warm-up
    direct = []
    for _ in range(20):
        t0 = time.perf_counter()
        eng.generate([req])
        direct.append(time.perf_counter() - t0)
    del eng

    start_ray(1, 2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[tuple[int, bool], dict[str, float]] = {}
    http_single: list[float] = []
    tp_rows: list[list[str]] = []
    try:
        for batching in (True, False):
            url = _deploy(
                {**base, "tensor_parallel_size": 1, "max_batch_size": 32 if batching else 1},
                port,
            )
            asyncio.run(_load(url, 1, 4, ns.max_tokens))  # warm-up
            for c in levels:
                results[(c, batching)] = asyncio.run(_load(url, c, n_for(c), ns.max_tokens))
            if batching:
                for _ in range(20):
                    t0 = time.perf_counter()
                    httpx.post(
                        f"{url}/generate",
                        json={"prompt": "request 0 says hello", "max_tokens": ns.max_tokens},
                        timeout=600,
                    ).raise_for_status()
                    http_single.append(time.perf_counter() - t0)
                tp1 = {c: results[(c, True)] for c in (1, 8)}
            _undeploy()

        url = _deploy({**base, "tensor_parallel_size": 2, "max_batch_size": 32}, port)
        asyncio.run(_load(url, 1, 4, ns.max_tokens))
        for c in (1, 8):
            r2 = asyncio.run(_load(url, c, n_for(c), ns.max_tokens))
            r1 = tp1[c]
            tp_rows.append(
                [
                    str(c),
                    f"{r1['tok_s']:.1f}",
                    f"{r2['tok_s']:.1f}",
                    f"{r1['p50_ms']:.0f}",
                    f"{r2['p50_ms']:.0f}",
                ]
            )
        _undeploy()
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nmodel={model} max_tokens={ns.max_tokens} (medians of one run)")
    _table(
        "Throughput via HTTP /generate, TP=1, 1 group",
        ["concurrency", "batching", "req/s", "tok/s", "p50 ms", "p99 ms", "median batch"],
        [
            [
                str(c),
                "on (max 32)" if b else "off (max 1)",
                f"{r['req_s']:.1f}",
                f"{r['tok_s']:.1f}",
                f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}",
                f"{r['batch']:.0f}",
            ]
            for (c, b), r in sorted(results.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
        ],
    )
    d50, h50 = statistics.median(direct) * 1000, statistics.median(http_single) * 1000
    _table(
        "HTTP path overhead (one request at a time, 20 runs)",
        ["path", "p50 ms", "p99 ms"],
        [
            ["direct engine.generate", f"{d50:.1f}", f"{_pct(direct, 99) * 1000:.1f}"],
            [
                "HTTP -> ingress -> group -> rank",
                f"{h50:.1f}",
                f"{_pct(http_single, 99) * 1000:.1f}",
            ],
            ["overhead", f"{h50 - d50:.1f}", ""],
        ],
    )
    _table(
        "TP=2 vs TP=1 on CPU (gloo), batching on",
        ["concurrency", "TP=1 tok/s", "TP=2 tok/s", "TP=1 p50 ms", "TP=2 p50 ms"],
        tp_rows,
    )


if __name__ == "__main__":
    main()
