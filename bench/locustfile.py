"""Locust user for the OpenAI-style API: streaming ``/v1/completions``, closed loop.

    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s \\
        [--model NAME] [--max-tokens 32] [--records out.jsonl]

Each user sends one streaming completion (``"stream": true``, ``stream_options.include_usage``)
of a prompt from a fixed set, reads the server-sent events as they arrive and sends the next
request as soon as the stream ends. Besides locust's own ``POST /v1/completions`` entry (its
response time is the time to the response headers; a non-200 answer, a ``data: {"error": ...}``
event or a stream without ``[DONE]`` is a failure) it reports custom request types that show
up in locust's statistics and CSV files:

* ``TTFT``: time to the first chunk that carries text;
* ``ITL``: mean gap between consecutive text-carrying chunks of one response;
* ``E2E``: the whole request, until the stream closed (``response_length``: output tokens).

With ``--records PATH`` (or ``DSI_LOAD_RECORDS``) each request is also appended to PATH as a
JSON line (bench/bench_load.py computes exact percentiles from them). The model name comes from
``--model`` / ``DSI_LOAD_MODEL``, else from ``GET /v1/models``.
"""

from __future__ import annotations

import json
import random
import time
from typing import IO, Any

import gevent
from bench_load import parse_stream  # bench/ is on sys.path while locust imports this file
from locust import HttpUser, constant, events, task
from locust.env import Environment

PROMPTS = [
    "The quick brown fox",
    "DeepSpeed splits a large language model across GPUs",
    "Ray Serve batches concurrent requests and",
    "Kubernetes restarts the whole group when",
    "Hello, world! How are you today?",
    "What is the capital of France?",
    "Once upon a time, in a data center far away,",
    "Tensor parallelism means that",
]
REQUEST_TIMEOUT_S = 300

_records: IO[str] | None = None


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--model", default="", env_var="DSI_LOAD_MODEL", help="model name")
    parser.add_argument("--max-tokens", type=int, default=32, env_var="DSI_LOAD_MAX_TOKENS")
    parser.add_argument(
        "--records", default="", env_var="DSI_LOAD_RECORDS", help="per-request JSONL file"
    )


@events.init.add_listener
def _refresh_loop_clock(**_: Any) -> None:
    # --run-time is a gevent timer relative to the event loop's cached time, which is as old
    # as the imports before it (seconds on a busy machine): the run would end that much early.
    gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def _open_records(environment: Environment, **_: Any) -> None:
    global _records
    path = environment.parsed_options.records if environment.parsed_options else ""
    if path:
        _records = open(path, "a", buffering=1)  # closed at test_stop


@events.test_stop.add_listener
def _close_records(environment: Environment, **_: Any) -> None:
    global _records
    if _records is not None:
        _records.close()
        _records = None


class CompletionsUser(HttpUser):
    """One client in a closed loop of streaming completions."""

    wait_time = constant(0)

    def on_start(self) -> None:
        """Pick the model: the command line's, else the first one the server lists."""
        opts = self.environment.parsed_options
        self.model: str = opts.model if opts else ""
        self.max_tokens: int = opts.max_tokens if opts else 32
        if not self.model:
            with self.client.get("/v1/models", name="/v1/models", catch_response=True) as r:
                self.model = r.json()["data"][0]["id"] if r.status_code == 200 else "default"

    def _fire(self, kind: str, seconds: float | None, length: int = 0) -> None:
        if seconds is not None:
            self.environment.events.request.fire(
                request_type=kind,
                name="/v1/completions",
                response_time=seconds * 1000,
                response_length=length,
                exception=None,
                context={},
            )

    @task
    def stream_completion(self) -> None:
        """One streaming completion; timings to locust's statistics and the records file."""
        body = {
            "model": self.model,
            "prompt": random.choice(PROMPTS),
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.time()
        t0 = time.perf_counter()
        lines: list[tuple[float, str]] = []
        with self.client.post(
            "/v1/completions",
            json=body,
            stream=True,
            catch_response=True,
            timeout=REQUEST_TIMEOUT_S,
            name="/v1/completions",
        ) as resp:
            status = resp.status_code
            try:
                if status == 200:
                    for line in resp.iter_lines(decode_unicode=True):
                        lines.append((time.perf_counter(), line))
            except Exception as e:  # connection dropped mid-stream
                lines.append((time.perf_counter(), f"data: {json.dumps({'error': repr(e)})}"))
            result = parse_stream(lines, t0, time.perf_counter())
            if status != 200:
                result.ok, result.error = False, f"HTTP {status}: {(resp.text or '')[:200]}"
            if result.ok:
                resp.success()
                self._fire("TTFT", result.ttft_s)
                self._fire("ITL", result.itl_s)
                self._fire("E2E", result.latency_s, result.output_tokens)
            else:
                resp.failure(result.error)
        if _records is not None:
            rec = {"start": start, "end": time.time(), "status": status, **vars(result)}
            _records.write(json.dumps(rec) + "\n")
