"""Dynamic batching that forms the next batch only once the group is free to run it.

Why not ``ray.serve.batch``: Serve's batch loop cuts a new batch every
``batch_wait_timeout_s`` whether or not the previous batch has finished, then queues it
behind a semaphore. While the ranks decode one batch, the requests arriving meanwhile are
frozen into many small batches (one per timeout window) that then run one after another:
measured with 32 concurrent clients and ``max_batch_size`` 32, the median batch was 2-4.
Here the loop awaits each batch before it takes the next one, so everything that queued
during a batch (up to ``max_batch_size``) goes into the next one at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Waiter(Generic[T]):
    """One queued request: its item, and the queue its results are delivered to (one
    result for a plain call, one per step then :data:`DONE` for a stream)."""

    item: T
    since: float = field(default_factory=time.monotonic)
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    #: The caller went away (cancelled, client disconnected): leave it out of batches.
    abandoned: bool = False
    #: No other request was on its way when this one was sent: waiting ``wait_s`` for
    #: company would only add latency, so its batch starts at once.
    alone: bool = False

    def put(self, value: Any) -> None:
        """Deliver a result, an exception or :data:`DONE` (dropped once abandoned)."""
        if not self.abandoned:
            self.out.put_nowait(value)


#: End of a stream's results.
DONE = object()


class Batcher(Generic[T]):
    """Collects :class:`Waiter` s and hands them to ``run`` in batches, one batch at a time.

    A batch starts when ``max_batch_size`` requests wait or the oldest has waited
    ``wait_s`` (at once if the oldest was sent ``alone``); requests that queued while the
    previous batch ran have waited already, so they go at once. ``run`` must deliver every
    waiter's results; an exception it raises is delivered to each waiter of its batch.
    """

    def __init__(
        self,
        run: Callable[[list[Waiter[T]]], Awaitable[None]],
        max_batch_size: int,
        wait_s: float,
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._pending: deque[Waiter[T]] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: T, *, alone: bool = False) -> Waiter[T]:
        """Queue ``item``; read its results from the returned waiter's ``out`` queue.

        ``alone``: the sender knows no other request is coming now, so the batch it heads
        starts without the ``wait_s`` wait (it still waits for a running batch to end)."""
        w: Waiter[T] = Waiter(item, alone=alone)
        self._pending.append(w)
        self._arrived.set()
        # Started here, not in __init__: it needs the replica's running event loop.
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return w

    def close(self, error: BaseException) -> None:
        """Stop batching: the running batch is cancelled (its callers get an error from the
        loop), every queued request gets ``error``, and a later :meth:`submit` starts over."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        while self._pending:
            self._pending.popleft().put(error)

    def pending(self) -> int:
        """Requests queued for a batch (not yet running)."""
        return len(self._pending)

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self.run(batch)
            except Exception as e:  # every caller of the batch gets the error
                for w in batch:
                    w.put(e)
            except asyncio.CancelledError:
                for w in batch:
                    w.put(RuntimeError("batch cancelled"))
                raise

    async def _next_batch(self) -> list[Waiter[T]]:
        """Wait for a batch: full, its oldest request ``wait_s`` old, or headed by a request
        sent ``alone``."""
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            head = self._pending[0]
            deadline = head.since + (0.0 if head.alone else self.wait_s)
            while len(self._pending) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch: list[Waiter[T]] = []
            while self._pending and len(batch) < self.max_batch_size:
                w = self._pending.popleft()
                if not w.abandoned:
                    batch.append(w)
            if batch:
                return batch
