"""Container processes of a process-backed pod.

A container is its command run as its own process group inside the pod's network
namespace (``ip netns exec``, which also bind-mounts the pod's hosts and resolv.conf) and
a private mount and UTS namespace (``unshare``): hostname = pod name, a private /tmp (two
Ray nodes on one host must not share /tmp/ray), the pod's volumes at their mount paths, and
an /etc/profile that keeps PATH (a login shell would otherwise drop the virtualenv that
stands in for the container image). Everything else is the host's filesystem.

Process groups, not pid namespaces: a pid-namespace init ignores SIGTERM unless it handles
it. Every started pid is recorded under the pod directory, so a crashed node agent's
processes can still be found and killed by pid.

Needs root, iproute2 and util-linux (unshare, nsenter, mount).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import repo_root
from .podspec import MountSpec

PROFILE = "# dsi-localcluster process pod: PATH comes from the container's environment\n"


@dataclass
class Container:
    """A running (or exited) container process."""

    name: str
    proc: subprocess.Popen[bytes]
    started_at: float
    log_path: Path

    @property
    def pid(self) -> int:
        """The container's main process (leader of its process group)."""
        return self.proc.pid

    def exit_code(self) -> int | None:
        """None while running; else the exit status, 128+N for a death by signal N."""
        rc = self.proc.poll()
        if rc is None:
            return None
        return 128 - rc if rc < 0 else rc


# Where the pod's own directory appears inside its mount namespace. Sources are read
# through it because /tmp is replaced early: a state dir under /tmp (a clone in /tmp, as in
# CI) would otherwise vanish before the other mounts are made.
POD_ALIAS = "/run/dsi-pod"


def _in_pod(path: Path, pod_dir: Path) -> str:
    try:
        return f"{POD_ALIAS}/{path.relative_to(pod_dir)}"
    except ValueError:
        return str(path)  # a hostPath: seen as on the host (one under /tmp is hidden)


def image_paths() -> list[str]:
    """What stands in for the container image: the virtualenv and the checkout it was
    installed from (editable). They must stay visible when the pod gets its own /tmp."""
    return sorted({sys.prefix, str(repo_root())})


def _setup_script(hostname: str, pod_dir: Path, mounts: list[MountSpec], cwd: str | None) -> str:
    q = shlex.quote
    lines = ["set -e", f"hostname {q(hostname)}"]
    lines.append(f"mkdir -p {POD_ALIAS} && mount --bind {q(str(pod_dir))} {POD_ALIAS}")
    # The image lives under /tmp when the checkout does (CI clones into /tmp): keep it by
    # binding it aside, replacing /tmp, and binding it back at the same path.
    keep = [p for p in image_paths() if p == "/tmp" or p.startswith("/tmp/")]
    for i, path in enumerate(keep):
        lines.append(f"mkdir -p /run/dsi-keep/{i} && mount --bind {q(path)} /run/dsi-keep/{i}")
    lines.append(f"mount --bind {POD_ALIAS}/tmp /tmp")
    for i, path in enumerate(keep):
        lines.append(f"mkdir -p {q(path)} && mount --bind /run/dsi-keep/{i} {q(path)}")
    lines.append(f"mount --bind {POD_ALIAS}/profile /etc/profile")
    for m in mounts:
        lines.append(f"mkdir -p {q(m.target)}")
        if m.tmpfs_bytes is not None:
            lines.append(f"mount -t tmpfs -o size={m.tmpfs_bytes} tmpfs {q(m.target)}")
        else:
            lines.append(f"mount --bind {q(_in_pod(m.source, pod_dir))} {q(m.target)}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {q(m.target)}")
    if cwd:
        lines.append(f"mkdir -p {q(cwd)} && cd {q(cwd)}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def _prepare(pod_dir: Path, mounts: list[MountSpec]) -> None:
    (pod_dir / "tmp").mkdir(parents=True, exist_ok=True)
    (pod_dir / "home").mkdir(parents=True, exist_ok=True)
    os.chmod(pod_dir / "tmp", 0o1777)
    (pod_dir / "profile").write_text(PROFILE)
    for m in mounts:
        m.source.mkdir(parents=True, exist_ok=True)
        for rel, content in m.files:
            f = m.source / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(content)


def start(
    netns: str,
    hostname: str,
    pod_dir: Path,
    name: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    mounts: list[MountSpec],
    log_path: Path,
) -> Container:
    """Start one container; its output (stdout and stderr) is appended to log_path."""
    _prepare(pod_dir, mounts)
    script = _setup_script(hostname, pod_dir, mounts, cwd)
    cmd = ["ip", "netns", "exec", netns, "unshare", "--mount", "--uts"]
    cmd += ["--propagation", "private", "--", "/bin/sh", "-c", script, "dsi-pod", *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
        )
    with open(pod_dir / "pids", "a") as fh:
        fh.write(f"{proc.pid}\n")
    return Container(name, proc, time.time(), log_path)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop(c: Container, grace_s: float) -> int | None:
    """SIGTERM the container's process group, wait up to grace_s, then SIGKILL the group."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if c.exit_code() is not None and not _group_alive(c.pid):
            break
        try:
            os.killpg(c.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if c.exit_code() is not None and not _group_alive(c.pid):
                break
            time.sleep(0.1)
    return c.exit_code()


def nsenter_argv(pid: int, argv: list[str], cwd: str | None = None) -> list[str]:
    """argv run in the network, mount and UTS namespaces of process ``pid`` (a container's
    main process), in directory ``cwd`` of that mount namespace when given.

    The cd happens inside: ``nsenter --wd=DIR`` opens DIR before entering the namespace, so
    a working directory on one of the pod's volumes would be the host's path instead."""
    cmd = ["nsenter", "--target", str(pid), "--net", "--mount", "--uts", "--"]
    if cwd:
        return [*cmd, "/bin/sh", "-c", 'cd -- "$0" && exec "$@"', cwd, *argv]
    return [*cmd, *argv]


def exec_in(
    c: Container, argv: list[str], env: dict[str, str], timeout_s: float
) -> tuple[int, str]:
    """Run argv inside the container's namespaces (exec probes); (exit code, output)."""
    cmd = nsenter_argv(c.pid, argv)
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout_s, cwd="/")
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return out.returncode, (out.stdout + out.stderr).decode(errors="replace")[-500:]


