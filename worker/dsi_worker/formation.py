"""A group's formation, step by step, and the pure rule that calls a forming group wedged.

Every rank walks the same steps: wait for its master (ranks > 0), the rendezvous, loading its
weights, the tensor-parallel init (``deepspeed.init_inference``), formed. Each rank records
when it entered each step (:class:`Progress`, kept by the rank engine and read by the group
replica through the rank actor's ``progress()``).

Two steps are collective: every rank leaves the rendezvous and the TP init together, within
a moment of each other. So a rank still inside one of them ``stall_s`` after a peer of its
epoch finished it is blocked in a collective that will never complete (issue 25: rank 1
blocked in ``InferenceEngine.__init__``'s broadcast after its rank 0 had formed). Loading is
not collective: a slow disk or a large shard is not a wedge, and the formation deadline stays
the last resort for it. A rank process that answered before and then stops answering for
``stall_s`` (frozen, SIGSTOP) is hung whatever its step.

The bound counts from the moment a peer finished the step, not from the start, so a model
that takes ten minutes to load on every rank is never cut short.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: The steps, in order.
MASTER, RENDEZVOUS, LOADING, TP_INIT, FORMED = (
    "master",
    "rendezvous",
    "loading",
    "tp-init",
    "formed",
)
STEPS = (MASTER, RENDEZVOUS, LOADING, TP_INIT, FORMED)
#: Steps every rank leaves together.
COLLECTIVE = (RENDEZVOUS, TP_INIT)


@dataclass
class Progress:
    """One rank's walk through formation: when it entered each step (wall-clock seconds)."""

    entered: dict[str, float] = field(default_factory=dict)

    def enter(self, step: str, now: float | None = None) -> None:
        """Record that the rank entered ``step`` (first entry wins)."""
        if step not in STEPS:
            raise ValueError(f"unknown formation step {step!r}; one of {', '.join(STEPS)}")
        self.entered.setdefault(step, time.time() if now is None else now)

    @property
    def step(self) -> str:
        """The latest step entered (``master`` before any)."""
        return max(self.entered, key=STEPS.index, default=MASTER)

    def report(self) -> dict[str, Any]:
        """What ``progress()`` returns: the step, entry times, the bytes this process has read
        (``/proc/self/io`` rchar: loading shows it moving) and its pid (for ``py-spy dump``)."""
        return {
            "step": self.step,
            "entered": dict(self.entered),
            "bytes_read": bytes_read(),
            "pid": os.getpid(),
        }


def bytes_read() -> int:
    """Bytes this process has read so far (Linux ``rchar``; 0 where unknown)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class RankView:
    """What the group replica knows of one rank: its last report (None: never answered) and
    when it last answered (wall-clock seconds)."""

    report: dict[str, Any] | None = None
    answered_at: float | None = None


def find_wedge(ranks: Sequence[RankView], now: float, stall_s: float) -> str | None:
    """Why this forming epoch is wedged, or None (see the module docstring)."""
    for r, view in enumerate(ranks):
        if view.answered_at is not None and now - view.answered_at >= stall_s:
            return (
                f"rank {r} stopped answering for {now - view.answered_at:.0f}s "
                f"(last in step {_step(view)})"
            )
    for r, view in enumerate(ranks):
        step = _step(view)
        if step not in COLLECTIVE:
            continue
        after = STEPS[STEPS.index(step) + 1 :]
        for q, peer in enumerate(ranks):
            left = _left_at(peer, after)
            if q != r and left is not None and now - left >= stall_s:
                return (
                    f"rank {r} blocked in {step} for {now - left:.0f}s after rank {q} finished it"
                )
    return None


def late_ranks(
    done: Sequence[bool], first_done_at: float | None, now: float, stall_s: float
) -> list[int]:
    """The ranks still inside one collective call ``stall_s`` after the first rank finished
    it (``first_done_at``); empty while within the bound or before any rank finished."""
    if first_done_at is None or now - first_done_at < stall_s:
        return []
    return [r for r, d in enumerate(done) if not d]


def _step(view: RankView) -> str:
    return str((view.report or {}).get("step") or MASTER)


def _left_at(view: RankView, later_steps: Sequence[str]) -> float | None:
    """When the rank entered the first of ``later_steps`` it reached (it left the step
    before them then); None when it reached none."""
    entered = (view.report or {}).get("entered") or {}
    times = [float(entered[s]) for s in later_steps if s in entered]
    return min(times) if times else None
