"""A coalescing work queue: at most one pass per DSI in flight, kicks merged.

Written here rather than taken from kopf: kopf runs one handler per event, so a burst of
pod events would run one pass each; this queue turns a burst into one pass per resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from . import metrics

log = logging.getLogger("dsi_operator")

Key = tuple[str, str]  # (namespace, DSI name)


class Scheduler:
    """Coalescing work queue: at most one pass per key in flight, kicks merged."""

    def __init__(self, fn: Callable[[Key, str], Awaitable[None]], workers: int) -> None:
        self._fn = fn
        self._workers = workers
        self._pending: dict[Key, str] = {}
        self._running: set[Key] = set()
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def kick(self, key: Key, cause: str) -> None:
        """Ask for a pass over ``key`` (no-op if one is already queued)."""
        if key in self._pending:
            return
        self._pending[key] = cause
        if key not in self._running:
            self._queue.put_nowait(key)

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
            key = await self._queue.get()
            if key in self._running:
                continue  # re-queued when the running pass ends
            cause = self._pending.pop(key, None)
            if cause is None:
                continue
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
                    self._queue.put_nowait(key)
