"""Fuzzed requests against the real served app: every bad input gets a fast, clear 4xx in
OpenAI's error shape (never a 500 or a hang) and the server keeps serving, up to a burst of
1000 concurrent connections."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from .conftest import MAX_INFLIGHT

pytestmark = pytest.mark.worker

# "Fast": a bad request is refused within this, even on two shared cores.
BURST = 1000
BURST_TIMEOUT_S = 120.0
BUSY = {429, 503}
OK_BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 1}
CHAT_MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url(contract_url: str) -> str:
    """The package's served app (one TP 1 group, admission limit MAX_INFLIGHT)."""
    return contract_url


def openai_error(r: httpx.Response, statuses: set[int], param: str | None = None) -> dict[str, Any]:
    """Assert ``r`` is one of ``statuses`` in OpenAI's error shape naming ``param``."""
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def post(url: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=60, **kw)


def assert_serves(url: str) -> None:
    r = post(url, "/v1/completions", json=OK_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def test_10mb_body_is_refused_fast(url: str) -> None:
    body = json.dumps({**OK_BODY, "prompt": "a" * 10_000_000}).encode()
    assert len(body) > 10_000_000
    t0 = time.monotonic()
    r = post(url, "/v1/completions", content=body, headers={"content-type": "application/json"})
    took = time.monotonic() - t0
    print(f"\n10 MB body: {r.status_code} in {took:.2f}s: {r.text[:200]}")
    openai_error(r, {413})
    # Refused by size, unread: before the limit it was tokenised whole on the ingress's event
    # loop (400 context_length_exceeded after 15 s on 2 cores, nothing else served).
    assert r.json()["error"]["code"] == "body_too_large"
    assert_serves(url)


def max_model_len(url: str) -> int:
    r = httpx.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 200, r.text
    n: int = r.json()["data"][0]["max_model_len"]
    return n


def test_prompt_over_the_context(url: str) -> None:
    limit = max_model_len(url)
    text = "hello world " * limit
    count = post(url, "/tokenize", json={"prompt": text}).json()["count"]
    assert count > limit
    for prompt in (text, [5] * (limit + 1)):
        r = post(url, "/v1/completions", json={**OK_BODY, "prompt": prompt})
        err = openai_error(r, {400}, "prompt")
        assert err["code"] == "context_length_exceeded"
        assert str(limit) in err["message"]
    r = post(url, "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
    openai_error(r, {400}, "messages")


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe\xfd{\x00}", b'{"prompt": "\xff\xfe", "max_tokens": 1}', b"\xc3\x28" * 10],
)
def test_body_not_utf8(url: str, raw: bytes) -> None:
    headers = {"content-type": "application/json"}
    for path in ("/v1/completions", "/v1/chat/completions", "/generate", "/tokenize"):
        openai_error(post(url, path, content=raw, headers=headers), {400})


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"max_tokens": 10**9}, "max_tokens"),
        ("/v1/completions", {"max_tokens": 10**30}, "max_tokens"),
        ("/v1/completions", {"max_tokens": 1.5}, "max_tokens"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"max_tokens": 10**9}, "max_tokens"),
        ("/v1/chat/completions", {"max_completion_tokens": 10**9}, "max_completion_tokens"),
        ("/generate", {"max_tokens": 0}, "max_tokens"),
        ("/generate", {"max_tokens": 10**9}, "max_tokens"),
    ],
)
def test_bad_max_tokens(url: str, path: str, extra: dict[str, Any], param: str) -> None:
    """Over the cap (``max_new_tokens``) is a 400 naming the field, not a clamp: the README
    calls it a cap on ``max_tokens`` and ``check_lengths`` refuses past it, as vLLM does."""
    base: dict[str, Any] = {"messages": CHAT_MSGS} if "chat" in path else {"prompt": "hello"}
    err = openai_error(post(url, path, json={**base, **extra}), {400}, param)
    assert param in err["message"]