def pgids_to_kill(recorded: Iterable[int], member_pgids: Iterable[int]) -> list[int]:
    """The recorded process groups that still have a member in the pod's namespace.

    A recorded group whose processes all exited may have its number reused by anyone on the
    host (pid_max is often 32768, and Ray spawns many processes): killing it by number alone
    killed other pods' processes. Only groups seen inside the pod's network namespace are
    the pod's.
    """
    members = set(member_pgids)
    return sorted({pgid for pgid in recorded if pgid in members})


def netns_pgids(netns: str) -> list[int]:
    """Process groups of the processes living in network namespace ``netns``."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    pgids = []
    for pid in out.stdout.split():
        try:
            pgids.append(os.getpgid(int(pid)))
        except (ProcessLookupError, ValueError):
            continue
    return pgids


def kill_recorded(pod_dir: Path, netns: str) -> list[int]:
    """SIGKILL every process group started for this pod that still lives in its namespace."""
    pids = pod_dir / "pids"
    if not pids.exists():
        return []
    recorded = [int(line) for line in pids.read_text().split()]
    killed: list[int] = []
    for pgid in pgids_to_kill(recorded, netns_pgids(netns)):
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed.append(pgid)
        except ProcessLookupError:
            pass
    return killed


#: A directory to copy each torn-down pod's logs into (its containers' logs and the Ray
#: session logs under its /tmp), for post-mortems of pods that are gone, e.g. a chaos run's.
KEEP_LOGS_ENV = "DSI_KEEP_POD_LOGS"


def keep_logs(pod_dir: Path, dest: Path) -> None:
    """Copy a pod's container logs and its Ray sessions' logs to ``dest`` (best effort:
    a post-mortem aid must never fail a teardown)."""
    import shutil

    sessions = sorted((pod_dir / "tmp" / "ray").glob("session_2*/logs"))
    pairs = [(pod_dir / "logs", dest / "containers")]
    pairs += [(s, dest / s.parent.name) for s in sessions]
    for src, target in pairs:
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True, ignore_dangling_symlinks=True)


def unmount_all(pod_dir: Path) -> None:
    """Nothing is mounted on the host (mounts live in the pods' namespaces); remove files."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(pod_dir)], check=False)
