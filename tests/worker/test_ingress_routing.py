"""The ingress's choice of a group, against stand-in group handles (no Ray cluster).

The ingress polls each group's status once a second, so its view lags. These tests pin
what it does when that view is stale at the moment a group goes away, which is what a
rollout does: the replaced group formed a moment ago, the last old one is leaving.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from dsi_worker import protocol as P
from dsi_worker.app import Ingress
from dsi_worker.config import parse_args
from dsi_worker.metrics import Metrics
from dsi_worker.results import Generated, GroupUnavailable

pytestmark = pytest.mark.worker


@dataclass
class _Method:
    answer: Any

    def remote(self, *_: Any) -> Any:
        async def call() -> Any:
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

        return call()


@dataclass
class _Group:
    """A stand-in for a group's DeploymentHandle: what status and generate answer."""

    index: int
    state: str
    reply: Any = None
    calls: list[str] = field(default_factory=list)

    @property
    def status(self) -> _Method:
        self.calls.append("status")
        return _Method({"group": self.index, "state": self.state, "epoch": "e1"})

    @property
    def generate(self) -> _Method:
        self.calls.append("generate")
        reply = self.reply or Generated([1, 2], "length", 1, self.index, "e1")
        return _Method(reply)


class _Routing:
    """The ingress's routing methods on a plain object: an instance of the Serve-wrapped
    class made without its constructor leaves a coroutine un-awaited when collected."""


for _name in (
    "_on_a_group",
    "_ensure_polling",
    "_refresh",
    "_status_of",
    "_ready_groups",
    "_states_text",
):
    setattr(_Routing, _name, getattr(Ingress.func_or_class, _name))


def _ingress(groups: list[_Group], cached: dict[int, str]) -> Any:
    """An Ingress with ``groups`` behind it and a polled view of ``cached`` states, built
    without its tokenizer (the routing does not use it)."""
    ing = _Routing()
    ing.args = parse_args({"model": "m", "request_timeout_s": 5})
    ing.groups = groups
    ing.active_groups = len(groups)
    ing.metrics = Metrics()
    ing.states = {g: {"group": g, "state": s} for g, s in cached.items()}
    ing.epochs, ing.status_seen = {}, {}
    ing.inflight = {g.index: 0 for g in groups}
    ing.counter = 0
    ing._status_lock = asyncio.Lock()
    # A poller that is running already, so the request does not start one.
    ing._poller = asyncio.get_running_loop().create_future()
    return ing


def _generate(ing: Any) -> Any:
    return ing._on_a_group(lambda h: h.generate.remote(None, False), False)


def test_a_group_that_formed_since_the_last_poll_takes_the_request() -> None:
    async def scenario() -> tuple[int, Any]:
        # Polled a moment ago: group 0 re-forming, group 1 ready. Since then group 0 formed
        # and group 1's ranks went away.
        g0 = _Group(0, "ready")
        g1 = _Group(1, "ready", reply=GroupUnavailable("forming", "ranks gone"))
        ing = _ingress([g0, g1], {0: "forming", 1: "ready"})
        g, _, reply, _ = await _generate(ing)
        return g, reply

    g, reply = asyncio.run(scenario())
    assert g == 0
    assert reply.group == 0


def test_no_group_ready_after_a_fresh_look_is_503() -> None:
    async def scenario() -> tuple[P.ApiError, list[_Group]]:
        gs = [_Group(0, "forming"), _Group(1, "ready", reply=RuntimeError("replica died"))]
        ing = _ingress(gs, {0: "forming", 1: "ready"})
        with pytest.raises(P.ApiError) as err:
            await _generate(ing)
        return err.value, gs

    err, gs = asyncio.run(scenario())
    assert err.status == 503
    assert "group-0: forming" in err.message
    # One fresh look at every group, and no second try of the group that failed.
    assert gs[0].calls == ["status"]
    assert gs[1].calls == ["generate", "status"]
