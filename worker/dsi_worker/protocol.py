"""OpenAI-style request validation, response shapes and SSE framing (pure, no Ray/torch)."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SSE_DONE = "data: [DONE]\n\n"


class ApiError(Exception):
    """An error answered to the client in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


#: Most choices one request may ask for (prompts x n).
MAX_CHOICES = 32
#: Most alternatives per token ``logprobs`` / ``top_logprobs`` may ask for (vLLM's default).
MAX_LOGPROBS = 20


def check_bearer(authorization: str | None, key: str) -> None:
    """Raise a 401 in OpenAI's shape unless ``authorization`` is ``Bearer <key>``.

    Compared in constant time; the message never repeats what the client sent.
    """
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
        return
    msg = (
        "missing API key: send 'Authorization: Bearer <key>'"
        if not authorization
        else "invalid API key"
    )
    raise ApiError(
        401, msg, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="dsi"'}
    )


def api_key_from_env(name: str | None, environ: Mapping[str, str]) -> str | None:
    """The API key held in environment variable ``name`` (None: no authentication).

    Fails closed: a configured but empty variable is an error, not an open endpoint.
    """
    if name is None:
        return None
    key = environ.get(name, "").strip()
    if not key:
        raise ValueError(
            f"serve.apiKeySecret: environment variable {name} is empty or unset; "
            "the Secret key it comes from must hold a non-empty API key"
        )
    return key


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, strict=True)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Not in OpenAI's schema but common (vLLM): 0 or -1 = off.
    top_k: int = Field(0, ge=-1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    # Booleans are strict: "yes", "no" or 1 are refused, not read as true or false.
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"type {v.get('type')!r} is not supported; only 'text'")
        return v

    def stops(self) -> list[str]:
        """Stop sequences as a list (empty strings dropped)."""
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    def include_usage(self) -> bool:
        """A streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def choice_seeds(self) -> list[int | None]:
        """A seed per choice: with n > 1 each choice samples differently but reproducibly
        (``seed + i``); a batch would otherwise give every unseeded choice the same seed."""
        if self.n == 1:
            return [self.seed]
        base = self.seed if self.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4])
        return [(base + i) % 2**63 for i in range(self.n)]


Prompt = str | list[int]


class CompletionRequest(_Sampling):
    """POST /v1/completions body: one prompt or a list of them, as text or token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 is allowed with echo: score the prompt only (what evaluation harnesses send).
    max_tokens: int | None = Field(16, ge=0)
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, strict=True)

    @field_validator("prompt")
    @classmethod
    def _prompts(
        cls, v: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        prompts = _as_prompts(v)
        if not prompts:
            raise ValueError("give at least one prompt")
        if any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        if len(prompts) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} prompts per request")
        return v

    def prompts(self) -> list[Prompt]:
        """Every prompt: text, or token ids."""
        return _as_prompts(self.prompt)

    def text(self) -> str:
        """The first prompt as text (token-id prompts: empty)."""
        first = self.prompts()[0]
        return first if isinstance(first, str) else ""


