"""The batch job's driver: plan the shards, run them on a :class:`~.pool.GroupPool`, write
each shard's part file and record it in the resume marker.

Why not Ray Data's ``map_batches`` over an actor pool. The seed example hands a Ray Dataset
to a pool of predictor actors that each own a TP group. Three of this job's guarantees do
not fit that shape, so the driver schedules the batches itself on Ray core (actors and
``ray.wait``), and reads the input with pyarrow/json directly:

1. Exactly once per row, with resume. The unit of commit is the shard: its part file is
   renamed into place and only then recorded in the marker. Ray Data's ``write_*`` name
   files per task, have no notion of "this shard is done", and retry tasks on their own,
   so a rerun could neither skip finished work nor guarantee one copy of every row.
2. Whole-group replacement with one restart budget for the run. A Ray Data actor that
   raises fails the dataset (or, with ``max_errored_blocks``, drops its rows); it is
   retried only when its process dies, and nothing spends a shared budget. Rank actors must
   also be pinned by ``rank_resource(group, rank)``, which needs a stable group index per
   pool member; Ray Data's pool actors are anonymous and restarted at will.
3. Row ids. Without an id column a row's id is ``<file>:<row index>``; Ray Data's readers
   split and merge files into blocks and do not carry the row's index within its file.

Exactly once: every row of the input is in exactly one shard (:func:`~.shards.plan_shards`)
and one batch of it; a batch's results are taken from the first group epoch that finishes
it (a failed epoch's batches are requeued and its late answers never looked at); a shard's
file is written whole from its rows in file order and renamed, then marked done. A rerun
skips marked shards whose file exists and rewrites every other shard from scratch, after
deleting the temporary files a killed run left behind.

Rows are tokenized and decoded here, as the serving ingress does (``add_special_tokens``,
``skip_special_tokens``). A row whose prompt alone fills the model's context is not sent to
a group: it is written with empty text and finish_reason ``context_length_exceeded``; a
row whose prompt plus ``max_tokens`` overflows it gets as many tokens as fit.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsi_operator.api.progress import BatchProgress

from dsi_worker.batch.args import BatchArgs
from dsi_worker.batch.pool import GroupPool, PoolFailed, Replacement, Work
from dsi_worker.batch.progress import Reporters, reporters_from_env
from dsi_worker.batch.shards import (
    SUCCESS,
    InputError,
    Marker,
    OutputMismatch,
    Shard,
    fingerprint,
    input_paths,
    load_marker,
    part_name,
    plan_shards,
    remove_tmp_files,
)
from dsi_worker.batch.tables import InputRow, read_shard, scan_file, write_part
from dsi_worker.engine import GenRequest, GenResult, SamplingParams

log = logging.getLogger(__name__)

#: finish_reason of a row whose prompt alone fills the model's context (not generated).
TOO_LONG = "context_length_exceeded"
#: How long one wait for the groups may take before progress is reported again.
POLL_S = 0.5


class JobFailed(RuntimeError):
    """The job cannot finish; the message says why (it is the job's last log line)."""


@dataclass
class JobSummary:
    """What a run did."""

    output: str
    shards_total: int
    shards_skipped: int = 0
    shards_written: int = 0
    rows_total: int = 0
    rows_written: int = 0
    rows_too_long: int = 0
    replacements: list[Replacement] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: From the first group formed to the end (throughput without model loading).
    generate_s: float = 0.0

    @property
    def group_replacements(self) -> int:
        """Failed groups that were replaced by a new epoch."""
        return sum(1 for r in self.replacements if r.new_epoch is not None)


@dataclass
class Plan:
    """The shards of the input and which of them this run must (re)do."""

    out: Path
    shards: list[Shard]
    marker: Marker
    todo: list[Shard]

    @property
    def rows_total(self) -> int:
        """Rows of the whole input."""
        return sum(s.rows for s in self.shards)


def plan_job(args: BatchArgs) -> Plan:
    """Scan the input, cut it into shards, and check the output directory's marker
    (:class:`~.shards.OutputMismatch` when it belongs to another input or arguments)."""
    out = Path(args.output.path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = input_paths(args.input)
    files = [scan_file(p, name, args.input.format, args.rows_per_shard) for p, name in paths]
    shards = plan_shards(files, args.rows_per_shard)
    marker = load_marker(out, fingerprint(paths, args), len(shards))
    # The marker exists before any part file does: a part file without one is foreign.
    marker.save(out)
    if removed := remove_tmp_files(out):
        log.info("removed %d half-written file(s) of an earlier run: %s", len(removed), removed)
    fmt = args.output.format
    todo = [
        s for s in shards if s.id not in marker.done or not (out / part_name(s.id, fmt)).exists()
    ]
    # A rerun with work left (a part deleted, say) is not a success until it ends.
    if todo:
        (out / SUCCESS).unlink(missing_ok=True)
    return Plan(out, shards, marker, todo)


@dataclass
class _Open:
    """A shard being run: its rows, their prompt ids, and each row's output once known."""

    shard: Shard
    rows: list[InputRow]
    prompt_ids: list[list[int]]
    out: list[dict[str, Any] | None]
    #: Row positions (in the shard) of each of its batches.
    batches: list[list[int]] = field(default_factory=list)
    pending: int = 0


class _Run:
    """One run of the job over ``plan.todo`` on ``pool``."""

    def __init__(
        self, args: BatchArgs, plan: Plan, pool: GroupPool, tokenizer: Any, context_len: int
    ) -> None:
        self.args, self.plan, self.pool = args, plan, pool
        self.tokenizer, self.context_len = tokenizer, context_len
        self.queue: deque[Work] = deque()
        self.open: dict[int, _Open] = {}
        self.next = 0  # index into plan.todo of the next shard to open
        self.t0 = time.monotonic()
        todo = {s.id for s in plan.todo}
        done = [s for s in plan.shards if s.id not in todo]
        self.summary = JobSummary(str(plan.out), len(plan.shards), shards_skipped=len(done))
        self.summary.rows_total = plan.rows_total
        self.rows_done_before = sum(s.rows for s in done)
        #: Rows generated (or refused as too long) in this run, shards not yet written too.
        self.rows_run = 0

    def run(self, reporters: Reporters) -> None:
        """Run every shard of the plan, reporting progress as it goes."""
        self.pool.start()
        # Enough queued batches that every group always has its next one at hand.
        want = 2 * self.pool.inflight * len(self.pool.slots)
        while self.open or self.next < len(self.plan.todo):
            while len(self.queue) < want and self.next < len(self.plan.todo):
                self._open(self.plan.todo[self.next])
                self.next += 1
            for work, results in self.pool.step(self.queue, POLL_S):
                self._finish_batch(work, results)
            reporters.report(self.progress())

    def progress(self) -> BatchProgress:
        """Where the run stands now."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return BatchProgress(
            rows_done=self.rows_done_before + self.rows_run,
            rows_total=self.plan.rows_total,
            rows_per_second=self.rows_run / elapsed,
            groups_alive=self.pool.alive(),
            shards_done=self.summary.shards_skipped + self.summary.shards_written,
            shards_total=len(self.plan.shards),
            group_restarts=self.pool.restarts,
        )

    def _open(self, shard: Shard) -> None:
        """Read and tokenize a shard and queue its batches (rows that cannot fit the
        context are answered at once)."""
        rows = read_shard(shard, self.args.input)
        ids: list[list[int]] = self.tokenizer([r.prompt for r in rows], add_special_tokens=True)[
            "input_ids"
        ]
        o = _Open(shard, rows, ids, [None] * len(rows))
        gen, size = self.args.generation, self.args.batch_size
        fits = [i for i, p in enumerate(ids) if len(p) < self.context_len]
        for i in sorted(set(range(len(rows))) - set(fits)):
            o.out[i] = self._row(rows[i], ids[i], GenResult((), "length"), TOO_LONG)
            self.summary.rows_too_long += 1
            self.rows_run += 1
        for b, start in enumerate(range(0, len(fits), size)):
            pos = fits[start : start + size]
            # One seed per batch when none is given (as a serving group does); a retried
            # batch keeps its requests, seed included.
            seed = gen.seed if gen.seed is not None else random.randrange(2**31)
            reqs = [self._request(ids[i], seed) for i in pos]
            o.batches.append(pos)
            self.queue.append(Work(shard.id, b, reqs))
        o.pending = len(o.batches)
        self.open[shard.id] = o
        if not o.pending:
            self._write(o)

    def _request(self, prompt_ids: list[int], seed: int) -> GenRequest:
        gen = self.args.generation
        params = SamplingParams(
            max_new_tokens=min(gen.max_tokens, self.context_len - len(prompt_ids)),
            temperature=gen.temperature,
            top_p=gen.top_p,
            seed=seed,
        )
        return GenRequest(tuple(prompt_ids), params)

    def _row(
        self, row: InputRow, ids: list[int], res: GenResult, finish: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": row.id,
            "prompt": row.prompt,
            # Decoded as the serving API decodes its completions.
            "text": self.tokenizer.decode(list(res.token_ids), skip_special_tokens=True),
            "finish_reason": finish or res.finish_reason,
            "prompt_tokens": len(ids),
            "completion_tokens": len(res.token_ids),
        }

    def _finish_batch(self, work: Work, results: list[GenResult]) -> None:
        o = self.open[work.shard]
        pos = o.batches[work.index]
        for i, res in zip(pos, results, strict=True):
            o.out[i] = self._row(o.rows[i], o.prompt_ids[i], res)
        self.rows_run += len(pos)
        o.pending -= 1
        if not o.pending:
            self._write(o)

    def _write(self, o: _Open) -> None:
        """Write the shard's part file (atomically), then mark it done."""
        rows = [r for r in o.out if r is not None]
        assert len(rows) == len(o.rows), "every row of a shard is answered once"
        fmt = self.args.output.format
        write_part(self.plan.out / part_name(o.shard.id, fmt), rows, fmt)
        self.plan.marker.done.add(o.shard.id)
        self.plan.marker.save(self.plan.out)
        del self.open[o.shard.id]
        self.summary.shards_written += 1
        self.summary.rows_written += len(rows)


def _ensure_ray(args: BatchArgs, env: Mapping[str, str]) -> bool:
    """Connect to Ray (the RayJob's cluster, or the one this process already joined); in
    local mode without ``RAY_ADDRESS``, start a local head carrying every rank resource.
    True when this call started or joined it (the job then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if args.local_mode and not env.get("RAY_ADDRESS"):
        from dsi_worker.local import start_ray

        start_ray(args.num_groups, args.tensor_parallel_size)
    else:
        ray.init(log_to_driver=True)
    return True


def _start_pool(args: BatchArgs, plan: Plan) -> _Run:
    """Load the tokenizer and create the pool (no group formed yet) for ``plan``."""
    from dsi_worker.model_files import context_len as model_context_len
    from dsi_worker.model_files import load_tokenizer, resolve_model_path
    from dsi_worker.ports import free_port

    app = args.app_args()
    if app.local_mode and app.local_master_ports is None:
        # As the serving app does: a free master port per group on this host.
        ports = [free_port() for _ in range(app.num_groups)]
        app = app.model_copy(update={"local_master_ports": ports})
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path, revision=args.revision)
    context_len = args.max_model_len or model_context_len(model_path, revision=app.revision)
    pool = GroupPool(app, model_path, max_restarts=args.max_group_restarts)
    return _Run(args, plan, pool, tokenizer, context_len)


def _execute(
    args: BatchArgs, plan: Plan, env: Mapping[str, str], reporters: Reporters
) -> JobSummary:
    """Run the plan's shards on a fresh pool; progress is reported at the end, failed or
    not."""
    import ray

    if not plan.todo:
        n, rows = len(plan.shards), plan.rows_total
        done = BatchProgress(
            rows_done=rows,
            rows_total=rows,
            rows_per_second=0.0,
            groups_alive=0,
            shards_done=n,
            shards_total=n,
            group_restarts=0,
        )
        reporters.report(done, final=True)
        return JobSummary(str(plan.out), n, shards_skipped=n, rows_total=rows)
    started = _ensure_ray(args, env)
    run: _Run | None = None
    try:
        run = _start_pool(args, plan)
        run.run(reporters)
        return run.summary
    except (InputError, PoolFailed) as e:
        raise JobFailed(str(e)) from None
    finally:
        if run is not None:
            run.pool.shutdown()
            run.summary.replacements = list(run.pool.replacements)
            first = run.pool.first_ready
            run.summary.generate_s = time.monotonic() - first if first else 0.0
            reporters.report(run.progress(), final=True)
        if started:
            ray.shutdown()


def run_job(
    args: BatchArgs, env: Mapping[str, str] | None = None, reporters: Reporters | None = None
) -> JobSummary:
    """Run the batch job to the end and return what it did.

    Raises :class:`JobFailed` (with a one-line reason) when the input cannot be read, the
    output directory belongs to another job, or every group failed with the restart budget
    spent. ``reporters``: default, from ``env`` (:func:`~.progress.reporters_from_env`).
    """
    env = os.environ if env is None else env
    t0 = time.monotonic()
    reporters = reporters or reporters_from_env(env)
    try:
        try:
            plan = plan_job(args)
        except (InputError, OutputMismatch) as e:
            raise JobFailed(str(e)) from None
        log.info(
            "batch job: %d rows in %d shards, %d to do; %d group(s) of TP %d",
            *(plan.rows_total, len(plan.shards), len(plan.todo), args.num_groups),
            args.tensor_parallel_size,
        )
        summary = _execute(args, plan, env, reporters)
        (plan.out / SUCCESS).write_text("")
        summary.elapsed_s = time.monotonic() - t0
        return summary
    finally:
        reporters.close()
