"""The rank's readiness marker (dsi_worker.readiness) against the probe the operator renders.

Runs the rendered probe command for real: a pod is Ready exactly while a live process holds
the lock, and a ``kill -9`` of that process makes it unready at once (no stale marker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dsi_operator.serving import render


def _probe_passes(lock: Path) -> bool:
    cmd = render.formed_probe()["exec"]["command"]
    script = cmd[-1].replace(render.READY_FILE, str(lock))
    return subprocess.run([*cmd[:-1], script], capture_output=True).returncode == 0


def _holder(lock: Path) -> subprocess.Popen[bytes]:
    code = (
        "import time; from dsi_worker.readiness import hold_ready_lock; "
        f"hold_ready_lock({str(lock)!r}).join(); print('held', flush=True); time.sleep(600)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"held"
    return p


def test_probe_follows_the_lock_holder(tmp_path: Path) -> None:
    lock = tmp_path / "shm" / "formed.lock"
    assert not _probe_passes(lock), "no rank formed yet: not ready"
    p = _holder(lock)
    try:
        assert _probe_passes(lock)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert lock.exists(), "the file stays; only the lock goes"
    assert not _probe_passes(lock), "killed rank: not ready"


def test_next_epoch_takes_the_lock_after_the_old_rank_dies(tmp_path: Path) -> None:
    lock = tmp_path / "formed.lock"
    old = _holder(lock)
    code = (
        "from dsi_worker.readiness import hold_ready_lock; "
        f"t = hold_ready_lock({str(lock)!r}); t.join(30); print(t.is_alive(), flush=True)"
    )
    new = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    time.sleep(1)
    assert new.poll() is None, "the new rank waits while the old one holds the lock"
    os.kill(old.pid, signal.SIGKILL)
    old.wait()
    out, _ = new.communicate(timeout=60)
    assert out.strip() == b"False", "the new rank took the lock once the old one died"


def test_no_lock_without_the_pod_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsi_worker import readiness

    monkeypatch.delenv(readiness.READY_FILE_ENV, raising=False)
    assert readiness.mark_formed_from_env() is None
