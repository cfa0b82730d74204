"""Chaos on real pods, short and seeded (issue 25 item 4): the CI size of
``bench/bench_chaos.py --real``.

The ``make run`` sample (2 groups x TP 2 of the tiny model on process-backed nodes) takes one
fault of each of the cheapest kinds (rank pod deleted, the container's main process
SIGKILLed, the ``ray::RankActor`` process SIGKILLed) in a seeded order while requests flow
on /v1/completions and /generate. Every fault must recover; each group's restarts and
re-forms must move exactly as expected (a pod-level fault: +1 restart of the hit group; a
rank actor killed in a live pod: +1 re-form, no restart); and at least 95% of the requests sent
during the faults must succeed. It runs on the e2e modules' shared stack, whose teardown
checks that no process, network namespace or Ray session is left behind (``bench_chaos.py
--real`` checks the same on a stack of its own). About 3-5 minutes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from dsi_localcluster import cluster as lc
from e2e_stack import Stack
from sizes import chaos_faults

SEED = 7


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "chaos_real.py"
    spec = importlib.util.spec_from_file_location("chaos_real", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("chaos_real", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_short_chaos_recovers_with_exact_counts(cluster: Any, stack: Stack) -> None:
    cr = _load()
    cfg = lc.running_config(cluster.config)
    target = cr.Target(stack.kube.api, stack.namespace, stack.name, stack.endpoint, stack.operator)
    kinds, n = cr.short_size()
    n = chaos_faults(n)
    outcomes = cr.run_chaos(target, kinds, SEED, cfg, max_faults=n, timeout=600)
    stack.seen_uids |= target.seen_uids
    log = target.operator.log_tail(40)
    print("\n" + cr.table(outcomes, kinds))
    assert len(outcomes) == n, f"stopped after {len(outcomes)} faults\n{log}"
    problems = [f"{o.kind} ({o.detail}): {p}" for o in outcomes for p in o.problems]
    assert not problems, "\n".join(problems) + f"\n{log}"
    ok = sum(o.ok for o in outcomes)
    sent = sum(o.ok + o.failed for o in outcomes)
    assert sent and ok / sent >= 0.95, f"{ok}/{sent} requests ok during the faults"
