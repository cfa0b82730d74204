"""Serve deployment ``group-<g>``: owns one TP group's rank actors and batches requests.

The rank actors are owned by this replica, so when Serve replaces the replica (its health
check failed because a rank died, or the group never formed) the surviving ranks die with
it and the new replica forms the whole group again; other groups keep serving.

The operator switches a group off (its pods scaled away) and on again through the
deployment's ``user_config`` (:meth:`Group.reconfigure`), which Serve applies to the running
replica without replacing it, so scaling never re-forms the groups that stay.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

import ray
from ray import serve
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from dsi_worker.batcher import DONE, Batcher, Waiter
from dsi_worker.config import AppArgs, GroupUserConfig, parse_args, parse_user_config
from dsi_worker.engine import GenRequest, GenResult
from dsi_worker.formation import RankView, find_wedge
from dsi_worker.rank_actor import RankActor, rank_resource
from dsi_worker.results import Generated, GroupReply, GroupUnavailable, Scored, ScoreReply

log = logging.getLogger("ray.serve")

PING_TIMEOUT_S = 10.0
# How long one health check waits for the forming ranks' progress reports.
PROGRESS_TIMEOUT_S = 5.0
# Consecutive ping timeouts after which a group counts as hung.
PING_MISSES = 3
# Rank actors are named ``dsi-g<g>-r<r>-<epoch>`` in this Ray namespace (for debugging and
# for tests that kill one).
RANK_NAMESPACE = "dsi"


T = TypeVar("T")


class Wedged(RuntimeError):
    """Some ranks of the group are still inside a collective call that a peer finished."""


async def lockstep(calls: list[Awaitable[T]], stall_s: float, what: str) -> list[T]:
    """Await every rank's share of one collective call, in rank order.

    Ranks leave a collective together: once one rank has finished, the others get
    ``stall_s`` to finish too, else :class:`Wedged` is raised (a rank blocked for good in an
    all-reduce its peers completed would otherwise hold the group until the process group's
    timeout). A rank's error is raised as soon as it arrives, as ``asyncio.gather`` would.
    """
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        _raise_first_error(done)
        first = min(tasks.index(t) for t in done)
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=stall_s, return_when=asyncio.FIRST_EXCEPTION
            )
            if not done:
                late = sorted(tasks.index(t) for t in pending)
                raise Wedged(
                    f"rank(s) {late} still in {what} {stall_s:.0f}s after rank {first} finished it"
                )
            _raise_first_error(done)
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()  # a no-op on finished ones; the Ray tasks themselves run on


def _raise_first_error(done: Iterable[asyncio.Future[Any]]) -> None:
    for t in done:
        if (e := t.exception()) is not None:
            raise e


def process_env(args: AppArgs, rank: int) -> dict[str, str]:
    """What the group sets in rank ``rank``'s own process on top of its pod's env.

    Nothing with one rank per pod (the pod's env names the rank). With several, the pod says
    where its ranks start (NODE_RANK, LOCAL_WORLD_SIZE) and each process needs its own RANK
    and LOCAL_RANK, which no pod-wide variable can give.
    """
    k = args.ranks_per_pod
    if k == 1:
        return {}
    return {"RANK": str(rank), "LOCAL_RANK": str(rank % k)}


def rank_env(args: AppArgs, group: int, rank: int) -> dict[str, str]:
    """Local mode's stand-in for the operator's pod env (``render.worker_env``) plus
    :func:`process_env`: rank, world and group variables with a loopback master (no NCCL
    defaults or user env)."""
    ports = args.local_master_ports or []
    port = ports[group] if group < len(ports) else 29500 + group
    k = args.ranks_per_pod
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(args.tensor_parallel_size),
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DSI_GROUP": str(group),
    }
    if k > 1:
        env.update(NODE_RANK=str(rank // k), LOCAL_WORLD_SIZE=str(k), LOCAL_SIZE=str(k))
    return {**env, **process_env(args, rank)}


def pinning_errors(group: int, infos: list[dict[str, Any]], ranks_per_pod: int = 1) -> list[str]:
    """Check each rank actor read the env of its own pod (RANK=r, DSI_GROUP=g, and on pods of
    several ranks NODE_RANK = r // ranks_per_pod)."""
    errors = []
    for r, info in enumerate(infos):
        if info.get("rank") != r:
            errors.append(f"actor for rank {r} has RANK={info.get('rank')}")
        g = info.get("dsi_group")
        if g is not None and g != str(group):
            errors.append(f"actor for group {group} rank {r} has DSI_GROUP={g}")
        pod = info.get("pod_index")
        if ranks_per_pod > 1 and pod is not None and pod != str(r // ranks_per_pod):
            errors.append(
                f"actor for rank {r} is on pod {pod} of its group, not {r // ranks_per_pod}"
            )
    return errors


def engine_kwargs(args: AppArgs, model_path: str, epoch: str) -> dict[str, Any]:
    """RankEngine keyword arguments from the app args, for the ranks of group epoch
    ``epoch`` (only ranks of one epoch form a group together)."""
    return {
        "epoch": epoch,
        "model": model_path,
        "revision": args.revision,
        "dtype": args.dtype,
        "device": args.device,
        "kernel_inject": args.kernel_inject,
        "form_timeout_s": args.form_timeout_s,
        "torch_threads": args.torch_threads,
    }


def rank_actor_options(args: AppArgs, group: int, rank: int, name: str) -> dict[str, Any]:
    """Ray options of the actor of rank ``rank`` of group ``group`` (serving and the batch
    job): named ``name`` in :data:`RANK_NAMESPACE`, pinned to its pod by
    :func:`rank_resource`, a GPU when the rank wants one, and the env of its process."""
    opts: dict[str, Any] = {
        "name": name,
        "namespace": RANK_NAMESPACE,
        "resources": {rank_resource(group, rank): 1},
        "num_cpus": 0,
        "num_gpus": 1 if _rank_wants_gpu(args.device, group, rank) else 0,
    }
    if args.local_mode:
        # Exactly what the operator puts into the pod's env.
        opts["runtime_env"] = {"env_vars": rank_env(args, group, rank)}
    elif args.ranks_per_pod > 1:
        opts["runtime_env"] = {"env_vars": process_env(args, rank)}
    return opts


# mypy cannot see through Ray's decorators (``.options``/``.remote`` on decorated classes);
# the ``type: ignore`` comments in this package are at that boundary only.
@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=2,
    health_check_timeout_s=30,
    max_ongoing_requests=256,
    graceful_shutdown_timeout_s=5,
)
class Group:
    """One tensor-parallel group: ``tensor_parallel_size`` rank actors run every batch.

    Switched on and off by ``user_config`` (:meth:`reconfigure`). The rank actors are
    created when the group first needs them (its first health check, status call or
    request), so a replica whose ``user_config`` starts it switched off never creates any.
    """

    def __init__(self, args: dict[str, Any], group: int, model_path: str) -> None:
        self.args = parse_args(args)
        #: The app args as deployed: the shape a user_config without one means.
        self.app_args = self.args
        self.group = group
        self.model_path = model_path
        #: What the operator wants (``user_config``); without one, always on.
        self.active = True
        #: Whether this epoch's rank actors were created (False: none, or torn down).
        self.launched = False
        self.epoch = uuid.uuid4().hex[:8]
        self.created = time.time()
        self.state = "forming"
        self.error: str | None = None
        self.batches = 0
        self._seq = 0
        self.max_batch_seen = 0
        self.slow_pings = 0
        self.names: list[str] = []
        self.actors: list[Any] = []
        self._start_refs: list[Any] = []
        self.rank_info: list[dict[str, Any]] = []
        #: Each forming rank's last progress report (dsi_worker.formation).
        self.views: list[RankView] = []
        self._new_batchers()

    def _new_batchers(self) -> None:
        # One batch of each kind at a time; the ranks run them in ``seq`` order.
        size, wait = self.args.max_batch_size, self.args.batch_wait_timeout_s
        self._plain: Batcher[GenRequest] = Batcher(self._run_plain, size, wait)
        self._streams: Batcher[GenRequest] = Batcher(self._run_stream, size, wait)

    def _launch(self) -> None:
        """Create this epoch's rank actors and start forming (forming runs in the actors;
        this replica answers status() meanwhile)."""
        tp, group = self.args.tensor_parallel_size, self.group
        self.launched = True
        self.epoch = uuid.uuid4().hex[:8]
        self.created = time.time()
        self.state, self.error = "forming", None
        self.slow_pings, self._seq = 0, 0
        self.names = [f"dsi-g{group}-r{r}-{self.epoch}" for r in range(tp)]
        self.actors = []
        self.views = [RankView() for _ in range(tp)]
        kwargs = engine_kwargs(self.args, self.model_path, self.epoch)
        for r in range(tp):
            opts = rank_actor_options(self.args, group, r, self.names[r])
            self.actors.append(RankActor.options(**opts).remote(kwargs))  # type: ignore[attr-defined]
        self._start_refs = [a.start.remote() for a in self.actors]

    def _stop(self) -> None:
        """Switch off: kill the rank actors (pending ones, whose pods are gone, are just
        cancelled), fail queued and running requests as unavailable, and stay inactive.
        A later switch-on forms a new epoch."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:  # already dead
                log.debug("group %d: kill of a rank actor: %s", self.group, _short(e))
        if self.actors:
            log.info(
                "group %d switched off: rank actors of epoch %s killed", self.group, self.epoch
            )
        self._plain.close(RuntimeError("group switched off"))
        self._streams.close(RuntimeError("group switched off"))
        self._new_batchers()
        self.actors, self._start_refs, self.rank_info, self.names = [], [], [], []
        self.views = []
        self.launched, self.state, self.error = False, "inactive", None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's ``user_config`` hook: ``{"active": false}`` switches the group off (see
        :meth:`_stop`), ``{"active": true}`` switches an inactive one on (it forms as a new
        replica's would); a new TP shape re-forms the group at it (the operator changes it
        only with the group's pods); anything else is a no-op, so a running group never
        re-forms here. A bad config raises ``ValueError`` naming the key, before anything
        changes."""
        config = parse_user_config(GroupUserConfig, user_config, f"group-{self.group}")
        reshaped = self._reshape(config)
        if config.active == self.active and not reshaped:
            return
        self.active = config.active
        if self.active:
            log.info("group %d switched on", self.group)
            self._launch()
        else:
            self._stop()

    def _reshape(self, config: GroupUserConfig) -> bool:
        """Take the TP shape ``config`` gives (stopping this epoch's rank actors, formed for
        the old one); False when it is the current shape. Raises ValueError for a shape the
        app args cannot take (tp not a multiple of ranks per pod)."""
        base = self.app_args
        tp = config.tensor_parallel_size or base.tensor_parallel_size
        k = config.ranks_per_pod or (1 if config.tensor_parallel_size else base.ranks_per_pod)
        if (tp, k) == (self.args.tensor_parallel_size, self.args.ranks_per_pod):
            return False
        shaped = parse_args(
            {
                **base.model_dump(exclude_unset=True),
                "tensor_parallel_size": tp,
                "ranks_per_pod": k,
            }
        )
        log.info(
            "group %d: TP shape %d x %d -> %d x %d",
            self.group,
            self.args.tensor_parallel_size,
            self.args.ranks_per_pod,
            tp,
            k,
        )
        if self.launched:
            self._stop()
        self.args = shaped
        return True

    # -- state ---------------------------------------------------------------------------

    def _poll_forming(self) -> None:
        if self.active and not self.launched:
            self._launch()
        if self.state != "forming":
            return
        done, _ = ray.wait(self._start_refs, num_returns=len(self._start_refs), timeout=0)
        if len(done) == len(self._start_refs):
            try:
                self.rank_info = ray.get(self._start_refs)
            except (RayActorError, RayTaskError) as e:
                self._fail(f"forming failed: {_short(e)}")
                return
            wrong = pinning_errors(self.group, self.rank_info, self.args.ranks_per_pod)
            if wrong:
                self._fail("rank actors landed on the wrong pods: " + "; ".join(wrong))
            else:
                self.state = "ready"
                log.info("group %d formed (epoch %s)", self.group, self.epoch)
        elif time.time() - self.created > self.args.form_timeout_s:
            self._fail(f"group did not form within {self.args.form_timeout_s:.0f}s")
        else:
            # A rank that died while forming fails the group at once.
            for ref in done:
                try:
                    ray.get(ref)
                except (RayActorError, RayTaskError) as e:
                    self._fail(f"forming failed: {_short(e)}")
                    return

    def _fail(self, why: str, epoch: str | None = None) -> None:
        """Mark the group failed (its health check then fails and Serve replaces it); not
        when it was switched off, nor for an error of an earlier ``epoch``'s actors."""
        if self.state == "inactive" or (epoch is not None and epoch != self.epoch):
            return
        if self.state != "failed":
            log.error("group %d (epoch %s) failed: %s", self.group, self.epoch, why)
        self.state, self.error = "failed", why

    async def _check_progress(self) -> None:
        """Ask every forming rank where it is, and fail the epoch when it is wedged
        (:func:`dsi_worker.formation.find_wedge`): found within ``wedge_timeout_s`` plus a
        health-check period, not at the formation deadline."""
        epoch, actors = self.epoch, list(self.actors)
        replies = await asyncio.gather(
            *[asyncio.wait_for(a.progress.remote(), PROGRESS_TIMEOUT_S) for a in actors],
            return_exceptions=True,
        )
        if epoch != self.epoch or self.state != "forming":
            return
        now = time.time()
        for r, reply in enumerate(replies):
            if isinstance(reply, dict):
                self.views[r] = RankView(reply, now)
        why = find_wedge(self.views, now, self.args.wedge_timeout_s)
        if why is not None:
            self._fail(f"wedged while forming: {why}", epoch)

    async def check_health(self) -> None:
        """Serve health check: fails when the group failed, any rank actor is gone, or the
        forming epoch is wedged; an inactive group is healthy (it has nothing to lose)."""
        self._poll_forming()
        if self.state == "forming" and self.actors:
            await self._check_progress()
        if self.state == "ready":
            epoch = self.epoch
            try:
                await asyncio.wait_for(
                    asyncio.gather(*[a.ping.remote() for a in self.actors]), PING_TIMEOUT_S
                )
                self.slow_pings = 0
            except RayActorError as e:
                self._fail(f"rank actor lost: {_short(e)}", epoch)
            except (TimeoutError, GetTimeoutError) as e:
                # Slow is not dead: on a loaded machine (another group loading its model on the
                # same CPUs) a ping can take many seconds, and failing here would re-form a
                # healthy group. A dead rank answers with RayActorError at once; a hung one
                # misses several pings in a row.
                self.slow_pings += 1
                if self.slow_pings >= PING_MISSES:
                    self._fail(f"rank actors missed {self.slow_pings} pings: {_short(e)}", epoch)
        if self.state == "failed":
            raise RuntimeError(f"group {self.group} failed: {self.error}")

    async def status(self) -> dict[str, Any]:
        """Group state for the ingress (ready/forming/failed/inactive) and batching counters."""
        self._poll_forming()
        return {
            "group": self.group,
            "epoch": self.epoch,
            "state": self.state,
            "active": self.active,
            "error": self.error,
            "ranks": self.names,
            "rank_info": self.rank_info,
            "progress": [v.report for v in self.views] if self.state == "forming" else [],
            "batches": self.batches,
            "max_batch_seen": self.max_batch_seen,
            "age_s": time.time() - self.created,
        }

    # -- generate ------------------------------------------------------------------------

    def _unavailable(self) -> GroupUnavailable:
        return GroupUnavailable(self.state, self.error)

    def _lost(self, e: Exception, epoch: str, during: str) -> GroupUnavailable | None:
        """The answer to a call of epoch ``epoch`` that failed with ``e``: unavailable when
        the group was switched off meanwhile or a rank failed (the group then fails); None
        for any other error (the caller re-raises it)."""
        if epoch != self.epoch or self.state == "inactive":
            return GroupUnavailable("inactive", "the group was switched off during the request")
        if isinstance(e, (RayActorError, RayTaskError, Wedged)):
            self._fail(f"rank failed during {during}: {_short(e)}")
            return self._unavailable()
        return None

    async def generate(self, req: GenRequest, alone: bool = False) -> GroupReply:
        """Generate for one request (batched with concurrent ones). ``alone``: the ingress
        has no other request under way, so its batch need not wait for company."""
        self._poll_forming()
        if self.state != "ready":
            return self._unavailable()
        epoch = self.epoch
        w = self._plain.submit(req, alone=alone)
        try:
            result = await w.out.get()
            if isinstance(result, BaseException):
                raise result
        except Exception as e:
            lost = self._lost(e, epoch, "generate")
            if lost is None:
                raise
            return lost
        finally:
            w.abandoned = True  # cancelled while queued: it stays out of the batch
        assert isinstance(result, Generated)
        return result

    async def generate_stream(
        self, req: GenRequest, alone: bool = False
    ) -> AsyncIterator[GroupReply]:
        """Streaming generate: yields one :class:`Generated` step at a time.

        Call through a handle with ``.options(stream=True)``. The first item is a
        :class:`GroupUnavailable` when the group is not ready. ``alone`` as in
        :meth:`generate`.
        """
        self._poll_forming()
        if self.state != "ready":
            yield self._unavailable()
            return
        epoch = self.epoch
        w = self._streams.submit(req, alone=alone)
        try:
            while (item := await w.out.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        except Exception as e:
            lost = self._lost(e, epoch, "generate")
            if lost is None:
                raise
            yield lost
        finally:
            # Client gone: a queued request stays out of the batch; a running row finishes
            # (a batch cannot drop a row mid-generate) and its steps are dropped.
            w.abandoned = True

    def _next_seq(self) -> int:
        # Numbered where the calls are submitted (no await in between), so every rank sees
        # the collective calls in the same order (see RankActor._in_turn).
        seq = self._seq
        self._seq += 1
        return seq

    async def score(self, seqs: list[tuple[int, ...]], top_k: int) -> ScoreReply:
        """Log-probabilities of every token of each sequence (rank 0's answer)."""
        self._poll_forming()
        if self.state != "ready":
            return self._unavailable()
        epoch, seq = self.epoch, self._next_seq()
        try:
            outs = await lockstep(
                [a.score.remote(seq, seqs, top_k) for a in self.actors],
                self.args.wedge_timeout_s,
                "score",
            )
        except Exception as e:
            lost = self._lost(e, epoch, "score")
            if lost is None:
                raise
            return lost
        return Scored(outs[0])

    def _seeded(self, reqs: list[GenRequest]) -> list[GenRequest]:
        # One seed per batch for requests that gave none; all ranks get this same list.
        seed = random.randrange(2**31)
        batch = [
            r if r.params.seed is not None else replace(r, params=replace(r.params, seed=seed))
            for r in reqs
        ]
        self.batches += 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        return batch

    async def _run_stream(self, waiters: list[Waiter[GenRequest]]) -> None:
        """Run one streamed batch, delivering each row's steps to its waiter."""
        batch = self._seeded([w.item for w in waiters])
        # Rank 0 streams its steps back; the other ranks run the identical call (their
        # outputs are the same) and are awaited at the end so errors surface.
        seq = self._next_seq()
        head = self.actors[0].generate_stream.options(num_returns="streaming").remote(seq, batch)
        rest = [a.generate.remote(seq, batch) for a in self.actors[1:]]
        async for ref in head:
            step = await ref
            for w, (toks, fin) in zip(waiters, step, strict=True):
                if toks or fin:
                    w.put(Generated(list(toks), fin, len(batch), self.group, self.epoch))
                if fin is not None:
                    w.put(DONE)
        # Rank 0 finished: the others leave the same collectives within the wedge bound.
        try:
            await asyncio.wait_for(asyncio.gather(*rest), self.args.wedge_timeout_s)
        except TimeoutError:
            raise Wedged(
                f"ranks 1.. still in generate {self.args.wedge_timeout_s:.0f}s after rank 0 "
                "finished it"
            ) from None
        for w in waiters:  # every row got a finish reason; this only guards against hangs
            w.put(DONE)

    async def _run_plain(self, waiters: list[Waiter[GenRequest]]) -> None:
        """Run one batch on every rank; rank 0's results go to the waiters."""
        batch = self._seeded([w.item for w in waiters])
        seq = self._next_seq()
        t0 = time.monotonic()
        outs: list[list[GenResult]] = await lockstep(
            [a.generate.remote(seq, batch) for a in self.actors],
            self.args.wedge_timeout_s,
            "generate",
        )
        elapsed = time.monotonic() - t0
        for w, res in zip(waiters, outs[0], strict=True):
            w.put(
                Generated(
                    list(res.token_ids),
                    res.finish_reason,
                    len(batch),
                    self.group,
                    self.epoch,
                    elapsed,
                )
            )


def _rank_wants_gpu(device: str, group: int, rank: int) -> bool:
    """Whether rank ``rank``'s actor should request a GPU.

    ``auto`` looks at the node that carries the rank's pinning resource (its pod); when that
    pod has not joined yet it falls back to whether the cluster has any GPU.  Operators
    that know should pass ``device`` explicitly.
    """
    if device != "auto":
        return device == "cuda"
    res = rank_resource(group, rank)
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if node.get("Alive") and node.get("Resources", {}).get(res):
            return bool(node["Resources"].get("GPU", 0))
    return bool(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[-1] if s else type(e).__name__)[:300]
