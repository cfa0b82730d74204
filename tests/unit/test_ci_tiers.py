"""hack/test_tiers.py: what CI runs, and what runs beside what."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("test_tiers", ROOT / "hack" / "test_tiers.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("test_tiers", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_every_integration_module_runs_in_exactly_one_part(tiers: ModuleType) -> None:
    parts = tiers.integration_parts()
    listed = [m for paths in parts.values() for m in paths]
    on_disk = sorted(
        f"tests/integration/{p.name}" for p in (ROOT / "tests/integration").glob("test_*.py")
    )
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    named = set(tiers.CLUSTER_FAULTS) | set(tiers.INTEGRATION_WITH_WORKER)
    assert named <= {Path(m).name for m in on_disk}, "a listed module does not exist"


def test_e2e_never_runs_beside_the_modules_that_break_the_cluster(tiers: ModuleType) -> None:
    phases = tiers.plan(set(tiers.TIERS), tiers.steps([]))
    names = [[[s.name for s in lane] for lane in phase] for phase in phases]
    assert names[0] == [["lint", "unit", "tools"]]
    for phase in names:
        steps = {s for lane in phase for s in lane}
        assert not ({"e2e", "cluster-faults"} <= steps), names
        assert not ({"e2e", "worker"} <= steps), "the two CPU-heavy tiers side by side"
    ran = sorted(s for phase in names for lane in phase for s in lane)
    assert ran == sorted(tiers.steps([])), "a step is never run"


def test_only_selects_tiers_and_integration_means_all_of_it(tiers: ModuleType) -> None:
    phases = tiers.plan({"integration"}, tiers.steps([]))
    names = sorted(s.name for phase in phases for lane in phase for s in lane)
    assert names == ["cluster-faults", "integration-1", "integration-2"]
    phases = tiers.plan({"unit", "e2e"}, tiers.steps([]))
    assert [[[s.name for s in lane] for lane in ph] for ph in phases] == [[["unit"]], [], [["e2e"]]]
