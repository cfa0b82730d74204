"""Pure request/response logic of the worker (no Ray, no torch)."""

from __future__ import annotations

import json

import pytest
from dsi_worker import protocol as P
from dsi_worker.config import parse_args

pytestmark = pytest.mark.worker

LIMITS = P.Limits(served_model_name="m", max_new_tokens=32, max_model_len=100)


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (P.CompletionRequest, {"prompt": ""}, "prompt"),
        (P.CompletionRequest, {"prompt": ["a", ""]}, "prompt"),
        (P.CompletionRequest, {"prompt": []}, "prompt"),
        (P.CompletionRequest, {"prompt": ["x"] * 33}, "prompt"),
        (P.CompletionRequest, {"prompt": "x", "temperature": 2.5}, "temperature"),
        (P.CompletionRequest, {"prompt": "x", "temperature": -0.1}, "temperature"),
        (P.CompletionRequest, {"prompt": "x", "top_p": 0}, "top_p"),
        (P.CompletionRequest, {"prompt": "x", "top_p": 1.5}, "top_p"),
        (P.CompletionRequest, {"prompt": "x", "top_k": -2}, "top_k"),
        (P.CompletionRequest, {"prompt": "x", "n": 0}, "n"),
        (P.CompletionRequest, {"prompt": "x", "n": 33}, "n"),
        (P.CompletionRequest, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (
            P.ChatRequest,
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21},
            "top_logprobs",
        ),
        (
            P.ChatRequest,
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        (P.CompletionRequest, {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        (P.CompletionRequest, {}, "prompt"),
        (P.ChatRequest, {"messages": []}, "messages"),
        (P.ChatRequest, {"messages": [{"role": "user", "content": ""}]}, "messages"),
        (P.ChatRequest, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (P.GenerateRequest, {"prompt": ""}, "prompt"),
        # Wrong types: the field, never pydantic's union-member tag (prompt.str).
        (P.CompletionRequest, {"prompt": 123}, "prompt"),
        (P.CompletionRequest, {"prompt": [[1, "a"]]}, "prompt"),
        (P.CompletionRequest, {"prompt": "x", "stop": 5}, "stop"),
        (P.ChatRequest, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        # Strict booleans: "yes", "no", 1 are not read as true or false.
        (P.CompletionRequest, {"prompt": "x", "stream": "yes"}, "stream"),
        (P.CompletionRequest, {"prompt": "x", "echo": "no"}, "echo"),
        (P.CompletionRequest, {"prompt": "x", "echo": 1}, "echo"),
        (
            P.ChatRequest,
            {"messages": [{"role": "user", "content": "x"}], "logprobs": 1},
            "logprobs",
        ),
        (P.TokenizeRequest, {"prompt": "x", "add_special_tokens": "false"}, "add_special_tokens"),
    ],
)
def test_validation_names_the_field(model: type, body: dict, param: str) -> None:
    with pytest.raises(P.ApiError) as ei:
        P.parse_request(model, body)
    assert ei.value.status == 400
    assert ei.value.param == param
    assert param in ei.value.message


def test_non_object_body() -> None:
    with pytest.raises(P.ApiError):
        P.parse_request(P.CompletionRequest, ["x"])


def test_lengths() -> None:
    assert P.check_lengths(10, 5, LIMITS) == 5
    assert P.check_lengths(90, None, LIMITS) == 10  # what fits
    assert P.check_lengths(10, None, LIMITS) == 32  # the cap
    with pytest.raises(P.ApiError) as ei:
        P.check_lengths(10, 33, LIMITS)
    assert ei.value.param == "max_tokens" and "cap" in ei.value.message
    with pytest.raises(P.ApiError) as ei:
        P.check_lengths(80, 30, LIMITS)
    assert ei.value.code == "context_length_exceeded" and ei.value.param == "max_tokens"
    with pytest.raises(P.ApiError) as ei:
        P.check_lengths(100, 1, LIMITS)
    assert ei.value.param == "prompt"
    with pytest.raises(P.ApiError) as ei:
        P.check_lengths(100, 1, LIMITS, prompt_param="messages")
    assert ei.value.param == "messages" and ei.value.code == "context_length_exceeded"


def test_model_name() -> None:
    P.check_model(None, LIMITS)
    P.check_model("m", LIMITS)
    with pytest.raises(P.ApiError) as ei:
        P.check_model("gpt-4", LIMITS)
    assert ei.value.status == 404 and ei.value.param == "model"


def test_stop_and_increments() -> None:
    assert P.apply_stop("hello world", ["o w", "ld"]) == ("hell", True)
    assert P.apply_stop("hello", ["x"]) == ("hello", False)
    table = {1: b"h", 2: b"\xc3", 3: b"\xa9", 4: b"!"}

    def decode(ids: list[int]) -> str:
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    # The half character (0xc3) is held back until it completes.
    assert P.incremental_texts(decode, [1, 2, 3, 4]) == ["h", "é", "!"]


def test_shapes_and_sse() -> None:
    r = P.completion_response("id", "m", [P.Choice("t", "length"), P.Choice("u", "stop")], 3, 2)
    assert [c["index"] for c in r["choices"]] == [0, 1] and r["choices"][1]["text"] == "u"
    assert r["usage"]["total_tokens"] == 5
    c = P.chat_response("id", "m", [P.Choice("t", "stop")], 3, 2)
    assert c["choices"][0]["message"] == {"role": "assistant", "content": "t"}
    u = P.usage_chunk("id", "m", "chat.completion.chunk", 3, 2)
    assert u["choices"] == [] and u["usage"]["completion_tokens"] == 2
    m = P.models_response("m", 0, 256)["data"][0]
    assert m["max_model_len"] == 256 and m["root"] == "m"
    frame = P.sse(P.chat_chunk("id", "m", {"content": "x"}, None))
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    assert json.loads(frame[6:])["object"] == "chat.completion.chunk"
    assert P.SSE_DONE == "data: [DONE]\n\n"


def test_choose_group_balances() -> None:
    assert P.choose_group([], {}, 0) is None
    assert P.choose_group([0, 1], {0: 3, 1: 1}, 0) == 1
    picks = {P.choose_group([0, 1, 2], {}, i) for i in range(3)}
    assert picks == {0, 1, 2}


def test_app_args_errors_name_fields() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        parse_args({"tensor_parallel_size": 0})
    with pytest.raises(ValueError, match="dtype"):
        parse_args({"dtype": "int8"})
    with pytest.raises(ValueError, match="bogus"):
        parse_args({"bogus": 1})
    a = parse_args({"model": "facebook/opt-1.3b", "num_groups": 2})
    assert a.model_name() == "facebook/opt-1.3b" and a.num_groups == 2


def test_prompt_forms_and_choices() -> None:
    def req(**body: object) -> P.CompletionRequest:
        out: P.CompletionRequest = P.parse_request(P.CompletionRequest, body)
        return out

    assert req(prompt="a").prompts() == ["a"]
    assert req(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert req(prompt=[5, 6, 7]).prompts() == [[5, 6, 7]]
    assert req(prompt=[[5], [6, 7]]).prompts() == [[5], [6, 7]]
    assert req(prompt="a", logprobs=0, echo=True, response_format={"type": "text"})
    # choices: prompts x n; best_of must equal n; a stream has one choice
    assert P.check_choices(req(prompt=["a", "b"], n=3), 2) == 6
    with pytest.raises(P.ApiError) as ei:
        P.check_choices(req(prompt="a", n=2, best_of=4), 1, 4)
    assert ei.value.param == "best_of"
    with pytest.raises(P.ApiError) as ei:
        P.check_choices(req(prompt=["a"] * 20, n=2), 20)
    assert ei.value.param == "n"
    with pytest.raises(P.ApiError) as ei:
        P.check_choices(req(prompt="a", n=2, stream=True), 1)
    assert ei.value.param == "stream"
    # n > 1: a distinct, reproducible seed per choice
    assert req(prompt="a", n=3, seed=7).choice_seeds() == [7, 8, 9]
    assert len(set(req(prompt="a", n=3).choice_seeds())) == 3
    assert req(prompt="a", seed=7).choice_seeds() == [7]
    assert req(prompt="a", stream=True, stream_options={"include_usage": True}).include_usage()


def test_scoring_requests_and_logprob_shapes() -> None:
    def comp(**body: object) -> P.CompletionRequest:
        out: P.CompletionRequest = P.parse_request(P.CompletionRequest, body)
        return out

    def chat(**body: object) -> P.ChatRequest:
        out: P.ChatRequest = P.parse_request(
            P.ChatRequest, {"messages": [{"role": "user", "content": "x"}], **body}
        )
        return out

    assert P.check_scoring(comp(prompt="a")) is None
    assert P.check_scoring(comp(prompt="a", logprobs=3)) == 3
    assert P.check_scoring(comp(prompt="a", echo=True, max_tokens=0, logprobs=1)) == 1
    assert P.check_scoring(chat(logprobs=True, top_logprobs=2)) == 2
    assert P.check_scoring(chat(logprobs=True)) == 0
    assert P.check_scoring(chat()) is None
    for bad, param in [
        (comp(prompt="a", max_tokens=0), "max_tokens"),
        (comp(prompt="a", logprobs=1, stream=True), "logprobs"),
        (comp(prompt="a", echo=True, stream=True), "echo"),
        (chat(top_logprobs=2), "top_logprobs"),
    ]:
        with pytest.raises(P.ApiError) as ei:
            P.check_scoring(bad)
        assert ei.value.param == param

    toks: list[P.ScoredToken] = [("He", None, []), ("llo", -0.5, [("llo", -0.5), ("y", -2.0)])]
    lp = P.completion_logprobs(toks)
    assert lp["tokens"] == ["He", "llo"] and lp["token_logprobs"] == [None, -0.5]
    assert lp["top_logprobs"] == [None, {"llo": -0.5, "y": -2.0}]
    assert lp["text_offset"] == [0, 2]
    c = P.chat_logprobs(toks[1:])["content"][0]
    assert c["token"] == "llo" and c["bytes"] == list(b"llo") and len(c["top_logprobs"]) == 2


def test_bearer_key_checked_in_openai_shape_without_echoing_the_secret() -> None:
    P.check_bearer("Bearer s3cret", "s3cret")
    P.check_bearer("bearer  s3cret ", "s3cret")  # scheme is case-insensitive
    for header, message in [
        (None, "missing API key"),
        ("", "missing API key"),
        ("Bearer wrong-guess", "invalid API key"),
        ("Basic s3cret", "invalid API key"),
        ("s3cret", "invalid API key"),
    ]:
        with pytest.raises(P.ApiError) as err:
            P.check_bearer(header, "s3cret")
        e = err.value
        assert e.status == 401 and message in e.message
        assert e.body()["error"]["code"] == "invalid_api_key"
        assert e.headers["WWW-Authenticate"].startswith("Bearer")
        assert "s3cret" not in json.dumps(e.body()) and "wrong-guess" not in e.message


def test_api_key_from_env_fails_closed() -> None:
    assert P.api_key_from_env(None, {}) is None
    assert P.api_key_from_env("DSI_API_KEY", {"DSI_API_KEY": " k \n"}) == "k"
    for env in ({}, {"DSI_API_KEY": ""}, {"DSI_API_KEY": "  "}):
        with pytest.raises(ValueError, match=r"serve\.apiKeySecret: .*DSI_API_KEY"):
            P.api_key_from_env("DSI_API_KEY", env)


def test_api_key_env_arg_must_be_a_variable_name() -> None:
    assert parse_args({"api_key_env": "DSI_API_KEY"}).api_key_env == "DSI_API_KEY"
    with pytest.raises(ValueError, match="api_key_env"):
        parse_args({"api_key_env": "not a name"})
