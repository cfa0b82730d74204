"""Ranks start in order: a rank waits (bounded, logged) until its master resolves and
listens, and the probe it uses does not disturb torch's TCPStore. Only ranks of one group
epoch form a group together."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as tdist
import torch.multiprocessing as mp
from dsi_worker.ports import free_port
from dsi_worker.rendezvous import (
    BACKOFF_CAP_S,
    CONNECT_TIMEOUT_S,
    wait_for_master,
)

pytestmark = pytest.mark.worker

MASTER = "dsi-g0-master.ns.svc.cluster.local"
PORT = 29500
NXDOMAIN = socket.gaierror(socket.EAI_NONAME, "Name or service not known")


class FakeNet:
    """A master whose name fails to resolve ``unresolved`` times, then resolves to
    10.0.0.7, which refuses ``refused`` connections and then accepts; a clock that moves
    only when the waiter sleeps."""

    def __init__(self, unresolved: int = 0, refused: int = 0) -> None:
        self.unresolved = unresolved
        self.refused = refused
        self.resolves: list[tuple[str, int]] = []
        self.connects: list[tuple[str, int, float]] = []
        self.sleeps: list[float] = []
        self.lines: list[str] = []
        self.now = 1000.0

    def resolve(self, host: str, port: int) -> list[str]:
        self.resolves.append((host, port))
        if len(self.resolves) <= self.unresolved:
            raise NXDOMAIN
        return ["10.0.0.7"]

    def connect(self, address: str, port: int, timeout_s: float) -> None:
        self.connects.append((address, port, timeout_s))
        if len(self.connects) <= self.refused:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now

    def wait(self, rank: int = 3, timeout_s: float = 900.0, addr: str = MASTER) -> float:
        return wait_for_master(
            addr,
            PORT,
            timeout_s=timeout_s,
            rank=rank,
            resolve=self.resolve,
            connect=self.connect,
            sleep=self.sleep,
            clock=self.clock,
            log=self.lines.append,
        )


def test_waits_for_the_name_then_the_port_and_says_so() -> None:
    # Tries at t = 0, .2, .6, 1.4, 3, 5, 7, 9 (no name), 11 ... 19 (refused), 21 (accepted).
    net = FakeNet(unresolved=8, refused=5)
    waited = net.wait()
    assert waited == pytest.approx(21.0)
    assert len(net.resolves) == 14
    assert len(net.connects) == 6
    assert net.sleeps[:5] == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0])
    assert max(net.sleeps) == BACKOFF_CAP_S
    assert all(c == ("10.0.0.7", PORT, CONNECT_TIMEOUT_S) for c in net.connects)
    # The first failed try is logged at once, then at most every 10 s, then the success.
    assert net.lines == [
        f"rank 3 waiting for master {MASTER}:{PORT}: name does not resolve yet "
        "(Name or service not known) (0 s of 900 s)",
        f"rank 3 waiting for master {MASTER}:{PORT}: connection refused (10.0.0.7) (11 s of 900 s)",
        f"rank 3: master {MASTER}:{PORT} reachable after 21 s",
    ]


def test_a_long_wait_logs_every_ten_seconds() -> None:
    net = FakeNet(unresolved=20)  # tries at 0, .2, .6, 1.4, 3, 5, 7, ..., 33; 35 resolves
    assert net.wait() == pytest.approx(35.0)
    waiting = [line for line in net.lines if "waiting for master" in line]
    assert [line.rsplit("(", 1)[1] for line in waiting] == [
        "0 s of 900 s)",
        "11 s of 900 s)",
        "21 s of 900 s)",
        "31 s of 900 s)",
    ]


def test_a_master_reachable_at_once_costs_one_try_and_no_log() -> None:
    net = FakeNet()
    assert net.wait() == 0.0
    assert (len(net.resolves), len(net.connects), net.sleeps, net.lines) == (1, 1, [], [])


def test_rank_0_does_not_wait() -> None:
    net = FakeNet(unresolved=1000)
    assert net.wait(rank=0) == 0.0
    assert (net.resolves, net.connects, net.sleeps, net.lines) == ([], [], [], [])


def test_timeout_names_address_port_last_failure_and_bound() -> None:
    net = FakeNet(unresolved=1000)
    with pytest.raises(TimeoutError) as e:
        net.wait(rank=1, timeout_s=5.0)
    assert str(e.value) == (
        f"rank 1: master {MASTER}:{PORT} not reachable within 5 s "
        "(last try: name does not resolve yet (Name or service not known))"
    )
    # Tries at 0, .2, .6, 1.4, 3 and a last one at the deadline: the sleep is cut to fit.
    assert len(net.resolves) == 6
    assert sum(net.sleeps) == pytest.approx(5.0)


def test_timeout_after_refusals_says_connection_refused() -> None:
    net = FakeNet(refused=1000)
    with pytest.raises(TimeoutError, match=r"within 3 s \(last try: connection refused"):
        net.wait(timeout_s=3.0)
    # A try never outlasts what is left of the bound.
    assert all(timeout <= CONNECT_TIMEOUT_S for _, _, timeout in net.connects)


def test_a_short_bound_shortens_each_connect() -> None:
    net = FakeNet()
    net.wait(timeout_s=0.5)
    assert net.connects == [("10.0.0.7", PORT, 0.5)]


def test_any_resolved_address_that_accepts_will_do() -> None:
    tried: list[str] = []

    def connect(address: str, port: int, timeout_s: float) -> None:
        tried.append(address)
        if address == "::1":
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    waited = wait_for_master(
        "localhost",
        PORT,
        timeout_s=10,
        rank=1,
        resolve=lambda host, port: ["::1", "127.0.0.1"],
        connect=connect,
        sleep=lambda s: None,
        clock=lambda: 0.0,
    )
    assert (waited, tried) == (0.0, ["::1", "127.0.0.1"])


def test_reasons_for_an_empty_answer_and_a_slow_connect() -> None:
    lines: list[str] = []
    answers: list[list[str]] = [[], ["10.0.0.9"], ["10.0.0.9"]]
    results: list[BaseException | None] = [TimeoutError("timed out"), None]
    now = [0.0]

    def connect(address: str, port: int, timeout_s: float) -> None:
        err = results.pop(0)
        if err is not None:
            raise err

    def sleep(s: float) -> None:
        now[0] += 10.0  # every try is far enough apart to be logged

    wait_for_master(
        MASTER,
        PORT,
        timeout_s=900,
        rank=2,
        resolve=lambda host, port: answers.pop(0),
        connect=connect,
        sleep=sleep,
        clock=lambda: now[0],
        log=lines.append,
    )
    assert lines == [
        f"rank 2 waiting for master {MASTER}:{PORT}: name resolves to no address yet "
        "(0 s of 900 s)",
        f"rank 2 waiting for master {MASTER}:{PORT}: connect timed out (10.0.0.9) (10 s of 900 s)",
        f"rank 2: master {MASTER}:{PORT} reachable after 20 s",
    ]


def test_the_default_log_goes_to_the_module_logger_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nobody listens on it
    caplog.set_level(logging.INFO, logger="dsi_worker.rendezvous")
    with pytest.raises(TimeoutError, match=rf"127\.0\.0\.1:{port} not reachable.*refused"):
        wait_for_master("127.0.0.1", port, timeout_s=0.3, rank=1)
    first = caplog.records[0]
    assert (first.name, first.levelno) == ("dsi_worker.rendezvous", logging.INFO)
    assert first.getMessage().startswith(
        f"rank 1 waiting for master 127.0.0.1:{port}: connection refused ("
    )


@pytest.mark.parametrize("use_libuv", [True, False])
def test_real_tcpstore_survives_the_probe(use_libuv: bool) -> None:
    """Rank 1 waits on loopback; the master's TCPStore starts listening only after rank 1
    said it waits; then a real store client still works after the probe's connect+close."""
    port = free_port()
    waiting = threading.Event()
    servers: list[Any] = []
    errors: list[BaseException] = []

    def master() -> None:
        waiting.wait(30)
        try:
            servers.append(
                tdist.TCPStore(
                    "127.0.0.1",
                    port,
                    2,
                    True,
                    timeout=timedelta(seconds=30),
                    wait_for_workers=False,
                    use_libuv=use_libuv,
                )
            )
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        waiting.set()

    t = threading.Thread(target=master, daemon=True)
    t.start()
    wait_for_master("127.0.0.1", port, timeout_s=60, rank=1, log=log)
    t.join(30)
    assert errors == []
    assert "connection refused" in lines[0]
    assert lines[-1].startswith(f"rank 1: master 127.0.0.1:{port} reachable after ")
    client = tdist.TCPStore(
        "127.0.0.1", port, 2, False, timeout=timedelta(seconds=30), use_libuv=use_libuv
    )
    client.set("from-rank-1", "hello")
    assert servers[0].get("from-rank-1") == b"hello"
    assert client.add("joined", 1) == 1


