"""Worker benchmark on CPU: batching, HTTP overhead, TP=2 vs TP=1 (tiny model by default).

    .venv/bin/python bench/bench_worker.py [--model DIR] [--max-tokens 16] [--quick]

Prints tables of medians (and p99) from one run; nothing is asserted.  Numbers on a
2-core machine with a tiny model measure the serving path's overheads, not model speed.

The HTTP overhead table puts our path next to a bare Ray Serve path of the same shape on the
same Serve proxy (HTTP -> FastAPI ingress -> one deployment -> N actors gathered, no model),
one request at a time, interleaved, over one reused connection, and prints our overhead over
a direct engine call as a multiple of the bare path. Run it with
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the environment to measure Serve's fast mode (the
local Ray processes inherit it).
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request``
# annotation of the bare ingress route (pickled by value with this script).

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import ray
from dsi_worker.ports import free_port
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from report import write_json

# -- the bare Serve path ------------------------------------------------------------------
# Defined in this script (pickled by value): HTTP -> FastAPI ingress -> one deployment ->
# ``n`` actors, gathered, echoing the request body; our path's hops with none of its work.

bare_api = FastAPI()


@ray.remote(num_cpus=0)
class _EchoActor:
    def run(self, x: Any) -> Any:
        return x


@serve.deployment(ray_actor_options={"num_cpus": 0})
class _BareGroup:
    def __init__(self, n: int) -> None:
        self.actors = [_EchoActor.remote() for _ in range(n)]  # type: ignore[attr-defined]

    async def generate(self, x: Any) -> Any:
        outs = await asyncio.gather(*[a.run.remote(x) for a in self.actors])
        return outs[0]


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(bare_api)
class _BareIngress:
    def __init__(self, group: Any) -> None:
        self.group = group

    @bare_api.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        out = await self.group.generate.remote(await request.json())
        return JSONResponse({"echo": out})


def _deploy_bare(n: int) -> str:
    """Deploy the bare path with ``n`` actors at ``/bare<n>``; returns its route prefix."""
    name = f"bare{n}"
    app = _BareIngress.bind(_BareGroup.bind(n))  # type: ignore[attr-defined]
    serve.run(app, name=name, route_prefix=f"/{name}")
    return f"/{name}"


def _single(
    direct: Callable[[], Any], url: str, paths: list[str], runs: int, max_tokens: int
) -> list[list[float]]:
    """Seconds of ``runs`` rounds of: a direct engine call (``direct``), then a POST to each
    of ``paths`` under ``url``; one at a time, interleaved so that load drift on a shared
    machine hits all alike, over one reused connection. One list per kind, direct first."""
    body = {"prompt": "request 0 says hello", "max_tokens": max_tokens}
    lat: list[list[float]] = [[] for _ in range(len(paths) + 1)]
    with httpx.Client(timeout=600) as c:

        def post(path: str) -> None:
            c.post(f"{url}{path}", json=body).raise_for_status()

        calls = [direct] + [lambda p=p: post(p) for p in paths]
        for i in range(runs + 3):  # 3 warm-up rounds
            for k, call in enumerate(calls):
                t0 = time.perf_counter()
                call()
                if i >= 3:
                    lat[k].append(time.perf_counter() - t0)
    return lat


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


def _ms(xs: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    return statistics.median(xs) * 1000, _pct(xs, 99) * 1000


OVERHEAD_PATHS = (
    "direct engine.generate",
    "HTTP -> ingress -> group -> rank (TP=1)",
    "bare Serve: HTTP -> ingress -> deployment -> 1 actor",
    "bare Serve: HTTP -> ingress -> deployment -> 2 actors",
)


def overhead_result(single: list[list[float]]) -> dict[str, Any]:
    """p50 and p99 of each path in ``single`` (direct, ours, bare 1 actor, bare 2 actors), and
    our overhead over the direct call, in ms and as a multiple of the same-shape bare path
    (TP=1: one rank actor, so the 1-actor bare path)."""
    ms = [_ms(xs) for xs in single]
    overhead = ms[1][0] - ms[0][0]
    return {
        "runs": len(single[0]),
        "paths": [
            {"path": name, "p50_ms": p50, "p99_ms": p99}
            for name, (p50, p99) in zip(OVERHEAD_PATHS, ms, strict=True)
        ],
        "overhead_ms": overhead,
        "ratio_overhead_bare": overhead / ms[2][0],
    }


def _overhead_table(o: dict[str, Any]) -> None:
    """The table of ``overhead_result``."""
    rows = [[p["path"], f"{p['p50_ms']:.1f}", f"{p['p99_ms']:.1f}"] for p in o["paths"]]
    rows.insert(2, ["overhead (ours - direct)", f"{o['overhead_ms']:.1f}", ""])
    rows.append(["ratio overhead / bare (1 actor)", f"{o['ratio_overhead_bare']:.2f}x", ""])
    _table(
        f"HTTP path overhead (one request at a time, {o['runs']} runs, interleaved)",
        ["path", "p50 ms", "p99 ms"],
        rows,
    )


def _direct(model: str, max_tokens: int) -> Callable[[], Any]:
    """A direct ``RankEngine.generate`` call (in this process): the floor the HTTP path is
    compared with."""
    from dsi_worker.engine import DistEnv, GenRequest, RankEngine, SamplingParams
    from dsi_worker.model_files import load_tokenizer

    tok = load_tokenizer(model)
    prompt = tuple(tok("request 0 says hello")["input_ids"])
    eng = RankEngine(model, dtype="float32", device="cpu", dist_env=DistEnv(), torch_threads=1)
    eng.start()
    req = GenRequest(prompt, SamplingParams(max_new_tokens=max_tokens))
    return lambda: eng.generate([req])


def throughput_rows(results: dict[tuple[int, bool], dict[str, float]]) -> list[dict[str, Any]]:
    """``_load`` results per (concurrency, batching) as rows: by concurrency, batching first."""
    return [
        {"concurrency": c, "batching": b, **r}
        for (c, b), r in sorted(results.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
    ]


def _throughput_table(rows: list[dict[str, Any]]) -> None:
    """The table of ``throughput_rows``."""
    _table(
        "Throughput via HTTP /generate, TP=1, 1 group",
        ["concurrency", "batching", "req/s", "tok/s", "p50 ms", "p99 ms", "median batch"],
        [
            [
                str(r["concurrency"]),
                "on (max 32)" if r["batching"] else "off (max 1)",
                f"{r['req_s']:.1f}",
                f"{r['tok_s']:.1f}",
                f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}",
                f"{r['batch']:.0f}",
            ]
            for r in rows
        ],
    )


def _tp_table(rows: list[dict[str, Any]]) -> None:
    """The table of ``tp_row``s."""
    _table(
        "TP=2 vs TP=1 on CPU (gloo), batching on",
        ["concurrency", "TP=1 tok/s", "TP=2 tok/s", "TP=1 p50 ms", "TP=2 p50 ms"],
        [
            [str(r["concurrency"]), f"{r['tp1_tok_s']:.1f}", f"{r['tp2_tok_s']:.1f}"]
            + [f"{r['tp1_p50_ms']:.0f}", f"{r['tp2_p50_ms']:.0f}"]
            for r in rows
        ],
    )


def worker_result(
    settings: dict[str, Any],
    results: dict[tuple[int, bool], dict[str, float]],
    single: list[list[float]],
    tp: list[dict[str, Any]],
) -> dict[str, Any]:
    """All of this run's figures, as ``--json`` writes them."""
    return {
        "bench": "bench_worker",
        "settings": settings,
        "throughput": throughput_rows(results),
        "overhead": overhead_result(single),
        "tp": tp,
    }


