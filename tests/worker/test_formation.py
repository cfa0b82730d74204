"""Wedged groups are caught within the wedge bound (issue 25 item 2): the pure rule on
formation progress, the lockstep bound on collective calls, and a frozen rank of a forming
group on a real Ray + Serve."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dsi_localcluster.wait import wait_for
from dsi_worker.formation import (
    FORMED,
    LOADING,
    MASTER,
    RENDEZVOUS,
    TP_INIT,
    Progress,
    RankView,
    find_wedge,
)
from dsi_worker.group import Wedged, lockstep
from dsi_worker.ports import free_port

pytestmark = pytest.mark.worker

STALL = 45.0


def view(step_times: dict[str, float], answered_at: float | None = None) -> RankView:
    """A rank that entered each step at the time given and answered ``answered_at`` (None:
    it answers every poll, so only the step rule applies)."""
    p = Progress()
    for step, t in step_times.items():
        p.enter(step, t)
    return RankView(p.report(), answered_at if answered_at is not None else float("inf"))


def test_progress_records_each_step_once_and_reports_the_latest() -> None:
    p = Progress()
    assert p.step == MASTER
    p.enter(RENDEZVOUS, 1.0)
    p.enter(LOADING, 2.0)
    p.enter(RENDEZVOUS, 5.0)  # entered once: the first time counts
    r = p.report()
    assert (r["step"], r["entered"], r["pid"]) == (
        LOADING,
        {RENDEZVOUS: 1.0, LOADING: 2.0},
        os.getpid(),
    )
    assert r["bytes_read"] > 0
    with pytest.raises(ValueError, match="unknown formation step 'warmup'"):
        p.enter("warmup")


def test_the_issue_25_wedge_rank_1_in_tp_init_after_rank_0_formed() -> None:
    rank0 = view({RENDEZVOUS: 10, LOADING: 11, TP_INIT: 12, FORMED: 20})
    rank1 = view({RENDEZVOUS: 10, LOADING: 11, TP_INIT: 13})
    assert find_wedge([rank0, rank1], now=20 + STALL - 1, stall_s=STALL) is None
    assert find_wedge([rank0, rank1], now=20 + STALL, stall_s=STALL) == (
        "rank 1 blocked in tp-init for 45s after rank 0 finished it"
    )


def test_rendezvous_left_by_a_peer_and_not_by_this_rank() -> None:
    rank0 = view({RENDEZVOUS: 10, LOADING: 12})
    rank1 = view({RENDEZVOUS: 11})
    assert find_wedge([rank0, rank1], now=12 + STALL, stall_s=STALL) == (
        "rank 1 blocked in rendezvous for 45s after rank 0 finished it"
    )


def test_loading_is_never_a_wedge_however_long_a_peer_waits() -> None:
    """A slow disk or a big shard: rank 1 loads for an hour while rank 0 waits in TP init."""
    rank0 = view({RENDEZVOUS: 10, LOADING: 11, TP_INIT: 20})
    rank1 = view({RENDEZVOUS: 10, LOADING: 11})
    assert find_wedge([rank0, rank1], now=3600, stall_s=STALL) is None


def test_all_ranks_in_the_same_collective_step_is_not_a_wedge() -> None:
    """Rank 0 waits in the rendezvous for a rank 1 still waiting for its master (a pod not
    scheduled yet): the formation deadline bounds that, not the wedge rule."""
    rank0 = view({RENDEZVOUS: 10})
    rank1 = view({})
    assert find_wedge([rank0, rank1], now=3600, stall_s=STALL) is None


def test_a_rank_that_stopped_answering_is_hung_and_one_that_never_answered_is_not() -> None:
    fresh = view({RENDEZVOUS: 10}, answered_at=100)
    frozen = view({RENDEZVOUS: 10}, answered_at=100 - STALL)
    pending = RankView()  # its actor waits for its pod: nothing to judge yet
    assert find_wedge([fresh, pending], now=100, stall_s=STALL) is None
    assert find_wedge([fresh, frozen, pending], now=100, stall_s=STALL) == (
        "rank 1 stopped answering for 45s (last in step rendezvous)"
    )


async def _after(delay: float, value: Any) -> Any:
    await asyncio.sleep(delay)
    if isinstance(value, BaseException):
        raise value
    return value


def test_lockstep_returns_every_ranks_result_in_rank_order() -> None:
    out = asyncio.run(lockstep([_after(0.05, "r0"), _after(0.0, "r1")], 1.0, "generate"))
    assert out == ["r0", "r1"]


def test_lockstep_bounds_the_ranks_still_inside_after_one_finished() -> None:
    t0 = time.monotonic()
    with pytest.raises(Wedged, match=r"rank\(s\) \[1, 2\] still in generate 0s after rank 0"):
        asyncio.run(lockstep([_after(0.0, 0), _after(60, 1), _after(60, 2)], 0.2, "generate"))
    assert time.monotonic() - t0 < 5


def test_lockstep_raises_a_ranks_error_at_once() -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank died"):
        asyncio.run(lockstep([_after(60, 0), _after(0.05, RuntimeError("rank died"))], 30, "x"))
    assert time.monotonic() - t0 < 5


# -- a frozen rank of a forming group, on a real Ray + Serve ------------------------------

WEDGE_S = 6.0


@pytest.fixture
def forming_group(tiny_model_dir: Path) -> Iterator[Any]:
    """A TP 2 group whose rank 0 has no pod (no Ray node carries its pinning resource), so
    it stays forming with rank 1 waiting for its master; yields group 0's Serve handle."""
    import logging

    import ray
    from dsi_worker.local import start_serve
    from ray import serve

    ray.init(
        num_cpus=4,
        resources={"dsi_g0_r1": 1},
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        start_serve(
            {
                "model": str(tiny_model_dir),
                "dtype": "float32",
                "tensor_parallel_size": 2,
                "torch_threads": 1,
                "wedge_timeout_s": WEDGE_S,
            },
            port=free_port(),
        )
        yield serve.get_deployment_handle("group-0", app_name="dsi")
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_frozen_forming_rank_fails_its_epoch_within_the_wedge_bound(forming_group: Any) -> None:
    def rank1_pid() -> int | None:
        st = forming_group.status.remote().result()
        reports = st.get("progress") or []
        return (reports[1] or {}).get("pid") if len(reports) > 1 else None

    pid = wait_for(rank1_pid, 300, "rank 1 to report its progress", interval=0.5)
    first = forming_group.status.remote().result()
    assert first["state"] == "forming" and first["progress"][1]["step"] == MASTER
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:

        def failed_or_replaced() -> dict[str, Any] | None:
            st = forming_group.status.remote().result()
            return st if st["state"] == "failed" or st["epoch"] != first["epoch"] else None

        st = wait_for(failed_or_replaced, 120, "the frozen rank's epoch to fail", interval=0.2)
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"frozen forming rank caught in {took:.1f}s (wedge bound {WEDGE_S:.0f}s): {st['error']}")
    # The bound, one health-check period (2 s) and the progress call's own timeout (5 s).
    assert took < WEDGE_S + 2 + 5 + 5, took
    if st["state"] == "failed":
        assert st["error"].startswith("wedged while forming: rank 1 stopped answering")


def test_late_ranks_only_past_the_bound_after_the_first_finished() -> None:
    from dsi_worker.formation import late_ranks

    assert late_ranks([True, False, False], None, now=100, stall_s=STALL) == []
    assert late_ranks([True, False, False], 100, now=100 + STALL - 1, stall_s=STALL) == []
    assert late_ranks([True, False, True], 100, now=100 + STALL, stall_s=STALL) == [1]
