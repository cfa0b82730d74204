"""Deadline-bound polling that says what it saw when it gives up."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """wait_for ran out of time. An AssertionError so pytest shows it as a test failure."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    dump: Callable[[], object] | None = None,
    interval: float = 0.25,
) -> T:
    """Poll predicate until it returns something truthy, and return that.

    On timeout raise WaitTimeout naming `what`, the last exception the predicate raised (if
    any) and the output of `dump()` (e.g. the object's current state), which is also printed
    so it lands in pytest's captured output.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            last_exc = None
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    parts = [f"timed out after {timeout:g}s waiting for {what}"]
    if last_exc is not None:
        parts.append(f"last error: {type(last_exc).__name__}: {last_exc}")
    if dump is not None:
        try:
            state = dump()
        except Exception as exc:  # noqa: BLE001 - the dump must not hide the timeout
            state = f"(dump failed: {type(exc).__name__}: {exc})"
        text = state if isinstance(state, str) else yaml.safe_dump(state, sort_keys=False)
        parts.append("state:\n" + text)
    message = "\n".join(parts)
    print(message, file=sys.stderr)
    raise WaitTimeout(message)


def _plain(obj: Any) -> Any:
    """Kubernetes client model -> plain dict (dicts pass through)."""
    if isinstance(obj, dict):
        return obj
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]


def pod_state(core: Any, namespace: str, name: str) -> dict[str, Any]:
    """A pod's node, phase, conditions, container states and its events; for dumps."""
    pod = _plain(core.read_namespaced_pod(name, namespace))
    return {
        "pod": f"{namespace}/{name}",
        "node": pod.get("spec", {}).get("nodeName"),
        "deletionTimestamp": pod["metadata"].get("deletionTimestamp"),
        "status": pod.get("status"),
        "events": events(core, namespace, name),
    }


def node_state(core: Any, name: str) -> dict[str, Any]:
    """A node's taints, annotations and conditions; for dumps."""
    node = _plain(core.read_node(name))
    return {
        "node": name,
        "annotations": node["metadata"].get("annotations"),
        "taints": node.get("spec", {}).get("taints"),
        "conditions": node.get("status", {}).get("conditions"),
    }


def events(core: Any, namespace: str, name: str | None = None) -> list[str]:
    """Events in namespace (optionally of one object) as 'Reason: message' lines."""
    selector = f"involvedObject.name={name}" if name else None
    items = core.list_namespaced_event(namespace, field_selector=selector).items
    return [
        f"{e.involved_object.kind}/{e.involved_object.name} {e.type} {e.reason}: {e.message}"
        for e in items
    ]


def namespace_state(core: Any, namespace: str) -> dict[str, Any]:
    """Every pod's phase and node, and the namespace's events; for dumps."""
    pods = core.list_namespaced_pod(namespace).items
    return {
        "pods": {
            p.metadata.name: {
                "phase": p.status.phase,
                "node": p.spec.node_name,
                "reason": p.status.reason,
                "conditions": [
                    f"{c.type}={c.status} {c.reason or ''}".strip()
                    for c in (p.status.conditions or [])
                ],
            }
            for p in pods
        },
        "events": events(core, namespace),
    }


def wait_pod_gone(core: Any, namespace: str, name: str, timeout: float, what: str) -> None:
    """Wait until the pod is deleted from the API (404), dumping its state on timeout."""
    from kubernetes.client.exceptions import ApiException

    def gone() -> bool:
        try:
            core.read_namespaced_pod(name, namespace)
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for(gone, timeout, what, dump=lambda: pod_state(core, namespace, name))


@contextlib.contextmanager
def sampling(sample: Callable[[], None], interval: float) -> Iterator[None]:
    """Call ``sample`` every ``interval`` seconds in a thread while the with-block runs (and
    once more at its end), e.g. to record peaks while a test changes the cluster."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            sample()
            stop.wait(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
        sample()
