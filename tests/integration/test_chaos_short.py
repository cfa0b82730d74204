"""The chaos soak (bench/bench_chaos.py), short: 4 resources x 2 groups, 14 random pod and
node faults (every kind at least once), the operator SIGKILLed twice at random moments.
Every fault must restart exactly the groups it hit, once each, with one GroupRestart Event
each (also when the operator is killed between recording the restart and posting its
Event), and nothing else; every resource ends steady."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sizes import chaos_faults

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_short_chaos_soak_has_no_violations(cluster: Any, dsi_crd: None) -> None:
    cmd = [sys.executable, "-u", str(ROOT / "bench" / "bench_chaos.py")]
    faults = chaos_faults(14)
    cmd += ["--resources", "4", "--faults", str(faults), "--kill-every", "7", "--seed", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "violations: 0" in out.stdout
    assert "final steady state: True" in out.stdout
    assert f"operator SIGKILLs: {faults // 7}" in out.stdout