class _QueueLog(logging.Handler):
    def __init__(self, rank: int, q: Any) -> None:
        super().__init__()
        self.rank, self.q = rank, q

    def emit(self, record: logging.LogRecord) -> None:
        self.q.put(("log", self.rank, record.getMessage(), 0.0))


def _engine_rank(
    rank: int, port: int, q: Any, epoch: str = "", form_timeout_s: float = 120
) -> None:
    """One rank of a TP=2 group of epoch ``epoch`` through RankEngine.start(), as in a pod."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK="0",
        LOCAL_SIZE="2",  # same host: no need to import deepspeed to turn its shm op off
    )
    logger = logging.getLogger("dsi_worker.rendezvous")
    logger.addHandler(_QueueLog(rank, q))
    logger.setLevel(logging.INFO)
    try:
        import torch
        from dsi_worker import engine

        # The model does not matter here (and transformers takes seconds to import).
        engine.load_model = lambda *a, **k: torch.nn.Linear(2, 2)
        eng = engine.RankEngine(
            "no-model",
            dtype="float32",
            device="cpu",
            torch_threads=1,
            form_timeout_s=form_timeout_s,
            use_deepspeed=False,
            epoch=epoch,
        )
        eng.start()
        x = torch.tensor([float(rank + 1)])
        tdist.all_reduce(x)  # the group really formed
        q.put(("done", rank, {**eng.timings, "epoch": epoch}, float(x.item())))
        eng.close()
    except BaseException as e:  # report instead of hanging the parent
        q.put(("error", rank, repr(e), 0.0))


def test_rank_1_started_before_its_master_joins_once_rank_0_starts() -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    r1 = ctx.Process(target=_engine_rank, args=(1, port, q))
    r1.start()
    procs = [r1]
    try:
        kind, rank, msg, _ = q.get(timeout=120)
        assert (kind, rank) == ("log", 1), msg
        assert msg.startswith(f"rank 1 waiting for master 127.0.0.1:{port}: connection refused")
        # Only now does the master start.
        r0 = ctx.Process(target=_engine_rank, args=(0, port, q))
        r0.start()
        procs.append(r0)
        done: dict[int, tuple[dict[str, float], float]] = {}
        while len(done) < 2:
            kind, rank, payload, total = q.get(timeout=180)
            assert kind != "error", f"rank {rank}: {payload}"
            if kind == "done":
                done[rank] = (payload, total)
        assert done[0][1] == done[1][1] == 3.0
        assert done[0][0]["master_wait_s"] == 0.0
        assert done[1][0]["master_wait_s"] > 0.0
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]


def _next_result(q: Any, timeout: float) -> tuple[str, int, Any, float] | None:
    """The next done/error message (logs skipped), or None when none came in ``timeout``."""
    import queue
    import time

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            kind, rank, payload, total = q.get(timeout=left)
        except queue.Empty:
            return None
        if kind != "log":
            return kind, rank, payload, total
    return None


def test_a_rank_of_an_older_epoch_cannot_complete_the_new_epochs_group() -> None:
    """Issue 25: a rank of epoch "old" reaches the master of epoch "new" (same MASTER_ADDR
    and port, as after a re-form) before the new epoch's own rank 1. Keyed by address only,
    it completed the group with the new rank 0 (which then reported formed with a peer that
    was about to die). Scoped by epoch, rank 0 waits for its own rank 1."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    # The stale rank gives up on its own after 40 s (its epoch's rank 0 never comes).
    stale = ctx.Process(target=_engine_rank, args=(1, port, q, "old", 40))
    r0 = ctx.Process(target=_engine_rank, args=(0, port, q, "new"))
    procs = [stale, r0]
    try:
        r0.start()
        stale.start()
        # Long enough for the stale rank to find the store and (without epochs) form.
        early = _next_result(q, 25)
        assert early is None, f"formed with a rank of another epoch: {early}"
        r1 = ctx.Process(target=_engine_rank, args=(1, port, q, "new"))
        procs.append(r1)
        r1.start()
        done: dict[int, tuple[Any, float]] = {}
        while len(done) < 2:
            got = _next_result(q, 180)
            assert got is not None, f"the new epoch did not form: {done}"
            kind, rank, payload, total = got
            assert kind == "done", f"rank {rank} of the new epoch: {payload}"
            done[rank] = (payload, total)
        assert {r: d[0]["epoch"] for r, d in done.items()} == {0: "new", 1: "new"}
        assert done[0][1] == done[1][1] == 3.0
    finally:
        for p in procs:
            p.join(60 if p is stale else 30)
            if p.is_alive():
                p.kill()
    # The stale rank never formed: it failed (its rendezvous timed out), it did not finish.
    assert stale.exitcode == 0
    leftover = _next_result(q, 5)
    assert leftover is not None and leftover[:2] == ("error", 1), leftover
