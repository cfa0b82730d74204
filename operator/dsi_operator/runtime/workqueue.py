"""A coalescing work queue: at most one pass per DSI in flight, kicks merged.

Written here rather than taken from kopf: kopf runs one handler per event, so a burst of
pod events would run one pass each; this queue turns a burst into one pass per resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

from dsi_operator.runtime import metrics

log = logging.getLogger("dsi_operator")

Key = tuple[str, str]  # (namespace, DSI name)


class Scheduler:
    """Coalescing work queue: at most one pass per key in flight, kicks merged."""

    def __init__(self, fn: Callable[[Key, str], Awaitable[object]], workers: int) -> None:
        self._fn = fn
        self._workers = workers
        self._pending: dict[Key, str] = {}
        self._urgent: set[Key] = set()
        self._running: set[Key] = set()
        # (0 urgent | 1 normal, arrival) -> key; a key may be queued twice (urgent after
        # normal): the second entry finds nothing pending and is skipped.
        self._queue: asyncio.PriorityQueue[tuple[int, int, Key]] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []

    def kick(self, key: Key, cause: str, urgent: bool = False) -> None:
        """Ask for a pass over ``key`` (no-op if one is already queued at that urgency).

        Urgent passes go before the others: a burst of new resources gets its children
        before the status passes that the first of them set off.
        """
        queued = key in self._pending
        if queued and (not urgent or key in self._urgent):
            return
        self._pending[key] = cause
        if urgent:
            self._urgent.add(key)
        if key not in self._running:
            self._put(key)

    def _put(self, key: Key) -> None:
        self._queue.put_nowait((0 if key in self._urgent else 1, next(self._seq), key))

    def start(self) -> None:
        """Start the worker tasks in the running loop."""
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self._workers)]

    async def stop(self) -> None:
        """Cancel the worker tasks."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _worker(self) -> None:
        while True:
            _, _, key = await self._queue.get()
            if key in self._running:
                continue  # re-queued when the running pass ends
            cause = self._pending.pop(key, None)
            if cause is None:
                continue
            self._urgent.discard(key)
            self._running.add(key)
            try:
                await self._fn(key, cause)
            except asyncio.CancelledError:
                raise
            except Exception:
                metrics.RECONCILES.labels(cause=cause, outcome="error").inc()
                log.exception("pass over %s/%s failed; retrying on the next tick", *key)
            finally:
                self._running.discard(key)
                if key in self._pending:
                    self._put(key)
