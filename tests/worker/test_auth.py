"""The endpoint's API key (spec.serve.apiKeySecret): Bearer auth on every model route,
/healthz and /metrics open, the official client authenticates with its api_key."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.worker

KEY_ENV = "DSI_TEST_API_KEY"
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tiny_server: Callable[..., Any]) -> Iterator[str]:
    """One TP 1 group behind Serve with an API key; Ray's workers inherit the variable."""
    os.environ[KEY_ENV] = KEY
    try:
        with tiny_server(tiny_model_dir, api_key_env=KEY_ENV) as base:
            yield base
    finally:
        os.environ.pop(KEY_ENV, None)


def test_model_routes_need_the_key(url: str) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=ok, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{url}/v1/models", headers=ok, timeout=10).json()["data"][0]["id"] == "tiny"


def test_probes_and_metrics_stay_open(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert 'dsi_requests_total{endpoint="completions",status="401"}' in metrics.text


def test_openai_client_authenticates_with_its_api_key(url: str) -> None:
    import openai

    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    out = good.completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert out.choices[0].text is not None
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hello", max_tokens=2)
