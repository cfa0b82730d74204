"""Progress of a batch job: a ``DSI_PROGRESS {json}`` log line and, when asked, a ConfigMap.

Import-light on purpose (no Ray, no torch, and the ``kubernetes`` client only when a
ConfigMap reporter patches). What is reported is a
:class:`~dsi_operator.api.progress.BatchProgress`, the schema the operator reads the
ConfigMap with.

Reporters:

- :class:`LogReporter`: always; one line on stdout at most every 2 s, and one at the end.
- :class:`ConfigMapReporter`: when ``DSI_PROGRESS_CONFIGMAP`` names a ConfigMap; it
  merge-patches that ConfigMap's string ``data`` (namespace from ``DSI_NAMESPACE``, else
  the pod's service-account namespace) from a background thread, so a slow or failing API
  server never slows or fails the job: a failed patch is a warning.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from dsi_operator.api.progress import BatchProgress

log = logging.getLogger(__name__)

LOG_PREFIX = "DSI_PROGRESS"
#: Least time between two progress lines, and between two ConfigMap patches.
EVERY_S = 2.0
CONFIGMAP_ENV = "DSI_PROGRESS_CONFIGMAP"
NAMESPACE_ENV = "DSI_NAMESPACE"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MERGE_PATCH = "application/merge-patch+json"
#: Bound on one patch request (connect, read), seconds.
PATCH_TIMEOUT_S = (3.0, 5.0)


def log_json(progress: BatchProgress) -> str:
    """The JSON object of a ``DSI_PROGRESS`` line: the driver's counts, snake_case keys."""
    counts = progress.model_dump(exclude_none=True, exclude={"progress", "progress_updated_at"})
    if progress.rows_per_second is not None:
        counts["rows_per_second"] = round(progress.rows_per_second, 2)
    return json.dumps(counts)


def configmap_data(progress: BatchProgress, now: datetime | None = None) -> dict[str, str]:
    """The ConfigMap ``data`` for ``progress`` reported at ``now`` (default: the current
    time): :meth:`BatchProgress.configmap_data`, the schema the operator reads."""
    at = now or datetime.now(UTC)
    data: dict[str, str] = progress.model_copy(update={"progress_updated_at": at}).configmap_data()
    return data


class Reporter(Protocol):
    """Something that publishes progress."""

    def report(self, progress: BatchProgress, final: bool = False) -> None:
        """Publish ``progress`` (``final``: the last one of the run, never dropped)."""

    def close(self) -> None:
        """Publish what is pending and stop."""


class LogReporter:
    """``DSI_PROGRESS {json}`` on ``stream``, at most every ``every_s`` and at the end."""

    def __init__(
        self,
        stream: TextIO | None = None,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.every_s = every_s
        self.clock = clock
        self._last: float | None = None

    def report(self, progress: BatchProgress, final: bool = False) -> None:
        """Print ``progress`` unless a line went out less than ``every_s`` ago."""
        now = self.clock()
        if not final and self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        print(f"{LOG_PREFIX} {log_json(progress)}", file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        """Nothing pending: every line is printed at once."""


def service_account_namespace(env: Mapping[str, str], sa_file: Path = SA_NAMESPACE_FILE) -> str:
    """``DSI_NAMESPACE``, else the pod's namespace from its service-account token mount."""
    if env.get(NAMESPACE_ENV):
        return env[NAMESPACE_ENV]
    try:
        return sa_file.read_text().strip()
    except OSError:
        raise RuntimeError(
            f"{CONFIGMAP_ENV} is set but neither {NAMESPACE_ENV} nor {sa_file} says the namespace"
        ) from None


def _in_cluster_api() -> Any:
    """A CoreV1Api with the pod's in-cluster credentials."""
    from kubernetes import client, config

    config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.CoreV1Api()


class ConfigMapReporter:
    """Merge-patches the ConfigMap ``name`` with :func:`configmap_data` from a thread.

    ``api``: a CoreV1Api (default: built in the thread from the in-cluster config). Only the
    latest progress is patched; a failure logs a warning, and a later report tries again.
    """

    def __init__(
        self, name: str, namespace: str, api: Any = None, every_s: float = EVERY_S
    ) -> None:
        self.name, self.namespace, self.every_s = name, namespace, every_s
        self.api = api
        self.patches = 0
        self.failures = 0
        self._latest: BatchProgress | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dsi-progress", daemon=True)
        self._thread.start()

    def report(self, progress: BatchProgress, final: bool = False) -> None:
        """Hand ``progress`` to the patching thread (the newest replaces one not yet sent)."""
        with self._cond:
            self._latest = progress
            self._cond.notify()

    def close(self, timeout_s: float = 15.0) -> None:
        """Patch the last progress (bounded by ``timeout_s``) and stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._latest is not None or self._stop)
                progress, self._latest = self._latest, None
                stop = self._stop
            if progress is not None:
                self._patch(progress)
            if stop:
                return
            with self._cond:  # rate limit; close() cuts the wait short
                self._cond.wait_for(lambda: self._stop, self.every_s)

    def _patch(self, progress: BatchProgress) -> None:
        try:
            if self.api is None:
                self.api = _in_cluster_api()
            self.api.patch_namespaced_config_map(
                self.name,
                self.namespace,
                {"data": configmap_data(progress)},
                _content_type=MERGE_PATCH,
                _request_timeout=PATCH_TIMEOUT_S,
            )
            self.patches += 1
        except Exception as e:  # never fail the job over progress reporting
            self.failures += 1
            log.warning(
                "progress ConfigMap %s/%s not updated: %s",
                self.namespace,
                self.name,
                str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__,
            )


class Reporters:
    """Fan-out to every reporter."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def report(self, progress: BatchProgress, final: bool = False) -> None:
        """Pass ``progress`` to each reporter."""
        for r in self.reporters:
            r.report(progress, final)

    def close(self) -> None:
        """Close each reporter."""
        for r in self.reporters:
            r.close()


def reporters_from_env(env: Mapping[str, str]) -> Reporters:
    """The log reporter, plus a ConfigMap reporter when ``DSI_PROGRESS_CONFIGMAP`` is set
    (without a namespace: a warning, and no ConfigMap)."""
    out: list[Reporter] = [LogReporter()]
    name = env.get(CONFIGMAP_ENV)
    if name:
        try:
            out.append(ConfigMapReporter(name, service_account_namespace(env)))
        except RuntimeError as e:
            log.warning("progress ConfigMap disabled: %s", e)
    return Reporters(out)
