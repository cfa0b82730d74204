"""What a group deployment answers the ingress: generated tokens, or "not available".

These cross Ray Serve handles (pickled), so they are plain frozen dataclasses with no Ray or
torch imports (``dsi_worker.engine`` imports torch only inside its functions).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsi_worker.engine import TokenScore


@dataclass(frozen=True)
class Generated:
    """Tokens for one request: the whole answer, or one streamed step of it."""

    token_ids: list[int]
    finish_reason: str | None
    batch_size: int
    group: int
    epoch: str
    engine_s: float = 0.0


@dataclass(frozen=True)
class GroupUnavailable:
    """The group cannot serve right now (forming, failed, or its replica is unreachable); the
    ingress tries another group."""

    state: str
    detail: str | None = None

    def describe(self) -> str:
        """One line for an error message."""
        return self.detail or self.state


@dataclass(frozen=True)
class Scored:
    """Per sequence, per token: (token id, log-probability or None, top alternatives)."""

    sequences: list[list[TokenScore]]


#: A group's answer to one generate call (or one streamed item).
GroupReply = Generated | GroupUnavailable
#: A group's answer to a score call.
ScoreReply = Scored | GroupUnavailable
