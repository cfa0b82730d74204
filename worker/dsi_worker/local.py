"""Local mode: run the app on this machine without Kubernetes.

``python -m dsi_worker.local [--model PATH_OR_HUB_ID] [--tp 2] [--groups 1] [--port 8000]``

Starts a local Ray head that carries every ``dsi_g<g>_r<r>`` custom resource (on
Kubernetes each rank's pod carries its own), gives each rank actor the env the operator
would give its pod (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT per
group, ...), serves on ``http://127.0.0.1:<port>`` and blocks until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import dsi_operator.api.defaults as D

from dsi_worker.rank_actor import rank_resource

# Seconds serve.shutdown() + ray.shutdown() may take before the Ray processes are killed.
SHUTDOWN_GRACE_S = 10.0


def local_resources(num_groups: int, tp: int) -> dict[str, float]:
    """All rank-pinning resources of the app, as the operator spreads them over pods."""
    return {rank_resource(g, r): 1.0 for g in range(num_groups) for r in range(tp)}


def start_ray(
    num_groups: int,
    tp: int,
    *,
    num_cpus: int | None = None,
    namespace: str | None = None,
    object_store_mb: int = 200,
) -> None:
    """A small local Ray head: no dashboard, small object store, rank resources."""
    import ray

    ray.init(
        num_cpus=num_cpus if num_cpus is not None else max(4, (os.cpu_count() or 2)),
        resources=local_resources(num_groups, tp),
        object_store_memory=object_store_mb * 1024 * 1024,
        namespace=namespace,
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
        log_to_driver=False,
    )


def start_serve(app_args: dict[str, Any], *, port: int = 8000, host: str = "127.0.0.1") -> str:
    """Deploy the app on the running Ray and return its base URL (blocks until RUNNING)."""
    from ray import serve

    from dsi_worker.app import build_app

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({**app_args, "local_mode": True}), name="dsi", route_prefix="/")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def _wait_healthy(url: str, timeout_s: float = 900.0) -> None:
    """Print when every group has formed (GET /healthz answers 200)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                if r.status == 200:
                    print(f"  ready: every group formed ({url}/healthz is 200)", flush=True)
                    return
        except (urllib.error.URLError, OSError):
            pass  # 503 while groups form
        time.sleep(1)
    print(f"  warning: groups not formed after {timeout_s:.0f}s; see {url}/healthz", flush=True)


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m dsi_worker.local``."""
    p = argparse.ArgumentParser(prog="python -m dsi_worker.local", description=__doc__)
    p.add_argument("--model", default=None, help="hub id or local dir (default: tiny model)")
    p.add_argument("--revision", default=None)
    p.add_argument("--tp", type=int, default=2, help="tensor_parallel_size (ranks per group)")
    p.add_argument("--groups", type=int, default=1, help="num_groups (independent TP groups)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=D.MAX_BATCH_SIZE)
    p.add_argument("--max-new-tokens", type=int, default=D.MAX_NEW_TOKENS)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--kernel-inject", action="store_true", help="GPU only")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return p.parse_args(argv)


def serve_forever(ns: argparse.Namespace) -> None:
    """Start Ray and the app that the parsed command line ``ns`` asks for, and block."""
    start_ray(ns.groups, ns.tp)
    args = {
        "model": ns.model,
        "revision": ns.revision,
        "dtype": ns.dtype,
        "tensor_parallel_size": ns.tp,
        "num_groups": ns.groups,
        "max_batch_size": ns.max_batch_size,
        "max_new_tokens": ns.max_new_tokens,
        "served_model_name": ns.served_model_name,
        "kernel_inject": ns.kernel_inject,
        "torch_threads": 1 if ns.model is None else None,
    }
    url = start_serve(args, port=ns.port, host=ns.host)
    model = ns.served_model_name or ns.model or "dsi-tiny-llama"
    print(f"\nDSI worker serving {model!r} (tp={ns.tp}, groups={ns.groups})", flush=True)
    print(f"  endpoint: {url}", flush=True)
    print(f"  health:   curl {url}/healthz", flush=True)
    print(
        f"  try:      curl {url}/v1/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}\'',
        flush=True,
    )
    print("  Ctrl-C to stop", flush=True)
    _wait_healthy(url)
    while True:
        time.sleep(1)


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_stop(*_: Any) -> None:
    raise _Stop


def shutdown(grace_s: float = SHUTDOWN_GRACE_S) -> list[int]:
    """Stop Serve and Ray within grace_s, then SIGKILL every process Ray started.

    A graceful ``serve.shutdown()`` after heavy load can wait for draining replicas far
    longer than anyone waiting on Ctrl-C would; the pids are collected first so that even
    processes orphaned by a dying raylet are found. Returns the pids that had to be killed.
    """
    import psutil

    me = psutil.Process()
    started = {p.pid: p for p in me.children(recursive=True)}

    def graceful() -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return  # serve.shutdown() would start a Ray only to stop it
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()

    t = threading.Thread(target=graceful, daemon=True, name="graceful-shutdown")
    t.start()
    t.join(grace_s)
    started.update({p.pid: p for p in me.children(recursive=True)})
    alive = [p for p in started.values() if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


def main(argv: list[str] | None = None) -> int:
    """Command line entry of ``make serve-local``: serve until SIGTERM or Ctrl-C, then stop
    within a bounded time, leaving no Ray process behind."""
    ns = parse_cli(argv)  # --help and bad arguments exit here, before any Ray starts
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        serve_forever(ns)
    except (_Stop, KeyboardInterrupt):
        print("stopping ...", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        killed = shutdown()
        if killed:
            print(f"stopped; {len(killed)} Ray process(es) did not exit in time and were killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
