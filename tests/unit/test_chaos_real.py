"""The pure parts of bench/chaos_real.py: kind order, counter deltas against expectations,
percentiles and the per-kind table; no cluster."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "chaos_real.py"
    spec = importlib.util.spec_from_file_location("chaos_real", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("chaos_real", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


cr = _load()


def test_every_kind_comes_first_then_seeded_picks() -> None:
    rng = random.Random(3)
    first = [cr.pick_kind(i, cr.KINDS, rng) for i in range(len(cr.KINDS))]
    assert first == list(cr.KINDS)
    a = [cr.pick_kind(i, cr.KINDS, random.Random(5)) for i in range(20, 25)]
    b = [cr.pick_kind(i, cr.KINDS, random.Random(5)) for i in range(20, 25)]
    assert a == b and set(a) <= set(cr.KINDS)


def test_counts_delta_reached_and_mismatches() -> None:
    before = {0: (2, 1), 1: (0, 0)}
    delta = cr.counts_delta(before, {0: (3, 1), 1: (0, 1)})
    assert delta == {0: (1, 0), 1: (0, 1)}
    assert cr.counts_reached(delta, {0: (1, 0)})
    assert not cr.counts_reached(delta, {0: (2, 0)})
    # An unexpected re-form of the other group is a mismatch.
    assert cr.mismatches(delta, {0: (1, 0)}) == ["group 1: restarts/reforms +0/+1, want +0/+0"]
    assert cr.mismatches(delta, {0: (1, 0), 1: (0, 1)}) == []


def test_pct_and_table() -> None:
    assert cr.pct([3.0, 1.0, 2.0], 50) == 2.0
    assert cr.pct([1.0, 2.0, 10.0], 99) == 10.0
    o = cr.Outcome("pod_deleted", "g0 r1", True, 42.0, 19, 1, {0: (1, 0), 1: (0, 0)}, {0: (1, 0)})
    bad = cr.Outcome(
        "pod_deleted", "g1 r0", False, 600.0, 0, 5, {0: (0, 0), 1: (0, 0)}, {1: (1, 0)}
    )
    assert o.problems == []
    assert bad.problems == [
        "not recovered in 600s",
        "group 1: restarts/reforms +0/+0, want +1/+0",
    ]
    lines = cr.table([o, bad]).splitlines()
    assert len(lines) == 2  # the header and the one kind that ran
    row = lines[1].split()
    assert row[:5] == ["pod_deleted", "2", "1", "42.0", "42.0"]
    assert row[5] == "76.0"  # 19 ok of 25
    assert row[6:] == ["1/2", "0/0"]
