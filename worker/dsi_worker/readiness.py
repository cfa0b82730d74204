"""A rank's "formed" marker for its pod's readiness probe: an exclusive lock on a file.

The operator sets ``DSI_READY_FILE`` in every rank pod and renders a readiness probe that is
true only while some process holds an exclusive ``flock`` on that file. The rank actor takes
the lock once its group has formed and its shard is loaded, and holds it for its lifetime;
the kernel drops it when the process dies, however it dies. So a pod is Ready exactly while
its rank can serve, and the operator's READY count follows Ray Serve re-forming a group, not
just the pods running. A pid file would not do: pids are reused, and a stale file outlives a
``kill -9``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

READY_FILE_ENV = "DSI_READY_FILE"

# Open lock files, kept referenced so the descriptors (and with them the locks) live as long
# as the process.
_held: list[IO[bytes]] = []


def hold_ready_lock(path: str | os.PathLike[str]) -> threading.Thread:
    """Take an exclusive lock on ``path`` in a daemon thread and keep it until this process
    exits. Blocking, not failing: the actor of the group's previous epoch in the same pod may
    still hold it for a moment while Ray tears it down."""

    def take() -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        f = p.open("ab")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        _held.append(f)
        log.info("rank formed: holding %s", p)

    t = threading.Thread(target=take, name="dsi-ready-lock", daemon=True)
    t.start()
    return t


def ready_file(env: Mapping[str, str]) -> str | None:
    """This rank's lock file: ``$DSI_READY_FILE``, or ``$DSI_READY_FILE.<LOCAL_RANK>`` in a pod
    of several ranks (``LOCAL_WORLD_SIZE`` > 1), whose probe checks one file per rank (the
    operator's ``render.ready_files``). ``None`` when the pod asked for none."""
    path = env.get(READY_FILE_ENV)
    if not path:
        return None
    if int(env.get("LOCAL_WORLD_SIZE", "1")) > 1:
        return f"{path}.{env.get('LOCAL_RANK', '0')}"
    return path


def mark_formed_from_env() -> threading.Thread | None:
    """Take the ready lock when the pod asked for one (``DSI_READY_FILE``); local mode has
    no pods and sets none."""
    path = ready_file(os.environ)
    return hold_ready_lock(path) if path else None
