"""The Serve app on a local Ray cluster, through HTTP: API, validation, batching, recovery.

One module-scoped Ray + Serve (2 groups x TP 2, tiny model, local mode: each rank actor
gets the env the operator would give its pod) keeps this affordable on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dsi_localcluster.wait import wait_for
from dsi_worker.ports import free_port

pytestmark = pytest.mark.worker

NUM_GROUPS = 2
TP = 2
MAX_NEW = 32
FORM_DEADLINE_S = 420

# What the operator renders into the RayService (plus local_mode, which stands in for the
# pods' env and resources on this machine).
SERVE_CONFIG = """
applications:
  - name: dsi
    route_prefix: /
    import_path: dsi_worker.app:build_app
    args:
      model: "{model}"
      revision: null
      dtype: float32
      tensor_parallel_size: {tp}
      num_groups: {groups}
      max_batch_size: 8
      max_new_tokens: {cap}
      kernel_inject: false
      served_model_name: tiny
      request_timeout_s: 60
      batch_wait_timeout_s: 0.05
      torch_threads: 1
      local_mode: true
"""


def _health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/healthz", timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    """A local Ray head with all rank resources, the app deployed, base URL yielded."""
    import ray
    from dsi_worker.local import start_ray
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    start_ray(NUM_GROUPS, TP, num_cpus=4, namespace="dsi-tests", object_store_mb=100)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Deployed the way a RayService's serveConfigV2 is: import path + args, through
        # Serve's own builder call (the one the controller makes for a config deploy).
        serve_config = yaml.safe_load(
            SERVE_CONFIG.format(model=tiny_model_dir, groups=NUM_GROUPS, tp=TP, cap=MAX_NEW)
        )
        app_cfg = serve_config["applications"][0]
        builder = import_attr(app_cfg["import_path"])
        app = call_user_app_builder_with_args_if_necessary(builder, app_cfg["args"])
        serve.run(app, name=app_cfg["name"], route_prefix=app_cfg["route_prefix"])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _health(url).status_code == 200, FORM_DEADLINE_S, "every group to form")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_health_and_models(server: str) -> None:
    h = _health(server).json()
    assert h["status"] == "ok"
    assert [g["state"] for g in h["groups"]] == ["ready"] * NUM_GROUPS
    assert all(len(g["ranks"]) == TP for g in h["groups"])
    m = httpx.get(f"{server}/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "tiny"


def test_rank_actors_got_their_pods_env(server: str) -> None:
    from ray import serve

    for g in range(NUM_GROUPS):
        st = serve.get_deployment_handle(f"group-{g}", app_name="dsi").status.remote().result()
        infos = st["rank_info"]
        assert [i["rank"] for i in infos] == list(range(TP))
        assert {i["world_size"] for i in infos} == {TP}
        assert {i["dsi_group"] for i in infos} == {str(g)}
        assert {i["backend"] for i in infos} == {"gloo"}
        # One MASTER_ADDR:MASTER_PORT per group, distinct between groups.
        assert len({i["master"] for i in infos}) == 1
    masters = {
        serve.get_deployment_handle(f"group-{g}", app_name="dsi")
        .status.remote()
        .result()["rank_info"][0]["master"]
        for g in range(NUM_GROUPS)
    }
    assert len(masters) == NUM_GROUPS


def test_pinning_check() -> None:
    from dsi_worker.group import pinning_errors

    ok = [{"rank": 0, "dsi_group": "1"}, {"rank": 1, "dsi_group": "1"}]
    assert pinning_errors(1, ok) == []
    bad = [{"rank": 1, "dsi_group": "0"}, {"rank": 0, "dsi_group": "1"}]
    errs = pinning_errors(1, bad)
    assert any("RANK=1" in e for e in errs) and any("DSI_GROUP=0" in e for e in errs)


def test_completions(server: str) -> None:
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert 0 < body["usage"]["completion_tokens"] <= 8


def test_chat(server: str) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 6})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)


def _sse_events(r: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in r.text.split("\n\n") if line.startswith("data: ")]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming(server: str, path: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 8, "stream": True}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "Hello"
    r = _post(server, path, body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert len(chunks) >= 2


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_include_usage(server: str, path: str) -> None:
    body: dict[str, Any] = {"max_tokens": 6, "temperature": 0}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "Hello"
    want = _post(server, path, body).json()["usage"]
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = _sse_events(_post(server, path, streamed))
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"] == want  # same greedy answer, same counts
    assert all("usage" not in json.loads(e) for e in events[:-2])
    plain = _sse_events(_post(server, path, {**body, "stream": True}))
    assert all("usage" not in json.loads(e) for e in plain[:-1])


def test_several_prompts_token_ids_and_n_choices(server: str) -> None:
    greedy = {"max_tokens": 8, "temperature": 0}

    def one(prompt: Any) -> str:
        r = _post(server, "/v1/completions", {**greedy, "prompt": prompt})
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    both = _post(server, "/v1/completions", {**greedy, "prompt": ["Hello", "Ray Serve"]}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["text"] for c in both["choices"]] == [one("Hello"), one("Ray Serve")]
    ids = _post(server, "/tokenize", {"prompt": "Hello"}).json()["tokens"]
    assert one(ids) == one("Hello")  # a token-id prompt is the same prompt
    sampled = {"prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 11}
    a = _post(server, "/v1/completions", sampled).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    b = _post(server, "/v1/completions", sampled).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4}
    assert len(_post(server, "/v1/chat/completions", chat).json()["choices"]) == 2


def test_logprobs_echo_and_greedy_agree(server: str) -> None:
    ids = _post(server, "/tokenize", {"prompt": "Ray Serve runs"}).json()["tokens"]
    # What evaluation harnesses send: token ids, echo, no new tokens, logprobs.
    scored = _post(
        server, "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 1}
    )
    assert scored.status_code == 200, scored.text
    lp = scored.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(lp["tokens"][i] in lp["top_logprobs"][i] for i in range(1, len(ids)))

    # Greedy generation with logprobs: every generated token is the most likely one.
    body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    gen = _post(server, "/v1/completions", body).json()["choices"][0]
    glp = gen["logprobs"]
    assert len(glp["tokens"]) == len(glp["token_logprobs"]) > 0
    for tok, lp_, top in zip(
        glp["tokens"], glp["token_logprobs"], glp["top_logprobs"], strict=True
    ):
        assert len(top) >= 3 and lp_ == pytest.approx(max(top.values()), abs=1e-5), (tok, top)
    # Scoring the same greedy tokens again (echo) gives the same log-probabilities.
    same = _post(server, "/generate", {"prompt": "Ray Serve runs", "max_tokens": 6}).json()
    assert same["text"] == gen["text"]
    again = _post(
        server,
        "/v1/completions",
        {"prompt": ids + same["token_ids"], "echo": True, "max_tokens": 0, "logprobs": 0},
    ).json()["choices"][0]["logprobs"]["token_logprobs"][len(ids) :]
    assert again == pytest.approx(glp["token_logprobs"], abs=1e-4)

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    c = _post(server, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2})
    content = c.json()["choices"][0]["logprobs"]["content"]
    assert content and all(len(e["top_logprobs"]) == 2 for e in content)


def test_tokenize_detokenize_and_context_length(server: str) -> None:
    t = _post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == 256
    back = _post(server, "/detokenize", {"tokens": t["tokens"]}).json()["prompt"]
    assert back == "Hello world"
    chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > t["count"] - 2  # the chat template wraps the message
    model = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert model["max_model_len"] == 256


def test_streaming_is_incremental_and_matches_non_streaming(server: str) -> None:
    body = {"model": "tiny", "prompt": "Ray Serve", "max_tokens": 24, "temperature": 0}
    whole = _post(server, "/v1/completions", body).json()["choices"][0]
    events = _sse_events(_post(server, "/v1/completions", {**body, "stream": True}))
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    # Tokens arrive as separate events, and add up to the non-streamed answer.
    assert len([c for c in chunks if c["text"]]) > 1
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]


def test_stop_sequence(server: str) -> None:
    body = {"model": "tiny", "prompt": "Ray Serve", "max_tokens": 24, "temperature": 0}
    text = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
    stop = text[3:5]
    assert stop, text
    cut = _post(server, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    events = _sse_events(_post(server, "/v1/completions", {**body, "stop": stop, "stream": True}))
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == cut["text"]
    assert chunks[-1]["finish_reason"] == "stop"


def test_generate_matches_single_process_engine(server: str, tiny_model_dir: Path) -> None:
    from dsi_worker.engine import DistEnv, GenRequest, RankEngine, SamplingParams
    from dsi_worker.model_files import load_tokenizer

    r = _post(server, "/generate", {"prompt": "The quick brown fox", "max_tokens": 10})
    assert r.status_code == 200, r.text
    got = r.json()
    eng = RankEngine(str(tiny_model_dir), dtype="float32", device="cpu", dist_env=DistEnv())
    eng.start()
    prompt = tuple(load_tokenizer(str(tiny_model_dir))("The quick brown fox")["input_ids"])
    want = eng.generate([GenRequest(prompt, SamplingParams(max_new_tokens=10))])[0]
    # The TP=2 group behind Serve produces the unsharded model's greedy tokens.
    assert tuple(got["token_ids"]) == want.token_ids


ERRORS = [
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_NEW + 1}, 400, "max_tokens"),
    # The tiny tokenizer makes "x " two tokens; its context is 256.
    ("/v1/completions", {"prompt": "x " * 120, "max_tokens": 20}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x " * 200, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 2, "stream": True}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": [1, 999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2, "stream": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema"},
        },
        400,
        "response_format",
    ),
    ("/tokenize", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/generate", {"prompt": ""}, 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERRORS)
def test_validation_errors(server: str, path: str, body: dict, status: int, param: str) -> None:
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert param in err["message"]


def test_invalid_json(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", content=b"{nope", timeout=10)
    assert r.status_code == 400


def test_concurrent_requests_are_batched_and_balanced(server: str) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(
                *[
                    c.post(f"{server}/generate", json={"prompt": f"n{i}", "max_tokens": 16})
                    for i in range(16)
                ]
            )

    rs = asyncio.run(burst())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    sizes = [r.json()["batch_size"] for r in rs]
    groups = {r.json()["group"] for r in rs}
    assert max(sizes) > 1, sizes
    assert groups == set(range(NUM_GROUPS)), groups
    metrics = httpx.get(f"{server}/metrics").text
    assert "dsi_batch_size_bucket" in metrics
    assert 'dsi_requests_total{endpoint="generate",status="200"}' in metrics


def test_concurrent_streams(server: str) -> None:
    async def one(c: httpx.AsyncClient, i: int) -> list[str]:
        body = {"model": "tiny", "prompt": f"stream {i}", "max_tokens": 12, "stream": True}
        async with c.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            return [line async for line in r.aiter_lines() if line.startswith("data: ")]

    async def burst() -> list[list[str]]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[one(c, i) for i in range(8)])

    for lines in asyncio.run(burst()):
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] in ("length", "stop")


def test_dropped_streams_leave_their_batch_serving(server: str) -> None:
    """Clients that hang up after the first chunk (their rows still run to the end of the
    batch) do not disturb the streams batched with them, nor later requests."""

    async def one(c: httpx.AsyncClient, i: int, drop: bool) -> list[str]:
        body = {"model": "tiny", "prompt": f"drop {i}", "max_tokens": MAX_NEW, "stream": True}
        lines = []
        async with c.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if drop:
                        break
        return lines

    async def burst() -> list[list[str]]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[one(c, i, drop=i % 2 == 0) for i in range(8)])

    for i, lines in enumerate(asyncio.run(burst())):
        if i % 2:
            assert lines[-1] == "data: [DONE]", lines
    r = _post(server, "/generate", {"prompt": "after the drops", "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_openai_client(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=5)
    assert c.choices[0].text is not None and c.usage and c.usage.completion_tokens > 0
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    assert "max_tokens" in str(ei.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)


def _groups(url: str) -> dict[int, dict[str, Any]]:
    return {g["group"]: g for g in _health(url).json()["groups"]}


def _kill_rank(name: str) -> None:
    import ray
    from dsi_worker.group import RANK_NAMESPACE

    ray.kill(ray.get_actor(name, namespace=RANK_NAMESPACE))


def test_killed_rank_reforms_its_group_only(server: str) -> None:
    before = _groups(server)
    _kill_rank(before[0]["ranks"][1])
    # Health fails while group 0 re-forms...
    wait_for(lambda: _health(server).status_code == 503, 60, "healthz to fail", interval=0.5)
    # ...and the other group keeps serving meanwhile.
    r = _post(server, "/generate", {"prompt": "still here", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["group"] == 1
    # Group 0 comes back as a new epoch; group 1 was never restarted.
    wait_for(lambda: _health(server).status_code == 200, FORM_DEADLINE_S, "healthz to recover")
    after = _groups(server)
    assert after[0]["epoch"] != before[0]["epoch"]
    assert after[1]["epoch"] == before[1]["epoch"]
    wait_for(
        lambda: (
            _post(server, "/generate", {"prompt": "again", "max_tokens": 4}).json()["group"] == 0
        ),
        60,
        "a request on the re-formed group 0",
        interval=0.2,
    )
    metrics = httpx.get(f"{server}/metrics").text
    assert 'dsi_group_restarts_total{group="0"} 1.0' in metrics


def test_all_groups_down_answers_503_with_retry_after(server: str) -> None:
    for st in _groups(server).values():
        _kill_rank(st["ranks"][0])

    def unavailable() -> httpx.Response | None:
        r = _post(server, "/generate", {"prompt": "anyone?", "max_tokens": 4})
        return r if r.status_code == 503 else None

    r = wait_for(unavailable, 60, "a 503", interval=0.5)
    assert int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "group_not_ready"
    wait_for(lambda: _health(server).status_code == 200, FORM_DEADLINE_S, "healthz to recover")
    r = _post(server, "/generate", {"prompt": "back", "max_tokens": 4})
    assert r.status_code == 200, r.text
