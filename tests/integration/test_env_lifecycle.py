"""`up` failure paths with real processes: a taken port, a component that dies on start.

These start a second, short-lived control plane in a temporary directory on free ports, so
they never touch the shared cluster.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from dsi_localcluster import build, cluster, config, statedir
from dsi_worker.ports import free_port

pytestmark = pytest.mark.integration


def _free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def _config(tmp_path: Path, cache_dir: Path) -> config.ClusterConfig:
    ports = dict(zip(config.DEFAULT_PORTS, _free_ports(len(config.DEFAULT_PORTS)), strict=True))
    return config.ClusterConfig(
        gpu_nodes=1, cpu_nodes=0, state_dir=tmp_path / "state", cache_dir=cache_dir, ports=ports
    )


def _real_cache() -> Path:
    cache = config.default_cache_dir()
    missing = [n for n in build.CLUSTER_COMPONENTS if not build.COMPONENTS[n].is_built(cache)]
    assert not missing, f"run `python -m dsi_localcluster build` first (missing {missing})"
    return cache


def test_taken_port_is_named_and_nothing_starts(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _real_cache())
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", cfg.ports["kube-scheduler"]))
        blocker.listen()
        with pytest.raises(cluster.PortInUseError) as err:
            cluster.up(cfg)
    assert f"port {cfg.ports['kube-scheduler']}" in str(err.value)
    assert "kube-scheduler" in str(err.value)
    assert cluster.running_processes(statedir.Paths(cfg.state_dir)) == {}


def test_half_started_cluster_is_cleaned_up(tmp_path: Path) -> None:
    real = _real_cache()
    # A cache whose kwok dies at once: etcd, kube-apiserver, kube-controller-manager and
    # kube-scheduler are up by the time it is started.
    fake = tmp_path / "cache"
    for name in build.CLUSTER_COMPONENTS:
        comp = build.COMPONENTS[name]
        comp.dir(fake).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(comp.dir(real), comp.dir(fake))
    kwok_dir = build.KWOK.dir(fake)
    kwok_dir.unlink()
    kwok_dir.mkdir()
    os.symlink(build.KWOK.dir(real) / "stages", kwok_dir / "stages")
    # The build key marks the fake as built with today's flags, so `up` runs it as it is.
    os.symlink(build.KWOK.dir(real) / build.BUILD_KEY_FILE, kwok_dir / build.BUILD_KEY_FILE)
    broken = kwok_dir / "kwok"
    broken.write_text("#!/bin/sh\necho 'kwok: simulated crash on start' >&2\nexit 3\n")
    broken.chmod(0o755)

    cfg = _config(tmp_path, fake)
    with pytest.raises(cluster.ClusterError) as err:
        cluster.up(cfg)
    text = str(err.value)
    assert "kwok exited with code 3" in text
    assert "simulated crash on start" in text, "the error carries the component's log"
    assert not cfg.state_dir.exists(), "state removed"
    logs = cfg.state_dir.parent / (cfg.state_dir.name + "-logs")
    assert (logs / "kube-apiserver.log").is_file(), "logs kept for the post-mortem"
    # Every process that was started is gone (pids recorded in the kept logs' run).
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        assert str(cfg.state_dir).encode() not in cmdline, cmdline
