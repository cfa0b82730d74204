"""OpenAI-style request validation, response shapes and SSE framing (pure, no Ray/torch)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
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


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Not in OpenAI's schema but common (vLLM): 0 or -1 = off.
    top_k: int = Field(0, ge=-1)
    n: int = 1
    stream: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> list[str]:
        """Stop sequences as a list (empty strings dropped)."""
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class CompletionRequest(_Sampling):
    """POST /v1/completions body (single prompt)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt is supported per request")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    def text(self) -> str:
        """The prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


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


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate ``body`` into ``model``; a 400 ApiError names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}", param=param) from None


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
    prompt_tokens: int, max_tokens: int | None, limits: Limits, *, param: str = "max_tokens"
) -> int:
    """Return the effective max_tokens, or raise 400 naming the field that is too large."""
    if prompt_tokens >= limits.max_model_len:
        raise ApiError(
            400,
            f"prompt is {prompt_tokens} tokens; the model's context is {limits.max_model_len}",
            param="prompt",
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


def completion_response(
    rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """``text_completion`` object."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
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
    rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """``chat.completion`` object."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
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


def models_response(model: str, created: int) -> dict[str, Any]:
    """GET /v1/models body."""
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "dsi"}],
    }


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
