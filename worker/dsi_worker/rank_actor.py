"""Ray actor around one RankEngine, pinned to its pod by a custom resource."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import ray

from dsi_worker.engine import DistEnv, GenRequest, GenResult, RankEngine, StepItem, TokenScore
from dsi_worker.readiness import mark_formed_from_env


def log_info_to_stderr() -> None:
    """Show this package's INFO lines (e.g. a rank waiting for its master) in the actor's
    log: a Ray actor's root logger has no handler and drops INFO. Leaves a process whose
    logging is already configured alone."""
    pkg = logging.getLogger("dsi_worker")
    if logging.getLogger().handlers or pkg.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False


def rank_resource(group: int, rank: int) -> str:
    """Custom resource the operator declares on the pod of rank ``rank`` of group ``group``."""
    return f"dsi_g{group}_r{rank}"


# Threaded actor: ping() must answer while generate() runs, so health checks see a busy
# rank as alive. Calls that run collectives (generate, generate_stream, score) carry a
# sequence number from the group and run strictly in that order: two threads racing for a
# lock could run a streamed and a plain batch in different orders on different ranks, and
# their all-reduces would then pair up wrongly.
@ray.remote(max_concurrency=8, max_restarts=0)  # type: ignore[call-overload]
class RankActor:
    """One rank: reads RANK/WORLD_SIZE/MASTER_* from its environment (the pod's)."""

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        log_info_to_stderr()
        self.env = DistEnv.from_env()
        self.engine = RankEngine(dist_env=self.env, **engine_kwargs)
        self._lock = threading.Lock()
        self._started = False
        self._turn = threading.Condition()
        self._next = 0

    def start(self) -> dict[str, Any]:
        """Join the process group and load the model (blocks until the group has formed)."""
        with self._lock:
            if not self._started:
                self.engine.start()
                self._started = True
                # From here the pod's readiness probe passes, until this process dies.
                mark_formed_from_env()
        return self.info()

    @contextlib.contextmanager
    def _in_turn(self, seq: int) -> Iterator[None]:
        """Run the body as collective call number ``seq`` (0, 1, 2, ... per group epoch)."""
        with self._turn:
            # Bounded like the group's collectives: a call that never arrives (cancelled
            # before it ran) fails this one instead of hanging the rank forever.
            if not self._turn.wait_for(lambda: self._next == seq, self.engine.form_timeout_s):
                raise RuntimeError(f"collective call {self._next} never arrived (waiting {seq})")
        try:
            with self._lock:
                yield
        finally:
            with self._turn:
                self._next = seq + 1
                self._turn.notify_all()

    def generate(self, seq: int, batch: list[GenRequest]) -> list[GenResult]:
        """Run the batch; every rank of the group gets the same call."""
        with self._in_turn(seq):
            return self.engine.generate(batch)

    def generate_stream(self, seq: int, batch: list[GenRequest]) -> Iterator[list[StepItem]]:
        """Streaming form (call with ``num_returns="streaming"``): one item per step."""
        with self._in_turn(seq):
            yield from self.engine.generate_stream(batch)

    def score(self, seq: int, seqs: list[tuple[int, ...]], top_k: int) -> list[list[TokenScore]]:
        """Log-probabilities of each sequence's tokens (see ``RankEngine.score``)."""
        with self._in_turn(seq):
            return self.engine.score(seqs, top_k)

    def progress(self) -> dict[str, Any]:
        """Where this rank is in forming its group (:mod:`dsi_worker.formation`); answers
        while ``start()`` runs."""
        return self.engine.progress.report()

    def ping(self) -> bool:
        """Liveness probe for the group's health check."""
        return True

    def info(self) -> dict[str, Any]:
        """Rank, device, timings, and the pod's group labels from the environment."""
        return {
            **self.engine.info(),
            "dsi_group": os.environ.get("DSI_GROUP"),
            "pod_index": os.environ.get("NODE_RANK"),
            "local_rank": self.env.local_rank,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def shard_report(self) -> dict[str, list[int]]:
        """Parameter shapes on this rank."""
        with self._lock:
            return self.engine.shard_report()