def main() -> None:
    """Run all measurements and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="model dir or hub id (default: tiny model)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--overhead-only", action="store_true", help="only the HTTP overhead table")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    ns = ap.parse_args()

    from dsi_worker.local import start_ray
    from dsi_worker.model_files import resolve_model_path

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
    levels = [] if ns.overhead_only else [1, 8, 32]
    n_for = (lambda c: max(8, 2 * c)) if ns.quick else (lambda c: max(16, 4 * c))
    single_runs = 20 if ns.quick else 40
    direct = _direct(model, ns.max_tokens)  # before Ray starts: like a rank, one thread

    start_ray(1, 2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[tuple[int, bool], dict[str, float]] = {}
    single: list[list[float]] = []
    tp_rows: list[dict[str, Any]] = []
    try:
        bare_paths = [_deploy_bare(1), _deploy_bare(2)]
        for batching in (True,) if ns.overhead_only else (True, False):
            url = _deploy(
                {**base, "tensor_parallel_size": 1, "max_batch_size": 32 if batching else 1},
                port,
            )
            asyncio.run(_load(url, 1, 4, ns.max_tokens))  # warm-up
            for c in levels:
                results[(c, batching)] = asyncio.run(_load(url, c, n_for(c), ns.max_tokens))
            if batching:
                paths = ["/generate"] + [f"{p}/generate" for p in bare_paths]
                single = _single(direct, url, paths, single_runs, ns.max_tokens)
            _undeploy()
        if not ns.overhead_only:
            tp_rows = _tp_rows(base, port, results, n_for, ns.max_tokens)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nmodel={model} max_tokens={ns.max_tokens} (medians of one run)")
    if results:
        _throughput_table(throughput_rows(results))
    _overhead_table(overhead_result(single))
    if tp_rows:
        _tp_table(tp_rows)
    settings = {"model": model, "max_tokens": ns.max_tokens, "quick": ns.quick}
    write_json(ns.json, worker_result(settings, results, single, tp_rows))


def tp_row(concurrency: int, tp1: dict[str, float], tp2: dict[str, float]) -> dict[str, Any]:
    """TP=2's tok/s and p50 next to TP=1's at one concurrency (``_load`` results)."""
    return {
        "concurrency": concurrency,
        "tp1_tok_s": tp1["tok_s"],
        "tp2_tok_s": tp2["tok_s"],
        "tp1_p50_ms": tp1["p50_ms"],
        "tp2_p50_ms": tp2["p50_ms"],
    }


def _tp_rows(
    base: dict[str, Any],
    port: int,
    results: dict[tuple[int, bool], dict[str, float]],
    n_for: Callable[[int], int],
    max_tokens: int,
) -> list[dict[str, Any]]:
    """Deploy TP=2 and put its tok/s and p50 next to TP=1's (from ``results``)."""
    url = _deploy({**base, "tensor_parallel_size": 2, "max_batch_size": 32}, port)
    asyncio.run(_load(url, 1, 4, max_tokens))
    rows = []
    for c in (1, 8):
        r2 = asyncio.run(_load(url, c, n_for(c), max_tokens))
        rows.append(tp_row(c, results[(c, True)], r2))
    _undeploy()
    return rows


if __name__ == "__main__":
    main()
