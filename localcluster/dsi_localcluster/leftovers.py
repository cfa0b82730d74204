"""What pods of process-backed nodes leave on this host once they are gone: processes in
their network namespaces, the namespaces, Ray session directories. A torn-down stack must
leave none of them (the chaos benchmark and the e2e tests check it)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from dsi_localcluster.kubelet.netns import netns_name


def netns_pids(netns: str) -> list[int]:
    """Processes living in a network namespace."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def cmdline(pid: int) -> str:
    """A process's command line ('' once gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def leftovers(state_dir: Path, uids: set[str]) -> dict[str, list[str]]:
    """What the pods with these UIDs left: processes in their network namespaces, those
    namespaces, and Ray sessions in their pod directories (``state_dir``: the cluster's)."""
    names = {netns_name(u) for u in uids}
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    netns = sorted(n.split()[0] for n in listed.splitlines() if n and n.split()[0] in names)
    procs = [f"{p} {cmdline(p)[:60]}" for n in netns for p in netns_pids(n)]
    nodes = state_dir / "process-nodes" / "nodes"
    sessions = [str(s) for u in uids for s in nodes.glob(f"*/pods/{u}/tmp/ray/session_2*")]
    return {"processes": procs, "netns": netns, "ray_sessions": sessions}


def wait_gone(state_dir: Path, uids: set[str], timeout: float = 180) -> dict[str, list[str]]:
    """:func:`leftovers` once there are none, or what is still there after ``timeout``
    seconds (pods of a deleted namespace take a while to stop)."""
    deadline = time.monotonic() + timeout
    found = leftovers(state_dir, uids)
    while any(found.values()) and time.monotonic() < deadline:
        time.sleep(3)
        found = leftovers(state_dir, uids)
    return found
