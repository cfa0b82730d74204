"""`make serve-local` stops promptly on SIGTERM, under load, leaving no Ray process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from dsi_localcluster.wait import wait_for
from dsi_worker.ports import free_port

pytestmark = pytest.mark.worker


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, f"serve-local exited:\n{log.read_text()[-3000:]}"
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200

    wait_for(healthy, timeout, "serve-local healthy", dump=lambda: log.read_text()[-3000:])


def _load(url: str) -> None:
    body = {"model": "dsi-tiny-llama", "prompt": "Hello", "max_tokens": 8}
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=120), range(100)
            )
        )  # noqa: E501
    # A 10 MB request: rejected for its length, but it has to be read first.
    big = {"model": "dsi-tiny-llama", "prompt": "x" * (10 * 2**20), "max_tokens": 1}
    assert httpx.post(f"{url}/v1/completions", json=big, timeout=120).status_code in (400, 413)


def test_sigterm_after_load_stops_everything_within_seconds(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve-local.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsi_worker.local", "--port", str(port), "--groups", "2"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # as `make` runs it: signalled as a process group
        )
    try:
        _wait_healthy(url, proc, log, timeout=600)
        _load(url)
        started = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(started) > 5, "Ray's processes (GCS, raylet, workers) are descendants"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in started):
            time.sleep(0.2)
        left = [p for p in started if psutil.pid_exists(p)]
        took = time.monotonic() - t0
        assert not left, (
            f"still running {took:.0f}s after SIGTERM: {left}\n{log.read_text()[-2000:]}"
        )  # noqa: E501
        print(f"\nserve-local stopped in {took:.1f}s after a burst of 100 requests and 10 MB")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_help_prints_usage_and_starts_no_ray() -> None:
    """``--help`` used to start a local Ray (and kill it) after printing the usage."""
    out = subprocess.run(
        [sys.executable, "-m", "dsi_worker.local", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "usage: python -m dsi_worker.local" in out.stdout
    # Ray's log lines (timestamped), or local mode's own report of the Ray it stopped.
    text = out.stdout + out.stderr
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:", text, re.M), text
    assert "stopped" not in text and "stopping" not in text, text
