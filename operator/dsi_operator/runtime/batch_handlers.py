"""kopf wiring of the batch kind: watch events in, :class:`~.batch_controller.BatchController`
passes out. Event handlers only, as for the serving kind, so kopf writes nothing of its own
onto the objects."""

from __future__ import annotations

from typing import Any

import kopf

from dsi_operator.api import labels as L
from dsi_operator.runtime.batch_controller import BatchController


def _batch(memo: Any) -> BatchController:
    ctrl = memo.batch
    assert isinstance(ctrl, BatchController)
    return ctrl


@kopf.on.event(L.GROUP, L.VERSION, L.BATCH_PLURAL)
async def _on_batch(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    meta = event["object"].get("metadata") or {}
    key = (meta.get("namespace", ""), meta.get("name", ""))
    ctrl = _batch(memo)
    if event["type"] == "DELETED":
        ctrl.forget(key)
        return
    await ctrl.reconcile(key)


@kopf.on.event(
    L.RAY_GROUP, L.RAY_VERSION_API, L.RAYJOB_PLURAL, labels={L.LABEL_BATCH: kopf.PRESENT}
)
async def _on_rayjob(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    meta = event["object"].get("metadata") or {}
    key = (meta.get("namespace", ""), (meta.get("labels") or {}).get(L.LABEL_BATCH, ""))
    await _batch(memo).reconcile(key)
