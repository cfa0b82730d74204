"""The group's batcher (plain asyncio, no Ray): how batches form while one is running."""

from __future__ import annotations

import asyncio

import pytest
from dsi_worker.batcher import DONE, Batcher, Waiter


class _Recorder:
    """A ``run`` that records each batch's items and holds it until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def run(self, waiters: list[Waiter[int]]) -> None:
        self.batches.append([w.item for w in waiters])
        self.started.set()
        await self.release.wait()
        for w in waiters:
            w.put(w.item * 10)
            w.put(DONE)


async def _result(w: Waiter[int]) -> int:
    item = await w.out.get()
    if isinstance(item, BaseException):
        raise item
    assert isinstance(item, int)
    return item


def test_requests_arriving_during_a_batch_form_one_next_batch() -> None:
    """Serve's batch loop would cut these into one batch per wait window; the group's
    batcher holds them until the running batch ends and takes them together."""

    async def main() -> None:
        rec = _Recorder()
        b: Batcher[int] = Batcher(rec.run, max_batch_size=32, wait_s=0.0)
        first = b.submit(0)
        await rec.started.wait()
        later = []
        for i in range(1, 6):
            later.append(b.submit(i))
            await asyncio.sleep(0.01)  # well past wait_s between arrivals
        rec.release.set()
        assert [await _result(w) for w in [first, *later]] == [0, 10, 20, 30, 40, 50]
        assert rec.batches == [[0], [1, 2, 3, 4, 5]]

    asyncio.run(main())


def test_max_batch_size_and_abandoned_waiters() -> None:
    async def main() -> None:
        rec = _Recorder()
        rec.release.set()
        b: Batcher[int] = Batcher(rec.run, max_batch_size=2, wait_s=0.0)
        ws = [b.submit(i) for i in range(5)]
        ws[1].abandoned = True  # its caller was cancelled while it queued
        for w in ws[:1] + ws[2:]:
            await _result(w)
        assert rec.batches == [[0, 2], [3, 4]]
        assert b.pending() == 0

    asyncio.run(main())


def test_a_failed_batch_fails_its_callers_and_the_next_batch_runs() -> None:
    async def main() -> None:
        calls = 0

        async def run(waiters: list[Waiter[int]]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("rank died")
            for w in waiters:
                w.put(w.item)

        b: Batcher[int] = Batcher(run, max_batch_size=4, wait_s=0.0)
        with pytest.raises(RuntimeError, match="rank died"):
            await _result(b.submit(1))
        assert await _result(b.submit(2)) == 2

    asyncio.run(main())


def test_a_lone_request_waits_for_company_up_to_wait_s() -> None:
    async def main() -> None:
        rec = _Recorder()
        rec.release.set()
        b: Batcher[int] = Batcher(rec.run, max_batch_size=8, wait_s=0.2)
        a = b.submit(1)
        await asyncio.sleep(0)
        c = b.submit(2)  # arrives within the first request's wait
        assert [await _result(a), await _result(c)] == [10, 20]
        assert rec.batches == [[1, 2]]

    asyncio.run(main())


def test_a_request_sent_alone_does_not_wait_for_company() -> None:
    """The ingress marks a request ``alone`` when nothing else is under way: its batch starts
    at once, so one that arrives just after it goes into the next batch."""

    async def main() -> None:
        rec = _Recorder()
        rec.release.set()
        b: Batcher[int] = Batcher(rec.run, max_batch_size=8, wait_s=60.0)
        a = b.submit(1, alone=True)
        await asyncio.sleep(0)
        c = b.submit(2, alone=True)
        assert [await _result(a), await _result(c)] == [10, 20]
        assert rec.batches == [[1], [2]]

    asyncio.run(main())
