"""The Serve application: OpenAI-style HTTP ingress in front of ``num_groups`` TP groups.

``build_app`` is the import path the operator's RayService points at
(``dsi_worker.app:build_app``) with the app args as a dict.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request``
# annotation on the routes of the pickled ingress class.

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from dsi_worker import protocol as P
from dsi_worker.config import AppArgs, parse_args, parse_ingress_config
from dsi_worker.engine import GenRequest, SamplingParams, TokenScore
from dsi_worker.group import Group
from dsi_worker.metrics import Metrics
from dsi_worker.model_files import context_len, load_tokenizer, resolve_model_path
from dsi_worker.ports import free_port
from dsi_worker.results import Generated, GroupReply, GroupUnavailable, Scored

log = logging.getLogger("ray.serve")

RETRY_AFTER_S = 5
# Retry-After of a 429: the ingress was full a moment ago, not down.
BUSY_RETRY_AFTER_S = 1
# Ingress replica slots beyond the admission limit: probes, /metrics and the 429s themselves
# must not queue in the proxy behind admitted requests.
INGRESS_HEADROOM = 64
STATUS_TIMEOUT_S = 3.0
STATUS_PERIOD_S = 1.0
# How long a group keeps its last known state while its status calls time out.
STATUS_STALE_S = 30.0

api = FastAPI(title="dsi-worker", description="DeepSpeed tensor-parallel inference")

#: The JSON body of each POST route. The routes read the raw request (to bound its size and
#: word every error OpenAI's way), so FastAPI cannot see these; they are published in
#: /openapi.json by :func:`_openapi` for clients and schema-driven fuzzers.
BODY_MODELS: dict[str, type[Any]] = {
    "/v1/completions": P.CompletionRequest,
    "/v1/chat/completions": P.ChatRequest,
    "/generate": P.GenerateRequest,
    "/tokenize": P.TokenizeRequest,
    "/detokenize": P.DetokenizeRequest,
}


def _openapi() -> dict[str, Any]:
    """FastAPI's OpenAPI document plus the request bodies of :data:`BODY_MODELS`."""
    if api.openapi_schema:
        return api.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(
        title=api.title, version=api.version, description=api.description, routes=api.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in BODY_MODELS.items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    api.openapi_schema = doc
    return doc


api.openapi = _openapi  # type: ignore[method-assign]


def _error(e: P.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown route (404), wrong method (405): OpenAI's error shape, not FastAPI's."""
    msg = f"{exc.detail}: {request.method} {request.url.path}"
    err = P.ApiError(exc.status_code, msg, code=exc.detail.lower().replace(" ", "_"))
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


def _too_large(limit: int) -> P.ApiError:
    return P.ApiError(
        413, f"request body is over this server's limit of {limit} bytes", code="body_too_large"
    )


def _busy(limit: int) -> P.ApiError:
    return P.ApiError(
        429,
        f"server busy: {limit} requests in flight (max_inflight_requests); retry later",
        type_="rate_limit_error",
        code="server_busy",
        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
    )


async def _read_json(request: Request, limit: int) -> Any:
    """The JSON body, read up to ``limit`` bytes: 413 past it, 400 if not JSON (or UTF-8)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _too_large(limit)
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise P.ApiError(400, f"request body is not valid JSON: {str(e)[:120]}") from None


def _timeout(seconds: float) -> P.ApiError:
    return P.ApiError(
        504, f"request timed out after {seconds:g}s", type_="timeout", code="request_timeout"
    )


@dataclass
class _Run:
    """A generation under way on a group: the whole answer (``gen`` None), or an open stream
    (``gen`` the Serve response generator) and its first step."""

    group: int
    gen: Any
    first: Generated
    deadline: float


@dataclass
class _Job:
    """A validated completions or chat request, reduced to what generation and the answer's
    shape need; both endpoints then go through one path (``Ingress._respond``)."""

    prompts: list[list[int]]  # token ids of each prompt
    max_new: list[int]  # per prompt
    body: P._Sampling
    #: (choices, prompt tokens, completion tokens) -> the JSON answer
    answer: Callable[[list[P.Choice], int, int], dict[str, Any]] | None = None
    #: (text delta, finish_reason) -> one SSE chunk
    chunk: Callable[[str, str | None], dict[str, Any]] | None = None
    #: (prompt tokens, completion tokens) -> the usage chunk ``include_usage`` asks for
    usage_chunk: Callable[[int, int], dict[str, Any]] | None = None
    #: SSE frames sent before the first delta
    head: list[dict[str, Any]] = field(default_factory=list)
    #: alternatives per token for log-probabilities (None: no log-probabilities)
    top_k: int | None = None
    #: the prompt is part of the answer's text (and of its log-probabilities)
    echo: bool = False
    #: scored tokens -> the endpoint's ``logprobs`` object
    shape: Callable[[list[P.ScoredToken]], dict[str, Any]] | None = None


def _unavailable(why: str) -> P.ApiError:
    return P.ApiError(
        503,
        f"no tensor-parallel group is ready ({why}); retry later",
        type_="service_unavailable",
        code="group_not_ready",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


# Helpers the ingress uses are defined above it: @serve.ingress pickles the FastAPI app
# (and the methods' globals) when the class is decorated.
async def _await(resp: Any) -> Any:
    return await resp


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1024,
)
@serve.ingress(api)
class Ingress:
    """HTTP front: validates, tokenises, balances across groups, shapes OpenAI answers."""

    def __init__(
        self, args: dict[str, Any], model_path: str, *groups: DeploymentHandle[Any]
    ) -> None:
        self.args: AppArgs = parse_args(args)
        self.api_key = P.api_key_from_env(self.args.api_key_env, os.environ)
        self.groups = list(groups)
        #: Groups 0..n-1 are switched on (``user_config``); without one, all of them.
        self.active_groups = len(self.groups)
        self.tokenizer = load_tokenizer(model_path, revision=self.args.revision)
        self.limits = P.Limits(
            served_model_name=self.args.model_name(),
            max_new_tokens=self.args.max_new_tokens,
            max_model_len=self.args.max_model_len
            or context_len(model_path, revision=self.args.revision),
        )
        self.created = int(time.time())
        self.metrics = Metrics()
        self.metrics.groups_total.set(len(self.groups))
        self.states: dict[int, dict[str, Any]] = {}
        self.epochs: dict[int, str] = {}
        self.inflight: dict[int, int] = {g: 0 for g in range(len(self.groups))}
        self.metrics.track_inflight(self.inflight)
        self.counter = 0
        self.active = 0  # requests in _handle (admission)
        self._poller: asyncio.Task[None] | None = None
        self._status_lock = asyncio.Lock()
        self.status_seen: dict[int, float] = {}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's ``user_config`` hook: ``{"active_groups": n}`` routes to groups 0..n-1
        only and counts only them for readiness (/healthz, metrics); the others are switched
        off (their pods gone). Without a ``user_config`` every group counts. A bad config
        raises ``ValueError`` naming the key, before anything changes."""
        n = parse_ingress_config(user_config, len(self.groups)).active_groups
        if n != self.active_groups:
            log.info("ingress: groups 0..%d active (of %d)", n - 1, len(self.groups))
        self.active_groups = n
        self.states = {g: st for g, st in self.states.items() if g < n}
        for g in [g for g in self.epochs if g >= n]:
            del self.epochs[g]  # switched back on later: a new epoch, not a restart
        self.metrics.groups_total.set(n)
        self.metrics.groups_ready.set(len(self._ready_groups()))

    def _inflight_limit(self) -> int:
        """Requests admitted at once: ``max_inflight_requests``, else what the active groups
        accept together."""
        return self.args.max_inflight_requests or (
            max(self.active_groups, 1) * self.args.group_ongoing()
        )

    # -- group state ---------------------------------------------------------------------

    async def _status_of(self, g: int) -> dict[str, Any]:
        try:
            st: dict[str, Any] = await asyncio.wait_for(
                _await(self.groups[g].status.remote()), STATUS_TIMEOUT_S
            )
            self.status_seen[g] = time.monotonic()
        except TimeoutError:
            # A slow answer is not a dead group: while another group re-forms (loading a
            # model on the same CPUs) status calls can take seconds. Keep the last known
            # state for a while; a request to a group that really died fails fast and is
            # retried on another group.
            last = self.states.get(g)
            if last and time.monotonic() - self.status_seen.get(g, 0.0) < STATUS_STALE_S:
                return last
            st = {"group": g, "state": "unreachable", "error": "TimeoutError"}
        except Exception as e:  # replica restarting or dead: not ready
            st = {"group": g, "state": "unreachable", "error": type(e).__name__}
        epoch = st.get("epoch")
        if st.get("state") == "inactive":
            self.epochs.pop(g, None)  # switched on again later: a new epoch, not a restart
        elif epoch:
            old = self.epochs.get(g)
            if old is not None and old != epoch:
                self.metrics.group_restarts.labels(group=str(g)).inc()
            self.epochs[g] = epoch
        return st

    async def _refresh(self) -> None:
        async with self._status_lock:
            sts = await asyncio.gather(*[self._status_of(g) for g in range(self.active_groups)])
            # reconfigure() may have switched groups off meanwhile.
            self.states = {g: st for g, st in enumerate(sts) if g < self.active_groups}
            self.metrics.groups_ready.set(len(self._ready_groups()))

    async def _poll(self) -> None:
        while True:
            try:
                await self._refresh()
            except Exception:  # keep polling whatever happens
                log.exception("group status poll failed")
            await asyncio.sleep(STATUS_PERIOD_S)

    async def _ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        if not self.states:
            await self._refresh()

    def _ready_groups(self) -> list[int]:
        return [g for g, st in sorted(self.states.items()) if st.get("state") == "ready"]

    # -- generation ----------------------------------------------------------------------

    def _states_text(self) -> str:
        text = ", ".join(f"group-{k}: {st.get('state')}" for k, st in sorted(self.states.items()))
        return text or "no status yet"

    def _alone(self, calls: int) -> bool:
        """Whether a request about to make ``calls`` generate calls is the only one under
        way here: then the group starts its batch at once instead of waiting
        ``batch_wait_timeout_s`` for requests that are not coming."""
        return calls == 1 and self.active == 1

    async def _dispatch(
        self, prompt_ids: list[int], params: SamplingParams, stream: bool, alone: bool = False
    ) -> _Run:
        """Start a generation on a ready group and wait for its answer (or, streaming, its
        first step). 503 when no group is ready, 504 past the request timeout: before the
        first token these are proper HTTP answers; later stream errors become SSE events.
        ``alone``: see :meth:`_alone`."""
        req = GenRequest(tuple(prompt_ids), params)

        def start(h: Any) -> Any:
            if stream:
                return h.options(stream=True).generate_stream.remote(req, alone)
            return h.generate.remote(req, alone)

        g, call, reply, deadline = await self._on_a_group(start, stream)
        assert isinstance(reply, Generated)
        self.metrics.batch_size.observe(reply.batch_size)
        return _Run(g, call if stream else None, reply, deadline)

    async def _score(self, seqs: list[list[int]], top_k: int) -> Scored:
        """Log-probabilities of every token of each sequence, from any ready group."""
        seqs_t = [tuple(ids) for ids in seqs]
        _, _, reply, _ = await self._on_a_group(lambda h: h.score.remote(seqs_t, top_k), False)
        assert isinstance(reply, Scored)
        return reply

    async def _on_a_group(
        self, start: Callable[[Any], Any], stream: bool
    ) -> tuple[int, Any, Any, float]:
        """Run ``start(handle)`` on a ready group and await its reply (streaming: the first
        item); a group that turns out unavailable is marked and another one tried.
        Returns (group, the call, reply, deadline); a stream's group stays counted in flight."""
        await self._ensure_polling()
        deadline = time.monotonic() + self.args.request_timeout_s
        tried: set[int] = set()
        refreshed = False
        while True:
            ready = [g for g in self._ready_groups() if g not in tried]
            g = P.choose_group(ready, self.inflight, self.counter)
            self.counter += 1
            if g is None and not refreshed:
                # The polled states lag up to STATUS_PERIOD_S: during a rollout the group
                # that just formed may not show as ready yet when the last ready one goes.
                # Ask every group once more before answering 503.
                refreshed = True
                await self._refresh()
                continue
            if g is None:
                raise _unavailable(self._states_text())
            left = deadline - time.monotonic()
            if left <= 0:
                raise _timeout(self.args.request_timeout_s)
            call = start(self.groups[g])
            first = call.__anext__() if stream else _await(call)
            self.inflight[g] += 1
            try:
                reply = await asyncio.wait_for(first, left)
            except TimeoutError:
                self.inflight[g] -= 1
                call.cancel()
                raise _timeout(self.args.request_timeout_s) from None
            except Exception as e:  # the group's replica died under us, or ended without output
                reply = GroupUnavailable("unreachable", str(e)[:200])
            if isinstance(reply, GroupUnavailable):
                self.inflight[g] -= 1
                if g < self.active_groups:
                    self.states[g] = {**self.states.get(g, {}), "state": reply.state}
                tried.add(g)
                continue
            if not stream:
                self.inflight[g] -= 1
            return g, call, reply, deadline

    def _params(self, body: P._Sampling, max_new: int, seed: int | None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=seed,
        )

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text

    async def _complete(
        self, ids: list[int], max_new: int, body: P._Sampling, seed: int | None, alone: bool
    ) -> tuple[str, str, Generated]:
        """Generate a whole answer: (text after stop sequences, finish reason, raw reply)."""
        if max_new == 0:  # echo of the prompt only: nothing to generate
            return "", "length", Generated([], "length", 0, -1, "")
        run = await self._dispatch(ids, self._params(body, max_new, seed), False, alone)
        out = run.first
        text, stopped = P.apply_stop(self._decode(out.token_ids), body.stops())
        finish = "stop" if stopped else (out.finish_reason or "length")
        self.metrics.prompt_tokens.inc(len(ids))
        self.metrics.generated_tokens.inc(len(out.token_ids))
        return text, finish, out

    async def _choices(
        self, job: _Job, prompts: list[list[int]], outs: list[tuple[str, str, Generated]]
    ) -> list[P.Choice]:
        """The answer's choices, with the prompt echoed and log-probabilities when asked."""
        scored = None
        if job.top_k is not None:
            seqs = [ids + out.token_ids for ids, (_, _, out) in zip(prompts, outs, strict=True)]
            scored = (await self._score(seqs, job.top_k)).sequences
        choices = []
        for i, (ids, (text, finish, _)) in enumerate(zip(prompts, outs, strict=True)):
            logprobs = None
            if scored is not None and job.shape is not None:
                first = 0 if job.echo else len(ids)
                logprobs = job.shape([self._scored_token(t) for t in scored[i][first:]])
            choices.append(
                P.Choice(self._decode(ids) + text if job.echo else text, finish, logprobs)
            )
        return choices

    def _scored_token(self, t: TokenScore) -> P.ScoredToken:
        top = [(self._decode([tid]), lp) for tid, lp in t.top]
        return self._decode([t.token_id]), t.logprob, top

    async def _respond(self, job: _Job) -> Response:
        """The one answer path of completions and chat: JSON with every choice (prompts x n,
        generated concurrently so they batch), or an SSE stream of the single choice."""
        assert job.answer is not None and job.chunk is not None
        body, seeds = job.body, job.body.choice_seeds()
        if not body.stream:
            alone = self._alone(len(job.prompts) * len(seeds))
            outs = await asyncio.gather(
                *[
                    self._complete(ids, mx, body, seed, alone)
                    for ids, mx in zip(job.prompts, job.max_new, strict=True)
                    for seed in seeds
                ]
            )
            prompt_tokens = sum(len(ids) for ids in job.prompts)
            done = sum(len(out.token_ids) for _, _, out in outs)
            prompts = [ids for ids in job.prompts for _ in seeds]  # aligned with outs
            choices = await self._choices(job, prompts, list(outs))
            return JSONResponse(job.answer(choices, prompt_tokens, done))
        ids = job.prompts[0]
        params = self._params(body, job.max_new[0], seeds[0])
        run = await self._dispatch(ids, params, True, self._alone(1))
        usage = job.usage_chunk if body.include_usage() else None
        frames = self._sse(run, len(ids), body.stops(), job.head, job.chunk, usage)
        return StreamingResponse(frames, media_type="text/event-stream")

    async def _sse(
        self,
        stream: _Run,
        prompt_tokens: int,
        stops: list[str],
        head: list[dict[str, Any]],
        chunk: Any,
        usage: Callable[[int, int], dict[str, Any]] | None = None,
    ) -> AsyncIterator[str]:
        """SSE frames as tokens arrive: text deltas, a final chunk, then ``[DONE]``."""
        tokens: list[int] = []
        sent = ""
        finish: str | None = None
        stopped = False
        # Text that could be the start of a stop sequence is held back until it is not.
        hold = max((len(s) for s in stops), default=1) - 1
        item: GroupReply = stream.first
        try:
            for h in head:
                yield P.sse(h)
            while True:
                if isinstance(item, GroupUnavailable):
                    msg = f"generation failed: {item.describe()}"
                    yield P.sse(P.ApiError(503, msg, type_="server_error").body())
                    break
                tokens.extend(item.token_ids)
                finish = item.finish_reason or finish
                text, stopped = P.apply_stop(self._decode(tokens), stops)
                if stopped:
                    finish = "stop"
                safe = text
                if finish is None:
                    # A byte-level token may end inside a character: wait for the rest.
                    safe = text.rstrip("\ufffd")
                    safe = safe[: len(safe) - hold] if hold else safe
                if len(safe) > len(sent) and safe.startswith(sent):
                    yield P.sse(chunk(safe[len(sent) :], None))
                    sent = safe
                if finish is not None:
                    break
                left = stream.deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(stream.gen.__anext__(), max(left, 0.001))
                except StopAsyncIteration:
                    finish = "length"
                    break
                except TimeoutError:
                    yield P.sse(_timeout(self.args.request_timeout_s).body())
                    break
                except Exception as e:
                    item = GroupUnavailable("unreachable", str(e)[:200])
            if finish is not None:
                yield P.sse(chunk("", finish))
                if usage is not None:
                    yield P.sse(usage(prompt_tokens, len(tokens)))
            yield P.SSE_DONE
        finally:
            self.inflight[stream.group] -= 1
            if finish is None or stopped:
                stream.gen.cancel()
            self.metrics.prompt_tokens.inc(prompt_tokens)
            self.metrics.generated_tokens.inc(len(tokens))

    async def _handle(self, endpoint: str, request: Request, fn: Any) -> Response:
        t0 = time.monotonic()
        status = 500
        admitted = False
        try:
            self._authorize(request)
            if self.active >= self._inflight_limit():
                raise _busy(self._inflight_limit())
            self.active += 1
            admitted = True
            body = await _read_json(request, self.args.max_request_bytes)
            resp: Response = await fn(body)
            status = resp.status_code
            return resp
        except P.ApiError as e:
            status = e.status
            return _error(e)
        finally:
            if admitted:
                self.active -= 1
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            if status < 400:
                self.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - t0)

    def _authorize(self, request: Request) -> None:
        if self.api_key is not None:
            P.check_bearer(request.headers.get("authorization"), self.api_key)

    def _encode(self, text: str, *, special: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        return ids

    # -- routes --------------------------------------------------------------------------

    def _prompt_ids(self, prompt: P.Prompt) -> list[int]:
        """Token ids of a text prompt, or the given ids after a range check."""
        if isinstance(prompt, str):
            return self._encode(prompt)
        vocab = len(self.tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            msg = f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})"
            raise P.ApiError(400, msg, param="prompt")
        return list(prompt)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """OpenAI completions: one or more prompts (text or token ids), ``n`` choices each,
        ``stream`` for a single choice."""

        async def run(raw: Any) -> Response:
            body: P.CompletionRequest = P.parse_request(P.CompletionRequest, raw)
            P.check_model(body.model, self.limits)
            prompts = [self._prompt_ids(p) for p in body.prompts()]
            P.check_choices(body, len(prompts), body.best_of)
            top_k = P.check_scoring(body)
            max_new = [P.check_lengths(len(ids), body.max_tokens, self.limits) for ids in prompts]
            rid, name = P.new_id("cmpl"), self.limits.served_model_name
            job = _Job(
                prompts,
                max_new,
                body,
                answer=lambda cs, np, nc: P.completion_response(rid, name, cs, np, nc),
                chunk=lambda d, f: P.completion_chunk(rid, name, d, f),
                usage_chunk=lambda np, nc: P.usage_chunk(rid, name, "text_completion", np, nc),
                top_k=top_k,
                echo=body.echo,
                shape=P.completion_logprobs,
            )
            return await self._respond(job)

        return await self._handle("completions", request, run)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI chat completions (``n`` choices; ``stream`` for a single choice)."""

        async def run(raw: Any) -> Response:
            body: P.ChatRequest = P.parse_request(P.ChatRequest, raw)
            P.check_model(body.model, self.limits)
            P.check_choices(body, 1)
            top_k = P.check_scoring(body)
            prompt_ids = self._chat_prompt(body.messages)
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            max_new = P.check_lengths(
                len(prompt_ids), body.max_new(), self.limits, param=param, prompt_param="messages"
            )
            rid, name = P.new_id("chatcmpl"), self.limits.served_model_name
            obj = "chat.completion.chunk"
            job = _Job(
                [prompt_ids],
                [max_new],
                body,
                answer=lambda cs, np, nc: P.chat_response(rid, name, cs, np, nc),
                chunk=lambda d, f: P.chat_chunk(rid, name, {"content": d} if d else {}, f),
                usage_chunk=lambda np, nc: P.usage_chunk(rid, name, obj, np, nc),
                head=[P.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None)],
                top_k=top_k,
                shape=P.chat_logprobs,
            )
            return await self._respond(job)

        return await self._handle("chat", request, run)

    def _chat_prompt(
        self, messages: list[P.ChatMessage], generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a chat: the tokenizer's chat template, else a plain transcript."""
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
            return self._encode(prompt, special=False)
        return self._encode(P.simple_chat_prompt([(m["role"], m["content"]) for m in msgs]))

    @api.post("/generate")
    async def generate(self, request: Request) -> Response:
        """Simple form: ``{"prompt", "max_tokens"}`` -> ``{"text", ...}`` (greedy default)."""

        async def run(raw: Any) -> Response:
            body: P.GenerateRequest = P.parse_request(P.GenerateRequest, raw)
            P.check_model(body.model, self.limits)
            prompt_ids = self._encode(body.prompt)
            max_new = P.check_lengths(len(prompt_ids), body.max_tokens, self.limits)
            t0 = time.monotonic()
            alone = self._alone(1)
            text, finish, out = await self._complete(prompt_ids, max_new, body, body.seed, alone)
            return JSONResponse(
                {
                    "text": text,
                    "token_ids": out.token_ids,
                    "finish_reason": finish,
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": len(out.token_ids),
                    "group": out.group,
                    "batch_size": out.batch_size,
                    "engine_s": out.engine_s,
                    "latency_s": time.monotonic() - t0,
                }
            )

        return await self._handle("generate", request, run)

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """vLLM's ``/tokenize``: a prompt or chat messages -> token ids, their count and the
        model's context length."""

        async def run(raw: Any) -> Response:
            body: P.TokenizeRequest = P.parse_request(P.TokenizeRequest, raw)
            P.check_model(body.model, self.limits)
            if (body.prompt is None) == (body.messages is None):
                raise P.ApiError(400, "prompt: give either prompt or messages", param="prompt")
            if body.messages is not None:
                ids = self._chat_prompt(body.messages, body.add_generation_prompt)
            else:
                ids = self._encode(body.prompt or "", special=body.add_special_tokens)
            limit = self.limits.max_model_len
            return JSONResponse({"count": len(ids), "max_model_len": limit, "tokens": ids})

        return await self._handle("tokenize", request, run)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        """vLLM's ``/detokenize``: token ids -> text."""

        async def run(raw: Any) -> Response:
            body: P.DetokenizeRequest = P.parse_request(P.DetokenizeRequest, raw)
            P.check_model(body.model, self.limits)
            return JSONResponse({"prompt": self._decode(self._prompt_ids(body.tokens))})

        return await self._handle("detokenize", request, run)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """The one served model."""
        try:
            self._authorize(request)
        except P.ApiError as e:
            return _error(e)
        limits = self.limits
        return JSONResponse(
            P.models_response(limits.served_model_name, self.created, limits.max_model_len)
        )

    @api.get("/healthz")
    async def healthz(self) -> Response:
        """200 only when every active group has formed; else 503 with Retry-After."""
        await self._ensure_polling()
        await self._refresh()
        groups = [
            {
                k: st.get(k)
                for k in ("group", "epoch", "state", "error", "ranks", "batches", "progress")
            }
            for _, st in sorted(self.states.items())
        ]
        ok = bool(groups) and all(st["state"] == "ready" for st in groups)
        body = {"status": "ok" if ok else "unavailable", "groups": groups}
        if ok:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        """Prometheus text format."""
        return PlainTextResponse(
            generate_latest(self.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST
        )


def build_app(args: dict[str, Any]) -> Application:
    """Serve app builder: ``import_path: dsi_worker.app:build_app`` with ``args``.

    Creates one ``group-<g>`` deployment per TP group and the ``ingress`` deployment.
    ``num_groups`` is the capacity: the serve config's per-deployment ``user_config``
    switches groups off and on without replacing any replica (see
    :class:`dsi_worker.config.GroupUserConfig` and :class:`~dsi_worker.config.IngressUserConfig`).
    """
    a = parse_args(args)
    model_path = resolve_model_path(a.model)
    if a.local_mode and a.local_master_ports is None:
        a = a.model_copy(update={"local_master_ports": [free_port() for _ in range(a.num_groups)]})
    d = a.model_dump()
    ongoing = a.group_ongoing()
    actor: dict[str, Any] = {"num_cpus": 0}
    if a.control_resource:
        actor["resources"] = {a.control_resource: 0.001}
    groups = [
        Group.options(  # type: ignore[attr-defined]
            name=f"group-{g}", max_ongoing_requests=ongoing, ray_actor_options=actor
        ).bind(d, g, model_path)
        for g in range(a.num_groups)
    ]
    ingress = Ingress.options(  # type: ignore[attr-defined]
        name="ingress",
        ray_actor_options=actor,
        max_ongoing_requests=a.inflight_limit() + INGRESS_HEADROOM,
    )
    return ingress.bind(d, model_path, *groups)  # type: ignore[no-any-return]
