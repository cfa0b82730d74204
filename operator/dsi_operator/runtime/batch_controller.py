"""The DeepSpeedBatchInference controller: thin I/O around the pure render and status cores.

A pass (:meth:`BatchController.reconcile`) reads the resource, applies its children when the
spec generation was not applied yet (or the RayJob vanished mid-run), reads the RayJob and
the progress ConfigMap, and writes the status and Events :mod:`.batch_status` computes.
Passes of one resource never overlap (a lock per resource). Passes run on the resource's and
its RayJob's watch events, and every :data:`PROGRESS_POLL_SECONDS` while a run is not
finished: the driver reports progress into a ConfigMap, and polling that one object by name
needs only ``get`` on it, where a watch would need list/watch on every ConfigMap.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from dsi_operator.api import labels as L
from dsi_operator.api.batch_spec import BatchPhase, parse_batch_spec
from dsi_operator.batch.render import render_batch_children
from dsi_operator.batch.status import (
    BatchInputs,
    compute_batch_status,
    status_changed,
)
from dsi_operator.runtime.kube import Kube
from dsi_operator.util.errors import describe_validation_error
from dsi_operator.util.patch import merge_patch

log = logging.getLogger("dsi_operator.batch")

Key = tuple[str, str]

#: Seconds between passes of an unfinished run (progress is read then).
PROGRESS_POLL_SECONDS = 5.0
#: Seconds before a pass that failed on the API is tried again.
RETRY_SECONDS = 10.0
_DONE = {BatchPhase.Succeeded.value, BatchPhase.Failed.value}


@dataclass
class BatchController:
    """State shared by the batch handlers (kept in kopf's operator memo)."""

    kube: Kube | None = None
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    pollers: dict[Key, asyncio.Task[None]] = field(default_factory=dict)

    def forget(self, key: Key) -> None:
        """The resource is gone: stop polling it."""
        task = self.pollers.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.locks.pop(key, None)

    async def reconcile(self, key: Key) -> str | None:
        """One pass; returns the phase written (None: resource gone or pass failed)."""
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            try:
                phase = await self._pass(key)
            except ApiException as e:
                log.warning("batch %s/%s: API error %s: %s", *key, e.status, e.reason)
                self._watch(key, RETRY_SECONDS)
                return None
        if phase is None:
            self.forget(key)
        elif phase not in _DONE:
            self._watch(key, PROGRESS_POLL_SECONDS)
        return phase

    def _watch(self, key: Key, every: float) -> None:
        task = self.pollers.get(key)
        if task is None or task.done():
            self.pollers[key] = asyncio.create_task(self._poll(key, every))

    async def _poll(self, key: Key, every: float) -> None:
        await asyncio.sleep(every)
        # This task is done once reconcile returns, so reconcile may start the next one.
        self.pollers.pop(key, None)
        await self.reconcile(key)

    async def _pass(self, key: Key) -> str | None:
        assert self.kube is not None
        ns, name = key
        body = await self.kube.get_batch(ns, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        meta, old = body["metadata"], dict(body.get("status") or {})
        try:
            spec = parse_batch_spec(body.get("spec") or {})
        except ValidationError as e:
            msg = describe_validation_error(e, prefix="spec.", limit=5)
            await self._write(key, old, {**old, "phase": BatchPhase.Failed.value, "message": msg})
            return BatchPhase.Failed.value
        rayjob = await self.kube.get_rayjob(ns, L.rayjob_name(name))
        applied = old.get("observedGeneration") == meta.get("generation")
        if not applied or (rayjob is None and old.get("phase") not in _DONE):
            for child in render_batch_children(name, ns, meta["uid"], spec):
                await self.kube.apply(child)
            log.info("batch %s/%s: children applied", ns, name)
            rayjob = await self.kube.get_rayjob(ns, L.rayjob_name(name))
        progress = await self.kube.get_configmap_data(ns, L.batch_progress_name(name))
        inp = BatchInputs(body, rayjob, progress, datetime.now(UTC))
        new = compute_batch_status(inp)
        await self._write(key, old, new)
        for ev in inp.events:
            await self.kube.post_event(body, ev.type, ev.reason, ev.message)
        return str(new["phase"])

    async def _write(self, key: Key, old: dict[str, Any], new: dict[str, Any]) -> None:
        assert self.kube is not None
        if status_changed(old, new):
            await self.kube.patch_batch_status(*key, merge_patch(old, new) or {})