def test_max_tokens_0_with_echo_scores_the_prompt(url: str) -> None:
    body = {**OK_BODY, "max_tokens": 0, "echo": True, "logprobs": 1}
    r = post(url, "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "hello"
    assert r.json()["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == r.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "prompt", 123),
        ("/v1/completions", "prompt", [[1, "a"]]),
        ("/v1/completions", "prompt", None),
        ("/v1/completions", "temperature", "hot"),
        ("/v1/completions", "n", 1.5),
        ("/v1/completions", "stream", "yes"),
        ("/v1/completions", "echo", "no"),
        ("/v1/completions", "stop", 5),
        ("/v1/chat/completions", "messages", "x"),
        ("/v1/chat/completions", "stream", "yes"),
        ("/v1/chat/completions", "logprobs", 1),
        ("/generate", "prompt", ["x"]),
    ],
)
def test_wrong_types_name_the_field(url: str, path: str, field: str, value: Any) -> None:
    base: dict[str, Any] = {"messages": CHAT_MSGS} if "chat" in path else {"prompt": "hello"}
    body = {**base, "max_tokens": 1, field: value}
    err = openai_error(post(url, path, json=body), {400}, field)
    assert err["message"].startswith(f"{field}:"), err


def test_chat_content_of_a_wrong_type_names_the_message(url: str) -> None:
    body = {"messages": [{"role": "user", "content": 5}], "max_tokens": 1}
    openai_error(post(url, "/v1/chat/completions", json=body), {400}, "messages.0.content")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/v1/nope", 404),
        ("POST", "/v1/completions/extra", 404),
        ("GET", "/v1/completions", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("POST", "/healthz", 405),
    ],
)
def test_unknown_route_and_wrong_method(url: str, method: str, path: str, status: int) -> None:
    r = httpx.request(method, f"{url}{path}", json=OK_BODY, timeout=30)
    openai_error(r, {status})


Result = tuple[int | str, float, str | None]


async def _one(c: httpx.AsyncClient, url: str, path: str) -> Result:
    """(status or the connection error's name, seconds, Retry-After) of one request."""
    t0 = time.monotonic()
    try:
        if path == "/v1/models":
            r = await c.get(f"{url}{path}")
        else:
            r = await c.post(f"{url}{path}", json=OK_BODY)
    except httpx.HTTPError as e:
        return type(e).__name__, time.monotonic() - t0, None
    return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")


async def _burst(url: str, path: str) -> list[Result]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(limits=limits, timeout=BURST_TIMEOUT_S) as c:
        return await asyncio.gather(*[_one(c, url, path) for _ in range(BURST)])


def burst(url: str, path: str) -> list[Result]:
    """BURST concurrent requests on as many connections; prints the figures."""
    t0 = time.monotonic()
    out = asyncio.run(_burst(url, path))
    counts = Counter(status for status, _, _ in out)
    print(f"\n{BURST} x {path}: {time.monotonic() - t0:.1f}s wall, statuses {dict(counts)}")
    for status in sorted(counts, key=str):
        s = sorted(secs for st, secs, _ in out if st == status)
        print(f"  {status}: {s[0]:.2f} / {s[len(s) // 2]:.2f} / {s[-1]:.2f}s min/p50/max")
    return out


def test_1000_concurrent_connections(url: str) -> None:
    """Every answer a 200 or a 429/503 with Retry-After, no 500, no connection error, and the
    server serves afterwards. Timings are printed, not asserted (shared cores make them
    noisy; a CI run saw the slowest 429 at 66 s while GET /v1/models' slowest took 24 s)."""
    base = burst(url, "/v1/models")
    assert {status for status, _, _ in base} == {200}
    out = burst(url, "/v1/completions")
    counts = Counter(status for status, _, _ in out)
    assert set(counts) <= {200} | BUSY, counts
    assert counts[200] > 0, counts
    assert counts[429] > 0, f"{BURST} requests never met max_inflight_requests={MAX_INFLIGHT}"
    assert all(ra and int(ra) > 0 for status, _, ra in out if status in BUSY)
    slowest_refusal = max(secs for status, secs, _ in out if status in BUSY)
    slowest_base = max(secs for _, secs, _ in base)
    print(f"\n1000-request burst: {dict(counts)}; slowest 429 {slowest_refusal:.1f} s, "
          f"slowest GET /v1/models in its own burst {slowest_base:.1f} s")  # fmt: skip
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    assert_serves(url)
