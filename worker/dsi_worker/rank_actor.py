"""Ray actor around one RankEngine, pinned to its pod by a custom resource."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import ray

from dsi_worker.engine import DistEnv, GenRequest, GenResult, RankEngine, StepItem


def rank_resource(group: int, rank: int) -> str:
    """Custom resource the operator declares on the pod of rank ``rank`` of group ``group``."""
    return f"dsi_g{group}_r{rank}"


# Threaded actor: ping() must answer while generate() runs, so health checks see a busy
# rank as alive; a lock keeps generate() calls in order.
@ray.remote(max_concurrency=4, max_restarts=0)  # type: ignore[call-overload]
class RankActor:
    """One rank: reads RANK/WORLD_SIZE/MASTER_* from its environment (the pod's)."""

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        self.env = DistEnv.from_env()
        self.engine = RankEngine(dist_env=self.env, **engine_kwargs)
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> dict[str, Any]:
        """Join the process group and load the model (blocks until the group has formed)."""
        with self._lock:
            if not self._started:
                self.engine.start()
                self._started = True
        return self.info()

    def generate(self, batch: list[GenRequest]) -> list[GenResult]:
        """Run the batch; every rank of the group gets the same call."""
        with self._lock:
            return self.engine.generate(batch)

    def generate_stream(self, batch: list[GenRequest]) -> Iterator[list[StepItem]]:
        """Streaming form (call with ``num_returns="streaming"``): one item per step."""
        with self._lock:
            yield from self.engine.generate_stream(batch)

    def ping(self) -> bool:
        """Liveness probe for the group's health check."""
        return True

    def info(self) -> dict[str, Any]:
        """Rank, device, timings, and the pod's group labels from the environment."""
        return {
            **self.engine.info(),
            "dsi_group": os.environ.get("DSI_GROUP"),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def shard_report(self) -> dict[str, list[int]]:
        """Parameter shapes on this rank."""
        with self._lock:
            return self.engine.shard_report()
