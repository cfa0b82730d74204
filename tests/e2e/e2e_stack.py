"""Helpers of the end-to-end tests: the served stack and HTTP calls to it."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsi_localcluster.harness import (
    OperatorProcess,
    get_dsi,
    install_crd,
    worker_pods,
)
from dsi_localcluster.wait import events, wait_for

_HERE = Path(__file__).resolve().parent

__all__ = [
    "Load",
    "OperatorProcess",
    "Stack",
    "background_load",
    "group_restarts",
    "install_crd",
    "post",
]

ROOT = _HERE.parents[1]
SAMPLE = ROOT / "examples" / "tiny-local.yaml"
NAME = "tiny"
PROMPT = "The quick brown fox"
MAX_TOKENS = 12
READY_TIMEOUT = float(os.environ.get("DSI_E2E_READY_TIMEOUT", "900"))


def post(url: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """POST JSON, return the parsed answer (raises urllib.error.HTTPError on 4xx/5xx)."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        answer: dict[str, Any] = json.loads(r.read())
    return answer


@dataclass
class Stack:
    """A served DeepSpeedInference on process-backed nodes."""

    kube: Any
    kubectl: Any
    namespace: str
    operator: OperatorProcess
    endpoint: str = ""
    name: str = NAME
    log_dir: Path = field(default_factory=Path)
    #: Every worker pod UID :meth:`pods` saw: what the teardown checks for leftovers.
    seen_uids: set[str] = field(default_factory=set)

    def dsi(self) -> dict[str, Any]:
        """The resource as a dict."""
        return get_dsi(self.kube.custom, self.namespace, self.name)

    def pods(self) -> dict[tuple[int, int], Any]:
        """{(group, rank): V1Pod} of the live worker pods (their UIDs are remembered)."""
        pods: dict[tuple[int, int], Any] = worker_pods(self.kube.core, self.namespace, self.name)
        self.seen_uids |= {p.metadata.uid for p in pods.values()}
        return pods

    def uids(self, group: int) -> set[str]:
        """UIDs of the live pods of one group."""
        return {p.metadata.uid for (g, _), p in self.pods().items() if g == group}

    def generate(self, prompt: str = PROMPT, timeout: float = 60) -> dict[str, Any]:
        """Greedy /generate through the operator-made endpoint."""
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        return post(f"{self.endpoint}/generate", body, timeout)

    def dump(self) -> str:
        """State for a failure message: status, pods, Events, operator log tail."""
        st = json.dumps(self.dsi().get("status", {}), indent=1)[:3000]
        pods = self.kubectl("get", "pods", "-n", self.namespace, "-o", "wide", check=False)
        evs = "\n".join(events(self.kube.core, self.namespace)[-20:])
        return f"status:\n{st}\npods:\n{pods.stdout}\nevents:\n{evs}\n{self.operator.log_tail()}"

    def restarts_total(self) -> int:
        """status.restarts: every group restart so far (it only grows, also when groups are
        scaled away, so it can exceed the sum of the groups' own counters)."""
        return int((self.dsi().get("status") or {}).get("restarts", 0))

    def wait_ready(self, timeout: float = READY_TIMEOUT, since_restarts: int = -1) -> None:
        """Until phase Ready (and, when given, :meth:`restarts_total` > since_restarts)."""

        def ready() -> bool:
            st = self.dsi().get("status") or {}
            return st.get("phase") == "Ready" and st.get("restarts", 0) > since_restarts

        wait_for(ready, timeout, f"{self.name} Ready", dump=self.dump, interval=2)

    def wait_answers(self, timeout: float = 120) -> dict[str, Any]:
        """Until /generate answers (Ready may precede the proxy's route table by a moment)."""

        def answer() -> dict[str, Any] | None:
            try:
                return self.generate(timeout=30)
            except (urllib.error.URLError, OSError):
                return None

        result: dict[str, Any] = wait_for(answer, timeout, "endpoint answers", dump=self.dump)
        return result


def group_restarts(stack: Stack) -> dict[int, int]:
    """status.groups[].restarts by group index."""
    groups = (stack.dsi().get("status") or {}).get("groups") or []
    return {int(g["index"]): int(g.get("restarts", 0)) for g in groups}


def _http_failure(e: urllib.error.HTTPError) -> str:
    """The status and who answered it: our error code (``group_not_ready``...) when the
    ingress did, else the start of the body (Ray Serve's proxy, a timeout...)."""
    body = e.read().decode(errors="replace")
    try:
        why = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        why = " ".join(body.split())[:40]
    return f"{e.code} {why}"


@dataclass
class Load:
    """Sequential /generate requests in a background thread: (time, ok, group or status)."""

    stack: Stack
    results: list[tuple[float, bool, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                out = self.stack.generate(timeout=20)
                self.results.append((t, True, out["group"]))
            except urllib.error.HTTPError as e:
                self.results.append((t, False, _http_failure(e)))
                time.sleep(0.2)
            except (urllib.error.URLError, OSError) as e:
                self.results.append((t, False, repr(e)))
                time.sleep(0.2)

    def ok_groups(self) -> set[int]:
        """Groups that answered."""
        return {g for _, ok, g in self.results if ok}

    def answered(self, group: int, since: float) -> bool:
        """Did ``group`` answer a request sent at or after ``since``?"""
        return any(ok and g == group and t >= since for t, ok, g in self.results)

    def ok_share(self) -> float:
        """Share of the requests that succeeded."""
        return sum(1 for _, ok, _ in self.results if ok) / max(len(self.results), 1)

    def summary(self) -> str:
        """One line: requests, successes, which groups answered, what the failures were."""
        ok = sum(1 for _, good, _ in self.results if good)
        bad = Counter(str(what)[:60] for _, good, what in self.results if not good)
        return f"{ok}/{len(self.results)} ok, groups {sorted(self.ok_groups())}, failed {dict(bad)}"


@contextmanager
def background_load(stack: Stack) -> Iterator[Load]:
    """Requests running while the body of the with-block injects a fault."""
    load = Load(stack)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        thread.join(timeout=30)
