"""The worker's app-arg defaults are the operator spec's defaults (no Ray needed)."""

from __future__ import annotations

import dsi_operator.api.defaults as D
import pytest
from dsi_worker.config import AppArgs, parse_args


def test_app_args_defaults_come_from_the_shared_defaults_module() -> None:
    # A worker started without the operator (serve-local, bench) must serve like one the
    # operator rendered with an all-default spec.
    a = AppArgs()
    assert a.max_batch_size == D.MAX_BATCH_SIZE
    assert a.batch_wait_timeout_s == pytest.approx(D.BATCH_WAIT_TIMEOUT_MS / 1000.0)
    assert a.max_new_tokens == D.MAX_NEW_TOKENS
    assert a.request_timeout_s == D.REQUEST_TIMEOUT_SECONDS
    assert a.form_timeout_s == D.FORMATION_TIMEOUT_SECONDS


def test_serve_local_cli_defaults_match() -> None:
    from dsi_worker.local import parse_cli

    ns = parse_cli([])
    assert ns.max_batch_size == D.MAX_BATCH_SIZE
    assert ns.max_new_tokens == D.MAX_NEW_TOKENS


def test_bad_args_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        parse_args({"max_batch_size": 0})
    with pytest.raises(ValueError, match="nope"):
        parse_args({"nope": 1})
