"""The state directory of a local cluster: where its files live, and the pid files that
record which processes it started (used by the control plane and the process nodes alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """Files under the state directory."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd-data"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def kwok_config(self) -> Path:
        return self.root / "kwok-config.yaml"

    @property
    def info(self) -> Path:
        return self.root / "cluster.json"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pidfile(self, name: str) -> Path:
        return self.pids / f"{name}.pid"


def write_pidfile(path: Path, pid: int, exe: Path) -> None:
    """Record pid and the executable it runs, so a recycled pid is never mistaken for ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n{exe}\n")


def read_pidfile(path: Path) -> tuple[int, str] | None:
    """(pid, executable) or None when missing or unreadable."""
    try:
        lines = path.read_text().split("\n")
        return int(lines[0]), lines[1]
    except (OSError, ValueError, IndexError):
        return None


def pid_runs(pid: int, exe: str) -> bool:
    """True when pid is alive (not a zombie) and runs exe."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv0 = fh.read().split(b"\0")[0].decode(errors="replace")
    except (OSError, IndexError):
        return False
    return argv0 == exe
