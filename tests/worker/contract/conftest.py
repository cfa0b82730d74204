"""One served app for every HTTP-contract module (bad input, schema fuzzing): forming a
group costs tens of seconds on 2 cores, and none of these tests changes the app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: Admission limit of the shared app: test_bad_input's burst of 1000 must meet it.
MAX_INFLIGHT = 200


@pytest.fixture(scope="package")
def contract_url(tiny_model_dir: Path, tiny_server: Callable[..., Any]) -> Iterator[str]:
    """One TP 1 group of the tiny model behind Serve, with a low admission limit."""
    with tiny_server(tiny_model_dir, max_new_tokens=8, max_inflight_requests=MAX_INFLIGHT) as url:
        yield url
