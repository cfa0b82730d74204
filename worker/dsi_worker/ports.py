"""Free TCP ports on this host: a torch.distributed master port per group when every rank
runs on one host (``local_mode``), and the ports tests and benchmarks serve on."""

from __future__ import annotations

import random
import socket

# Below Linux's ephemeral range (32768-60999) and above the local cluster's ports: a port
# from the ephemeral range (what binding port 0 returns) can be taken by any outgoing
# connection between this check and the owner's own bind, which failed CI once.
PORT_RANGE = (29000, 32000)
_TORCH_DEFAULT = 29500  # torch's default MASTER_PORT
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that is free now and was not handed out before in this process."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(*PORT_RANGE)
        if port in _handed_out or port == _TORCH_DEFAULT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {PORT_RANGE}")
