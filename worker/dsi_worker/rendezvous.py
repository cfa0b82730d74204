"""Wait for a group's master before joining the process group ("ranks start in order").

A rank's MASTER_ADDR is the headless Service ``<dsi>-g<g>-master.<ns>.svc.cluster.local``
that selects its group's rank-0 pod. The name resolves only once that pod has an IP, and
rank 0 listens on MASTER_PORT only once it calls ``init_process_group`` (its TCPStore
server). A rank that starts earlier must wait for both, with a bound and a log line saying
what it waits for, instead of failing inside torch (LWS #135/#746, ray #59778: workers
that start before the master's name resolves crash-loop).

The probe is a bare TCP connect and close; torch's TCPStore server (libuv and legacy)
drops such a client and keeps serving the ranks that join after it.

The rendezvous is scoped to one group *epoch* (:func:`join_process_group`). MASTER_ADDR and
MASTER_PORT stay the same across a group's re-forms, so a rank of an epoch being torn down
(its pod not yet gone, its actor not yet killed) can reach the next epoch's store. Keyed
only by address, it would complete the new group in place of the new epoch's own rank and
then die, leaving the real rank blocked in the group's first collective (issue 25: a group
wedged for 10 minutes after two faults 27 s apart). Every key of the rendezvous carries the
epoch, so a rank of another epoch waits on keys nobody of this epoch writes.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

_log = logging.getLogger(__name__)

#: First pause between tries; it doubles up to :data:`BACKOFF_CAP_S`.
BACKOFF_START_S = 0.2
BACKOFF_CAP_S = 2.0
#: Longest a single connect may take (a name that resolves to an address no pod holds).
CONNECT_TIMEOUT_S = 2.0
#: A waiting rank logs at most once per this many seconds (and on its first failed try).
LOG_EVERY_S = 10.0

Resolver = Callable[[str, int], Sequence[str]]
Connector = Callable[[str, int, float], None]


def resolve_addresses(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to for TCP, in the resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def connect_and_close(address: str, port: int, timeout_s: float) -> None:
    """Open a TCP connection to ``address:port`` and close it at once (raises OSError)."""
    with socket.create_connection((address, port), timeout=timeout_s):
        pass


def describe_failure(exc: OSError) -> str:
    """A short reason for the log line: why the master was not reachable on this try."""
    if isinstance(exc, socket.gaierror):
        return f"name does not resolve yet ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to host ({exc.strerror})"
    return exc.strerror or str(exc) or type(exc).__name__


def probe_master(
    addr: str, port: int, *, resolve: Resolver, connect: Connector, connect_timeout_s: float
) -> str | None:
    """One try: None when ``addr`` resolves and one of its addresses accepts a TCP
    connection on ``port``, else why not."""
    try:
        addresses = resolve(addr, port)
    except OSError as e:
        return describe_failure(e)
    if not addresses:
        return "name resolves to no address yet"
    reasons = []
    for address in addresses:
        try:
            connect(address, port, connect_timeout_s)
            return None
        except OSError as e:
            why = describe_failure(e)
            reasons.append(why if address == addr else f"{why} ({address})")
    return "; ".join(reasons)


def wait_for_master(
    addr: str,
    port: int,
    *,
    timeout_s: float,
    rank: int,
    resolve: Resolver = resolve_addresses,
    connect: Connector = connect_and_close,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = _log.info,
) -> float:
    """Block until the master at ``addr:port`` resolves and accepts TCP connections.

    Rank 0 is the master (it will listen) and returns 0.0 at once. Other ranks try, back
    off (0.2 s doubling to 2 s), and log at most every 10 s what they wait for and why the
    last try failed. Returns the seconds waited; raises ``TimeoutError`` naming the address,
    the last failure and the timeout when the master is not reachable within ``timeout_s``.
    """
    if rank == 0:
        return 0.0
    start = clock()
    delay = BACKOFF_START_S
    last_log: float | None = None
    while True:
        now = clock()
        left = timeout_s - (now - start)
        per_try = max(min(CONNECT_TIMEOUT_S, left), 0.05)
        why = probe_master(addr, port, resolve=resolve, connect=connect, connect_timeout_s=per_try)
        now = clock()
        waited = now - start
        if why is None:
            if last_log is not None:
                log(f"rank {rank}: master {addr}:{port} reachable after {waited:.0f} s")
            return waited
        if waited >= timeout_s:
            raise TimeoutError(
                f"rank {rank}: master {addr}:{port} not reachable within {timeout_s:.0f} s "
                f"(last try: {why})"
            )
        if last_log is None or now - last_log >= LOG_EVERY_S:
            log(
                f"rank {rank} waiting for master {addr}:{port}: {why} "
                f"({waited:.0f} s of {timeout_s:.0f} s)"
            )
            last_log = now
        sleep(min(delay, timeout_s - waited))
        delay = min(delay * 2, BACKOFF_CAP_S)


def epoch_prefix(epoch: str) -> str:
    """The key prefix of one group epoch's rendezvous in the master's TCPStore."""
    return f"dsi/epoch/{epoch or 'none'}/"


def join_process_group(
    *,
    backend: str,
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    epoch: str,
    timeout_s: float,
) -> None:
    """``torch.distributed.init_process_group`` over rank 0's TCPStore, with every key of the
    rendezvous under :func:`epoch_prefix` (see the module docstring).

    The store is built here rather than by ``init_method="tcp://..."`` because torch's own
    TCP rendezvous also counts the clients that connect (``wait_for_workers``) under a key
    no prefix reaches: a rank of another epoch would count towards this one.
    """
    import torch.distributed as tdist

    timeout = timedelta(seconds=timeout_s)
    store: Any = tdist.TCPStore(  # type: ignore[attr-defined]
        master_addr,
        master_port,
        world_size,
        rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    tdist.init_process_group(
        backend=backend,
        store=tdist.PrefixStore(epoch_prefix(epoch), store),  # type: ignore[attr-defined]
        rank=rank,
        world_size=world_size,
        # This timeout also bounds every later collective of the group (NCCL/gloo).
        timeout=timeout,
    )