def _as_prompts(v: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    if isinstance(v, str):
        return [v]
    out: list[Prompt] = []
    ids: list[int] = []
    for x in v:
        if isinstance(x, int):
            ids.append(x)  # a flat list of token ids is one prompt
        else:
            out.append(x if isinstance(x, str) else list(x))
    return [ids] if ids else out


class ChatMessage(BaseModel):
    """One chat message; ``content`` may be a string or OpenAI text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Content as plain text (text parts concatenated)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatRequest(_Sampling):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must not be empty")
        if not any(m.text() for m in v):
            raise ValueError("messages must contain some text")
        return v

    def max_new(self) -> int | None:
        """``max_completion_tokens`` wins over the older ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class GenerateRequest(_Sampling):
    """POST /generate: ``{"prompt": "...", "max_tokens": 16}``; greedy by default."""

    prompt: str
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("prompt must not be empty")
        return v


def check_choices(body: _Sampling, prompts: int, best_of: int | None = None) -> int:
    """The number of choices (prompts x n), or a 400 naming the field that cannot be met."""
    if best_of is not None and best_of != body.n:
        # best_of > n ranks candidates by log-probability, which the engine does not return.
        raise ApiError(400, f"best_of: must equal n ({body.n}) on this server", param="best_of")
    total = prompts * body.n
    if total > MAX_CHOICES:
        raise ApiError(
            400, f"n: {prompts} prompt(s) x n={body.n} is over {MAX_CHOICES} choices", param="n"
        )
    if body.stream and total > 1:
        raise ApiError(
            400, "stream: streaming supports one choice (one prompt, n=1)", param="stream"
        )
    return total


def check_scoring(body: CompletionRequest | ChatRequest) -> int | None:
    """How many alternatives per token to return (None: no log-probabilities), or a 400
    naming the field whose combination this server cannot serve."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        k = (body.top_logprobs or 0) if body.logprobs else None
    else:
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens: 0 is allowed only with echo", param="max_tokens")
        k = body.logprobs
    if k is not None and body.stream:
        raise ApiError(400, "logprobs: not available with stream yet", param="logprobs")
    if isinstance(body, CompletionRequest) and body.echo and body.stream:
        raise ApiError(400, "echo: not available with stream yet", param="echo")
    return k


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate ``body`` into ``model``; a 400 ApiError names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        param = _param(errors[0]["loc"])
        # A union (prompt: str | list[...]) fails once per member: say what each wanted.
        msgs = [err["msg"].removeprefix("Value error, ") for err in errors]
        same = [m for err, m in zip(errors, msgs, strict=True) if _param(err["loc"]) == param]
        msg = "; ".join(dict.fromkeys(same[:4]))
        raise ApiError(400, f"{param}: {msg}", param=param) from None


#: pydantic's names for a union's members in an error location (``prompt.str``).
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def _param(loc: tuple[int | str, ...]) -> str | None:
    """The field an error location names, without pydantic's union-member tags:
    ``('messages', 0, 'content', 'str')`` -> ``messages.0.content``."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, str) and (p in _UNION_TAGS or not p.isidentifier()):
            break
        parts.append(str(p))
    return ".".join(parts) or None


@dataclass(frozen=True)
class Limits:
    """Server-side caps applied to every request."""

    served_model_name: str
    max_new_tokens: int
    max_model_len: int


def check_model(requested: str | None, limits: Limits) -> None:
    """404 when the client names a model this server does not serve."""
    if requested is not None and requested != limits.served_model_name:
        raise ApiError(
            404,
            f"model {requested!r} does not exist; this server serves {limits.served_model_name!r}",
            param="model",
            code="model_not_found",
        )


def check_lengths(
    prompt_tokens: int,
    max_tokens: int | None,
    limits: Limits,
    *,
    param: str = "max_tokens",
    prompt_param: str = "prompt",
) -> int:
    """Return the effective max_tokens, or raise 400 naming the field that is too large
    (``prompt_param``: the field the prompt came from, ``messages`` for chat)."""
    if prompt_tokens >= limits.max_model_len:
        raise ApiError(
            400,
            f"{prompt_param}: the prompt is {prompt_tokens} tokens; "
            f"the model's context is {limits.max_model_len}",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        # Unset: as much as fits, within the cap.
        return min(limits.max_new_tokens, limits.max_model_len - prompt_tokens)
    if max_tokens > limits.max_new_tokens:
        raise ApiError(
            400,
            f"{param}={max_tokens} is over this server's cap of {limits.max_new_tokens}",
            param=param,
        )
    if prompt_tokens + max_tokens > limits.max_model_len:
        raise ApiError(
            400,
            f"prompt ({prompt_tokens} tokens) + {param} ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} is over the model's context of "
            f"{limits.max_model_len}",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop sequence; return (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def incremental_texts(decode: Callable[[list[int]], str], tokens: Sequence[int]) -> list[str]:
    """Split generated tokens into text deltas for streaming.

    A byte-level token can end inside a UTF-8 character; such a delta is held back (it
    decodes to U+FFFD) until the character completes, so clients never see broken text.
    """
    deltas: list[str] = []
    sent = ""
    for i in range(1, len(tokens) + 1):
        text = decode(list(tokens[:i]))
        if text.endswith("\ufffd") and i < len(tokens):
            continue
        if text.startswith(sent):
            delta, sent = text[len(sent) :], text
        else:  # decoding is not prefix-stable here: resend nothing, keep going
            delta, sent = "", text
        if delta:
            deltas.append(delta)
    return deltas


def new_id(prefix: str) -> str:
    """OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Choice:
    """One answer: its text, why it ended, and its log-probabilities in the endpoint's shape."""

    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None


def completion_response(
    rid: str,
    model: str,
    choices: Sequence[Choice],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """``text_completion`` object with one entry per choice."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_response(
    rid: str,
    model: str,
    choices: Sequence[Choice],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """``chat.completion`` object with one entry per choice."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk``."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


#: A scored token: (its text, its log-probability or None, the top alternatives as
#: (text, log-probability), most likely first).
ScoredToken = tuple[str, float | None, Sequence[tuple[str, float]]]


def completion_logprobs(tokens: Sequence[ScoredToken], offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, their log-probabilities, the top
    alternatives per token (the token itself included, as vLLM does) and text offsets."""
    offsets: list[int] = []
    for piece, _, _ in tokens:
        offsets.append(offset)
        offset += len(piece)
    tops: list[dict[str, float] | None] = []
    for piece, lp, top in tokens:
        tops.append(None if lp is None else {**dict(top), piece: lp})
    return {
        "tokens": [piece for piece, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tokens: Sequence[ScoredToken]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``content`` with each generated token, its bytes and
    its top alternatives."""

    def entry(piece: str, lp: float) -> dict[str, Any]:
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

    return {
        "content": [
            {**entry(piece, lp or 0.0), "top_logprobs": [entry(t, v) for t, v in top]}
            for piece, lp, top in tokens
        ]
    }


def usage_chunk(
    rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The last streamed chunk with ``stream_options.include_usage``: no choices, usage."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def models_response(model: str, created: int, max_model_len: int) -> dict[str, Any]:
    """GET /v1/models body (with the context length, as vLLM's model card has it)."""
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "dsi",
                "root": model,
                "max_model_len": max_model_len,
            }
        ],
    }


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a ``prompt``, or chat ``messages`` (then the chat
    template is applied)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, strict=True)
    add_generation_prompt: bool = Field(True, strict=True)

    @field_validator("messages")
    @classmethod
    def _some(cls, v: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if v is not None and not v:
            raise ValueError("messages must not be empty")
        return v


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape): token ids -> text."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def sse(obj: dict[str, Any]) -> str:
    """Frame one server-sent event."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def simple_chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """Fallback prompt for tokenizers without a chat template."""
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


def choose_group(ready: Sequence[int], inflight: dict[int, int], counter: int) -> int | None:
    """Pick the ready group with the fewest in-flight requests (ties: round robin)."""
    if not ready:
        return None
    least = min(inflight.get(g, 0) for g in ready)
    tied = [g for g in ready if inflight.get(g, 0) == least]
    return tied[counter % len(tied)]
