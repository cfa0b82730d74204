"""How a tensor-parallel group's all-reduces travel: DeepSpeed's CPU shared-memory op, or the
torch.distributed process group (gloo or NCCL).

Shared by the rank engine (:mod:`dsi_worker.engine`) and the resharder's fake-group children
(:mod:`dsi_worker.sharded`).
"""

from __future__ import annotations

import importlib
import sys


def disable_cpu_shm_op() -> None:
    """Make DeepSpeed all-reduce through the process group instead of its CPU shm op.

    The shm op assumes every rank shares one host's /dev/shm; with ranks in different pods
    it segfaults in generate().  Only when LOCAL_SIZE says all ranks share a host is it safe.
    Call it before ``deepspeed.init_distributed``.
    """
    # importlib, not ``import deepspeed.comm.torch as m``: deepspeed.comm has an attribute
    # ``torch`` (the torch package) that the ``as`` form would bind instead of the module.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None  # type: ignore[attr-defined]


def route(world_size: int) -> str:
    """``none`` (one rank), ``shm`` (DeepSpeed's CPU shared-memory op: every rank in one
    pod), else ``process-group`` (gloo or NCCL)."""
    if world_size == 1:
        return "none"
    comm = sys.modules.get("deepspeed.comm.comm")
    cdb = getattr(comm, "cdb", None)
    return "shm" if getattr(cdb, "shm_comm_op", None) is not None else "process-group"
