"""A pool of tensor-parallel groups that runs batches, replacing a failed group whole.

Each group is ``tensor_parallel_size`` :class:`~dsi_worker.rank_actor.RankActor` actors,
created with the serving path's own options (:func:`~dsi_worker.group.rank_actor_options`:
pinned by ``rank_resource(group, rank)``, local mode's pod env) and formed by
``RankActor.start`` (the same rendezvous: rank 0's TCPStore, ``wait_for_master``). Every
rank of a group gets the same batch with the same sequence number, as a serving group's
ranks do; rank 0's results are the batch's.

When any rank fails (its actor died, a call raised, or the group did not form in
``form_timeout_s``) the pool kills every rank of that group, waits until they are gone,
puts the group's unfinished batches back at the front of the queue, and forms the group
again as a new epoch (new actor names; in local mode a fresh master port too). Each such
replacement spends one unit of the run's restart budget; once it is spent a failed group is
retired instead, and the run fails only when no group is left. A batch's results are taken
from exactly one group epoch, the first that finishes it, so a retried batch is never
counted twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from dsi_worker.config import AppArgs
from dsi_worker.engine import GenRequest, GenResult
from dsi_worker.formation import RankView, find_wedge, late_ranks
from dsi_worker.group import _short, engine_kwargs, pinning_errors, rank_actor_options
from dsi_worker.rank_actor import RankActor

log = logging.getLogger(__name__)

#: How long a replaced group's ranks may take to die before its new epoch starts anyway.
KILL_WAIT_S = 30.0
#: Batches a group holds at once: the next one waits on the ranks while the driver
#: collects the last, so the ranks never idle on the driver's round trip.
INFLIGHT_PER_GROUP = 2


class PoolFailed(RuntimeError):
    """Every group failed and the restart budget is spent."""


@dataclass
class Work:
    """One batch: consecutive rows of one shard (``index``-th batch of shard ``shard``)."""

    shard: int
    index: int
    requests: list[GenRequest]


@dataclass(frozen=True)
class Replacement:
    """A failed group epoch: what failed and what took its place (None: retired)."""

    group: int
    old_epoch: str
    new_epoch: str | None
    why: str


@dataclass
class _Running:
    work: Work
    refs: list[Any]
    #: When the first rank finished this call (the others then have wedge_timeout_s).
    first_done_at: float | None = None


@dataclass
class _Slot:
    """Group ``index``: its current epoch's rank actors and what they run."""

    index: int
    state: str = "forming"  # forming | ready | retired
    epoch: str = ""
    epochs: int = 0
    actors: list[Any] = field(default_factory=list)
    start_refs: list[Any] = field(default_factory=list)
    created: float = 0.0
    seq: int = 0
    running: list[_Running] = field(default_factory=list)
    #: While forming: each rank's last progress report and its progress() call in flight.
    views: list[RankView] = field(default_factory=list)
    progress_refs: list[Any] = field(default_factory=list)


