"""The rank engine: one tensor-parallel rank (process group + DeepSpeed model + generate).

Plain Python, no Ray: a Ray rank actor wraps it, and tests run it in processes spawned with
``torch.multiprocessing`` to compare a TP group with the unsharded model.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from dsi_worker import allreduce, formation, sharded
from dsi_worker.model_files import load_model
from dsi_worker.rendezvous import join_process_group, wait_for_master

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
# One request's share of a decoding step: new token ids, finish reason when it ends here.
StepItem = tuple[list[int], FinishReason | None]


#: Temperatures below this decode greedily (see :attr:`SamplingParams.greedy`).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Generation arguments; every rank of a group must get identical ones (seed included)."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: the group picks one seed for the whole batch

    @property
    def greedy(self) -> bool:
        """Greedy decoding: temperature 0, or one so small that dividing the logits by it
        overflows (5e-324 made inf logits and a sampling error that failed the whole group);
        vLLM draws the line at the same 1e-5."""
        return self.temperature < GREEDY_BELOW

    def batch_key(self) -> tuple[float, float, int, int]:
        """Requests with equal keys can share one ``generate`` call."""
        if self.greedy:
            return (0.0, 1.0, 0, 0)  # greedy ignores the rest
        return (self.temperature, self.top_p, self.top_k, self.seed or 0)


@dataclass(frozen=True)
class GenRequest:
    """One tokenised prompt and how to continue it."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class GenResult:
    """Generated token ids (prompt excluded) and why generation stopped."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason


@dataclass(frozen=True)
class TokenScore:
    """One token of a scored sequence: its log-probability given everything before it
    (None for the first token) and the ``top`` most likely tokens at its position."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class DistEnv:
    """The torch.distributed coordinates the operator puts in each rank's environment."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistEnv:
        """Read RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK (defaults: 1 rank)."""
        e = os.environ if env is None else env
        try:
            d = cls(
                rank=int(e.get("RANK", "0")),
                world_size=int(e.get("WORLD_SIZE", "1")),
                master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(e.get("MASTER_PORT", "29500")),
                local_rank=int(e.get("LOCAL_RANK", "0")),
            )
        except ValueError as exc:
            raise ValueError(f"bad rank environment: {exc}") from None
        if not 0 <= d.rank < d.world_size:
            raise ValueError(f"RANK={d.rank} not in [0, WORLD_SIZE={d.world_size})")
        return d


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device a rank uses: the one at its LOCAL_RANK when the process sees all of its
    pod's GPUs (pods of several ranks: the operator turns off Ray's per-actor
    CUDA_VISIBLE_DEVICES); device 0 when it sees fewer (Ray limited it to its own GPU)."""
    return local_rank if visible > local_rank else 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is visible")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """Map a dtype name to torch; refuse fp16 on CPU (DeepSpeed's CPU path raises on it)."""
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    if device == "cpu" and dtype == "float16":
        raise ValueError("dtype float16 is not supported on CPU; use float32 or bfloat16")
    return table[dtype]


#: Model types whose fused-kernel path (``replace_with_kernel_inject``) fails with the pinned
#: deepspeed and transformers, as measured on an H200 (docs/gpu.md): refused by name at start
#: instead of failing inside DeepSpeed on the first forward pass.
KERNEL_INJECT_UNSUPPORTED: dict[str, str] = {
    "llama": "DeepSpeed 0.19's injected Llama layers do not accept transformers 5's decoder-"
    "layer call (AttributeError in ds_transformer.forward) and cannot merge grouped-query "
    "q/k/v",
}


def check_kernel_inject(model_type: str) -> None:
    """Raise a ValueError naming ``serve.kernelInject`` when the model cannot use it."""
    why = KERNEL_INJECT_UNSUPPORTED.get(model_type)
    if why is not None:
        raise ValueError(
            f"serve.kernelInject: not supported for model_type {model_type!r} ({why}); "
            "set serve.kernelInject: false (AutoTP, the default)"
        )


class RankEngine:
    """One rank of a tensor-parallel group.

    ``start()`` joins the process group (with a timeout), loads the model in ``dtype``
    (offline when the files are present) and wraps it with ``deepspeed.init_inference``.
    ``generate()`` must be called with the same batch on every rank.
    """

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        kernel_inject: bool = False,
        dist_env: DistEnv | None = None,
        form_timeout_s: float = 900.0,
        torch_threads: int | None = None,
        use_deepspeed: bool = True,
        epoch: str = "",
    ) -> None:
        self.model_id = model
        self.revision = revision
        self.dtype_name = dtype
        self.device_pref = device
        self.kernel_inject = kernel_inject
        self.dist = dist_env or DistEnv.from_env()
        self.form_timeout_s = form_timeout_s
        self.torch_threads = torch_threads
        self.use_deepspeed = use_deepspeed
        #: The group epoch this rank forms (its rendezvous keys carry it, see
        #: :func:`dsi_worker.rendezvous.join_process_group`); "" outside a group.
        self.epoch = epoch
        #: Where this rank is in forming its group (read while start() runs).
        self.progress = formation.Progress()
        self.model: Any = None
        self.device = "cpu"
        self.backend = "gloo"
        self.timings: dict[str, float] = {}
        # How the weights were loaded: path "full" or "sharded" (dsi_worker.sharded), files.
        self.load_info: dict[str, Any] = {}

    # -- setup -------------------------------------------------------------------------

    def start(self) -> None:
        """Form the group and load the sharded model; raises on timeout or bad config."""
        import torch
        import torch.distributed as tdist

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        self.device = resolve_device(self.device_pref)
        dtype = resolve_dtype(self.dtype_name, self.device)
        if self.kernel_inject and self.device != "cuda":
            raise ValueError("kernel_inject needs a GPU (DeepSpeed's fused kernels are CUDA-only)")
        self.backend = "nccl" if self.device == "cuda" else "gloo"
        if self.device == "cuda":
            torch.cuda.set_device(cuda_index(self.dist.local_rank, torch.cuda.device_count()))

        t0 = time.monotonic()
        if self.dist.world_size > 1 and not tdist.is_initialized():
            if self.device == "cpu" and os.environ.get("LOCAL_SIZE") != str(self.dist.world_size):
                allreduce.disable_cpu_shm_op()
            # Ranks may start before their master: wait (bounded, logged) until its name
            # resolves and it listens. The group replica's own deadline bounds the total.
            waited = wait_for_master(
                self.dist.master_addr,
                self.dist.master_port,
                timeout_s=self.form_timeout_s,
                rank=self.dist.rank,
            )
            self.timings["master_wait_s"] = waited
            self.progress.enter(formation.RENDEZVOUS)
            t0 = time.monotonic()
            # The whole bound, not what the wait left: this timeout also bounds every later
            # collective of the group (NCCL/gloo), for the group's whole life.
            join_process_group(
                backend=self.backend,
                master_addr=self.dist.master_addr,
                master_port=self.dist.master_port,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                epoch=self.epoch,
                timeout_s=self.form_timeout_s,
            )
        self.timings["init_process_group_s"] = time.monotonic() - t0

        self.progress.enter(formation.LOADING)
        rss0 = sharded.reset_peak_rss()
        if self._start_sharded(dtype):
            self.load_info.update(sharded.memory_report(rss0))
            self.progress.enter(formation.FORMED)
            return
        t0 = time.monotonic()
        model = load_model(self.model_id, revision=self.revision, dtype=dtype)
        self.timings["load_s"] = time.monotonic() - t0
        if self.kernel_inject:
            check_kernel_inject(str(getattr(model.config, "model_type", "")))

        t0 = time.monotonic()
        self.progress.enter(formation.TP_INIT)
        if self.use_deepspeed and (self.dist.world_size > 1 or self.device == "cuda"):
            import deepspeed

            if self.dist.world_size > 1:
                # Reuses the process group formed above (same backend, same timeout).
                deepspeed.init_distributed(
                    dist_backend=self.backend, timeout=timedelta(seconds=self.form_timeout_s)
                )
            engine = deepspeed.init_inference(
                model,
                tensor_parallel={"tp_size": self.dist.world_size},
                dtype=dtype,
                replace_with_kernel_inject=self.kernel_inject,
            )
            self.model = engine.module
            if self.device == "cuda" and next(self.model.parameters()).device.type != "cuda":
                self.model = self.model.to(f"cuda:{torch.cuda.current_device()}")
        else:
            self.model = model.to(self.device)
        self.model.eval()
        self.timings["init_inference_s"] = time.monotonic() - t0
        self.load_info = {"path": "full", **sharded.memory_report(rss0)}
        self.progress.enter(formation.FORMED)

    def _start_sharded(self, dtype: Any) -> bool:
        """Load only this rank's shard when the model directory has shards for the group's TP
        size (``python -m dsi_worker.sharded reshard``); False: load the full model.

        AutoTP groups only (shards are AutoTP's layout).  Shards that exist but cannot be used
        raise ``sharded.ShardError`` naming the file.  ``DSI_SHARDED_LOAD=0`` turns it off;
        ``DSI_SHARDED_VERIFY=0`` skips the sha256 check of the shard (its size is still checked).
        """
        n = self.dist.world_size
        if not self.use_deepspeed or self.kernel_inject or n < 2:
            return False
        if os.environ.get("DSI_SHARDED_LOAD", "1") == "0":
            return False
        manifest = sharded.find_shards(self.model_id, n)
        if manifest is None:
            if others := sharded.available_tp_sizes(self.model_id):
                log.warning("shards exist for TP %s but not %d: loading the full model", others, n)
            return False
        import deepspeed
        import torch

        deepspeed.init_distributed(
            dist_backend=self.backend, timeout=timedelta(seconds=self.form_timeout_s)
        )
        self.model, report = sharded.load_sharded(
            self.model_id,
            manifest,
            rank=self.dist.rank,
            dtype=dtype,
            verify=os.environ.get("DSI_SHARDED_VERIFY", "1") != "0",
        )
        if self.device == "cuda" and next(self.model.parameters()).device.type != "cuda":
            self.model = self.model.to(f"cuda:{torch.cuda.current_device()}")
        self.model.eval()
        self.timings["init_inference_s"] = report.pop("build_s")
        self.timings["load_s"] = report.pop("read_s")
        self.load_info = report
        return True

    def shard_report(self) -> dict[str, list[int]]:
        """Parameter name -> shape on this rank (shows which weights are sharded)."""
        return {n: list(p.shape) for n, p in self.model.named_parameters()}

    def info(self) -> dict[str, Any]:
        """Where this rank runs and how long forming took."""
        return {
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "master": f"{self.dist.master_addr}:{self.dist.master_port}",
            "device": self.device,
            "backend": self.backend,
            "allreduce": allreduce.route(self.dist.world_size),
            "pid": os.getpid(),
            "timings": dict(self.timings),
            "load": dict(self.load_info),
        }

    def close(self) -> None:
        """Leave the process group."""
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()

    # -- generate ------------------------------------------------------------------------

    def generate(self, batch: list[GenRequest]) -> list[GenResult]:
        """Generate for every request; same call (same batch, same seeds) on every rank."""
        tokens: list[list[int]] = [[] for _ in batch]
        finish: list[FinishReason] = ["length"] * len(batch)
        for step in self.generate_stream(batch):
            for i, (new, fin) in enumerate(step):
                tokens[i].extend(new)
                if fin is not None:
                    finish[i] = fin
        return [GenResult(tuple(t), f) for t, f in zip(tokens, finish, strict=True)]

    def score(self, seqs: list[tuple[int, ...]], top_k: int = 0) -> list[list[TokenScore]]:
        """Log-probabilities of every token of each sequence under the model (log-softmax of
        the raw logits, temperature 1), with the ``top_k`` alternatives per position.

        One forward pass per sequence, in order: every rank of a TP group must make the same
        calls (the forward pass runs the group's all-reduces)."""
        import torch

        out: list[list[TokenScore]] = []
        for ids in seqs:
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=x).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            scores = [TokenScore(ids[0], None)]
            for pos in range(1, len(ids)):
                row = lp[pos - 1]
                top: tuple[tuple[int, float], ...] = ()
                if top_k > 0:
                    vals, idx = row.topk(min(top_k, row.shape[-1]))
                    top = tuple(zip(idx.tolist(), vals.tolist(), strict=True))
                scores.append(TokenScore(ids[pos], float(row[ids[pos]]), top))
            out.append(scores)
        return out

    def generate_stream(self, batch: list[GenRequest]) -> Iterator[list[StepItem]]:
        """Like ``generate`` but yields after every decoding step.

        Each yield has one ``(new_token_ids, finish_reason_or_None)`` per request, in batch
        order; a request's finish reason appears once, in the step that ends it.  Requests
        with equal sampling settings share one ``model.generate`` call; the calls run in a
        fixed order so every rank runs the same sequence of collectives.
        """
        groups: dict[tuple[float, float, int, int], list[int]] = {}
        for i, req in enumerate(batch):
            groups.setdefault(req.params.batch_key(), []).append(i)
        for key in sorted(groups):
            idx = groups[key]
            for sub in self._stream_same_params([batch[i] for i in idx]):
                step: list[StepItem] = [([], None)] * len(batch)
                for i, item in zip(idx, sub, strict=True):
                    step[i] = item
                yield step

    def _generate_kwargs(self, reqs: list[GenRequest]) -> tuple[Any, Any, dict[str, Any], set[int]]:
        """(input ids, attention mask, generate() kwargs, EOS ids) of one same-params batch."""
        import torch

        p0 = reqs[0].params
        gen_cfg = self.model.generation_config
        pad_id = gen_cfg.pad_token_id
        eos = gen_cfg.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if pad_id is None:
            pad_id = next(iter(eos_ids), 0)
        width = max(len(r.prompt_ids) for r in reqs)
        # Left padding: decoder-only models continue from the last column.
        ids = torch.full((len(reqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for row, r in enumerate(reqs):
            n = len(r.prompt_ids)
            ids[row, width - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(r.params.max_new_tokens for r in reqs),
            "pad_token_id": pad_id,
            "eos_token_id": sorted(eos_ids) if eos_ids else None,
        }
        if not p0.greedy:
            kwargs.update(
                do_sample=True,
                temperature=p0.temperature,
                top_p=p0.top_p,
                top_k=p0.top_k if p0.top_k > 0 else None,
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return ids, mask, kwargs, eos_ids

    def _stream_same_params(self, reqs: list[GenRequest]) -> Iterator[list[StepItem]]:
        import torch

        ids, mask, kwargs, eos_ids = self._generate_kwargs(reqs)
        steps: queue.Queue[Any] = queue.Queue()
        streamer = _StepStreamer(steps)

        def run() -> None:
            try:
                # Same seed on every rank: after the all-reduce every rank has the same
                # logits, so they draw the same tokens and stay in lock step.
                torch.manual_seed(reqs[0].params.seed or 0)
                with torch.inference_mode():
                    self.model.generate(
                        input_ids=ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        streamer=streamer,
                        **kwargs,
                    )
            except BaseException as e:  # re-raised in the caller's thread
                steps.put(e)
            finally:
                steps.put(_END)

        worker = threading.Thread(target=run, name="dsi-generate", daemon=True)
        worker.start()
        rows = _Rows(reqs, eos_ids)
        error: BaseException | None = None
        while True:
            item = steps.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                error = item
                continue
            yield rows.step(item)
        worker.join()
        if error is not None:
            raise error
        # generate() ended (all rows hit EOS or the longest budget): close open rows.
        if not all(rows.done):
            yield [([], None) if d else ([], "length") for d in rows.done]


class _Rows:
    """Per-row progress of a streamed batch: which rows finished, and why."""

    def __init__(self, reqs: list[GenRequest], eos_ids: set[int]) -> None:
        self.reqs = reqs
        self.eos_ids = eos_ids
        self.count = [0] * len(reqs)
        self.done = [False] * len(reqs)

    def step(self, tokens: list[int]) -> list[StepItem]:
        """One decoding step (a token per row) -> (new tokens, finish reason) per row."""
        out: list[StepItem] = []
        for row, tok in enumerate(tokens):
            if self.done[row]:
                out.append(([], None))
            elif tok in self.eos_ids:
                self.done[row] = True
                out.append(([], "stop"))
            else:
                self.count[row] += 1
                if self.count[row] >= self.reqs[row].params.max_new_tokens:
                    self.done[row] = True
                    out.append(([tok], "length"))
                else:
                    out.append(([tok], None))
        return out


_END = object()


class _StepStreamer:
    """transformers streamer: forwards each decoding step's tokens (one per row)."""

    def __init__(self, steps: queue.Queue[Any]) -> None:
        self.steps = steps
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        # The first put() is the prompt; each later one holds one new token per row.
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass
