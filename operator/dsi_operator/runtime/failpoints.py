"""Named crash points for tests: ``DSI_OPERATOR_FAILPOINTS=name[,name]`` makes the process
exit at once (as a SIGKILL or OOM kill would) when it reaches one of them.

Random SIGKILLs in the chaos soak land between two writes only by luck; a failpoint makes
the worst moments deterministic. Unset (the default), :func:`hit` does nothing.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("dsi_operator")

#: After the status patch that records a restart, before its Event and pod deletions.
AFTER_RESTART_RECORDED = "after-restart-recorded"

_ARMED = frozenset(p for p in os.environ.get("DSI_OPERATOR_FAILPOINTS", "").split(",") if p)


def hit(name: str) -> None:
    """Exit the process with status 137 if the failpoint ``name`` is armed."""
    if name in _ARMED:
        log.error("failpoint %s: exiting", name)
        logging.shutdown()
        os._exit(137)