def _kill(actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception as e:  # already gone
            log.debug("kill of a rank actor: %s", _short(e))


def _wait_dead(actors: list[Any], timeout_s: float) -> list[Any]:
    """Wait until every actor is gone (a ping fails); returns those still answering.

    The new epoch's rank 0 listens on the pod's MASTER_PORT: the old rank 0 must have let
    go of it, and the new ranks must not find the old TCPStore.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(actors)
    while pending and time.monotonic() < deadline:
        refs = [a.ping.remote() for a in pending]
        ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        still = []
        for a, ref in zip(pending, refs, strict=True):
            try:
                ray.get(ref, timeout=0)
                still.append(a)  # answered: not dead yet
            except GetTimeoutError:
                still.append(a)
            except (RayActorError, RayTaskError):
                pass
        pending = still
        if pending:
            time.sleep(0.2)
    return pending


def _fresh_port() -> int:
    from dsi_worker.ports import free_port

    return free_port()


class GroupPool:
    """``args.num_groups`` TP groups of ``args.tensor_parallel_size`` rank actors.

    Drive it with :meth:`step` until the work is done, then :meth:`shutdown`. ``name``
    prefixes the rank actors' names: ``<name>-g<g>-r<r>-<epoch>``.
    """

    def __init__(
        self,
        args: AppArgs,
        model_path: str,
        *,
        max_restarts: int,
        inflight: int = INFLIGHT_PER_GROUP,
        name: str = "dsi-batch",
    ) -> None:
        self.args = args
        self.model_path = model_path
        self.max_restarts = max_restarts
        self.inflight = inflight
        self.name = name
        self.slots = [_Slot(g) for g in range(args.num_groups)]
        self.replacements: list[Replacement] = []
        #: When the first group formed (monotonic clock), or None.
        self.first_ready: float | None = None

    @property
    def restarts(self) -> int:
        """Group replacements so far (retirements not counted)."""
        return sum(1 for r in self.replacements if r.new_epoch is not None)

    def alive(self) -> int:
        """Groups formed and taking batches."""
        return sum(1 for s in self.slots if s.state == "ready")

    def usable(self) -> int:
        """Groups formed or forming (not retired)."""
        return sum(1 for s in self.slots if s.state != "retired")

    def running(self) -> int:
        """Batches on groups now."""
        return sum(len(s.running) for s in self.slots)

    def start(self) -> None:
        """Start forming every group."""
        for s in self.slots:
            self._launch(s)

    def shutdown(self) -> None:
        """Kill every rank actor (batches still running are abandoned)."""
        for s in self.slots:
            _kill(s.actors)
            s.actors, s.start_refs, s.running = [], [], []

    def names(self, group: int) -> list[str]:
        """Actor names of ``group``'s current epoch (tests kill one by name)."""
        tp = self.args.tensor_parallel_size
        return [f"{self.name}-g{group}-r{r}-{self.slots[group].epoch}" for r in range(tp)]

    def _launch(self, s: _Slot) -> None:
        """Create a new epoch of group ``s``: its rank actors, forming in the background."""
        args = self.args
        if args.local_mode and s.epochs > 0:
            # A fresh master port: the dead epoch's port may linger in TIME_WAIT.
            ports = list(args.local_master_ports or [])
            ports += [0] * (len(self.slots) - len(ports))
            ports[s.index] = _fresh_port()
            args = args.model_copy(update={"local_master_ports": ports})
        s.epoch, s.epochs = uuid.uuid4().hex[:8], s.epochs + 1
        s.state, s.created, s.seq, s.running = "forming", time.monotonic(), 0, []
        kwargs = engine_kwargs(args, self.model_path, s.epoch)
        s.actors = [
            RankActor.options(**rank_actor_options(args, s.index, r, name)).remote(kwargs)  # type: ignore[attr-defined]
            for r, name in enumerate(self.names(s.index))
        ]
        s.start_refs = [a.start.remote() for a in s.actors]
        s.views = [RankView() for _ in s.actors]
        s.progress_refs = [None] * len(s.actors)
        log.info("group %d: forming epoch %s", s.index, s.epoch)

    def _fail(self, s: _Slot, why: str, queue: deque[Work]) -> None:
        """Group ``s`` failed: requeue its batches, kill its ranks, replace or retire it."""
        for r in reversed(s.running):
            queue.appendleft(r.work)
        requeued, old = len(s.running), s.epoch
        s.running, s.start_refs = [], []
        _kill(s.actors)
        if lingering := _wait_dead(s.actors, KILL_WAIT_S):
            log.warning("group %d: %d rank(s) still alive after kill", s.index, len(lingering))
        s.actors = []
        if self.restarts < self.max_restarts:
            self._launch(s)
            log.warning(
                "group %d (epoch %s) failed: %s; replaced by epoch %s (replacement %d of %d), "
                "%d batch(es) requeued",
                *(s.index, old, why, s.epoch, self.restarts + 1, self.max_restarts, requeued),
            )
            self.replacements.append(Replacement(s.index, old, s.epoch, why))
            return
        s.state = "retired"
        self.replacements.append(Replacement(s.index, old, None, why))
        log.error(
            "group %d (epoch %s) failed: %s; not replaced: restart budget exhausted "
            "(%d replacements); %d group(s) left, %d batch(es) requeued",
            *(s.index, old, why, self.max_restarts, self.usable(), requeued),
        )

    def step(self, queue: deque[Work], timeout_s: float) -> list[tuple[Work, list[GenResult]]]:
        """Give queued batches to groups with room, wait up to ``timeout_s`` for anything to
        finish, and return the batches that finished with rank 0's results (in each
        group's order). Batches of a group that failed go back to the front of ``queue``.
        Raises :class:`PoolFailed` when no group is left."""
        self._dispatch(queue)
        ready = self._wait(timeout_s)
        done: list[tuple[Work, list[GenResult]]] = []
        for s in self.slots:
            if s.state == "forming":
                self._poll_forming(s, ready, queue)
            elif s.state == "ready":
                done += self._poll_running(s, ready, queue)
        if self.usable() == 0:
            last = self.replacements[-1].why if self.replacements else "no group"
            raise PoolFailed(
                f"every group failed and the restart budget ({self.max_restarts} group "
                f"replacements) is exhausted; last failure: {last}"
            )
        return done

    def _dispatch(self, queue: deque[Work]) -> None:
        for s in self.slots:
            while s.state == "ready" and queue and len(s.running) < self.inflight:
                work = queue.popleft()
                # Same call, same sequence number on every rank (RankActor._in_turn).
                seq, s.seq = s.seq, s.seq + 1
                refs = [a.generate.remote(seq, work.requests) for a in s.actors]
                s.running.append(_Running(work, refs))

    def _wait(self, timeout_s: float) -> set[Any]:
        """The refs (start or generate) that are ready after waiting for at least one."""
        refs = [r for s in self.slots for r in s.start_refs]
        refs += [r for s in self.slots for run in s.running for r in run.refs]
        if not refs:
            time.sleep(min(timeout_s, 0.1))
            return set()
        ray.wait(refs, num_returns=1, timeout=timeout_s)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return set(ready)

    def _poll_forming(self, s: _Slot, ready: set[Any], queue: deque[Work]) -> None:
        done = [r for r in s.start_refs if r in ready]
        try:
            infos = ray.get(done)  # raises for a rank that failed to form or died
        except (RayActorError, RayTaskError) as e:
            self._fail(s, f"forming failed: {_short(e)}", queue)
            return
        if len(done) < len(s.start_refs):
            if time.monotonic() - s.created > self.args.form_timeout_s:
                self._fail(s, f"did not form within {self.args.form_timeout_s:.0f}s", queue)
            elif (why := self._wedged_forming(s)) is not None:
                self._fail(s, f"wedged while forming: {why}", queue)
            return
        if wrong := pinning_errors(s.index, infos, self.args.ranks_per_pod):
            self._fail(s, "rank actors on the wrong pods: " + "; ".join(wrong), queue)
            return
        s.state, s.start_refs = "ready", []
        self.first_ready = self.first_ready or time.monotonic()
        log.info("group %d formed (epoch %s)", s.index, s.epoch)

    def _wedged_forming(self, s: _Slot) -> str | None:
        """Collect the progress reports that arrived, ask again, and judge the epoch
        (:func:`dsi_worker.formation.find_wedge`)."""
        now = time.time()
        for r, ref in enumerate(s.progress_refs):
            if ref is not None:
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    s.views[r] = RankView(ray.get(ref), now)
                except (RayActorError, RayTaskError):
                    pass  # its start ref shows why
            s.progress_refs[r] = s.actors[r].progress.remote()
        return find_wedge(s.views, now, self.args.wedge_timeout_s)

    def _poll_running(
        self, s: _Slot, ready: set[Any], queue: deque[Work]
    ) -> list[tuple[Work, list[GenResult]]]:
        done: list[tuple[Work, list[GenResult]]] = []
        now = time.time()
        try:
            for run in list(s.running):
                # A failed rank's call is ready (with its error) while its peers still wait
                # in a collective: get what is ready, so the failure shows at once.
                flags = [r in ready for r in run.refs]
                outs = ray.get([r for r, f in zip(run.refs, flags, strict=True) if f])
                if len(outs) == len(run.refs):
                    s.running.remove(run)
                    done.append((run.work, outs[0]))
                    continue
                if outs and run.first_done_at is None:
                    run.first_done_at = now
                stall = self.args.wedge_timeout_s
                if late := late_ranks(flags, run.first_done_at, now, stall):
                    why = f"rank(s) {late} still in generate {stall:.0f}s after a peer finished it"
                    self._fail(s, why, queue)
                    break
        except (RayActorError, RayTaskError) as e:
            self._fail(s, f"rank failed during generate: {_short(e)}", queue)
        return done
