"""Fuzz and chaos sizes of the suite, read from the environment.

CI runs the defaults (scale 1): spec fuzz 600 valid + 600 invalid specs (unit) and 150 through
the API server (integration), 40 examples per HTTP operation (worker), the kwok chaos soak with
14 faults and 2 operator SIGKILLs (integration), and one fault of each cheap kind on real pods
(e2e, 3 faults). ``DSI_FUZZ_SCALE`` and ``DSI_CHAOS_SCALE`` multiply them (e.g. 5 for a soak
before a release, 0.2 for a quick local pass); sizes never drop below 1.
"""

from __future__ import annotations

import os


def _scale(var: str) -> float:
    raw = os.environ.get(var, "1")
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{var}={raw!r}: must be a positive number (1 is the CI size)") from None
    if value <= 0:
        raise SystemExit(f"{var}={raw!r}: must be a positive number (1 is the CI size)")
    return value


def fuzz_examples(default: int) -> int:
    """Hypothesis examples for a fuzz test whose CI size is ``default``."""
    return max(1, round(default * _scale("DSI_FUZZ_SCALE")))


def chaos_faults(default: int) -> int:
    """Faults for a chaos test whose CI size is ``default``."""
    return max(1, round(default * _scale("DSI_CHAOS_SCALE")))
