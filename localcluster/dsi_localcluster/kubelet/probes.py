"""Readiness, liveness and startup probes, run as the kubelet runs them.

httpGet and tcpSocket go from the host to the pod's IP (the host reaches every pod over the
bridge); exec runs inside the container's namespaces.
"""

from __future__ import annotations

import http.client
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from . import runtime


def http_get(
    addr: str, port: int, path: str, scheme: str, headers: dict[str, str], timeout: float
) -> tuple[bool, str]:
    """200 <= status < 400 is success."""
    cls = http.client.HTTPSConnection if scheme.upper() == "HTTPS" else http.client.HTTPConnection
    try:
        conn = cls(addr, port, timeout=timeout)
        conn.request("GET", path or "/", headers=headers)
        status = conn.getresponse().status
        conn.close()
    except OSError as e:
        return False, f"GET {path}: {e}"
    return 200 <= status < 400, f"GET {path}: {status}"


def tcp_socket(addr: str, port: int, timeout: float) -> tuple[bool, str]:
    """A TCP connect that succeeds."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True, "connected"
    except OSError as e:
        return False, f"connect {port}: {e}"


def _port(value: Any, named: dict[str, int]) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    if value in named:
        return named[value]
    raise ValueError(f"probe port {value!r} names no container port")


def run(
    probe: dict[str, Any],
    c: runtime.Container,
    env: dict[str, str],
    addr: str,
    named_ports: dict[str, int],
) -> tuple[bool, str]:
    """Run one probe once."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    if "exec" in probe:
        rc, out = runtime.exec_in(c, list(probe["exec"].get("command") or []), env, timeout)
        return rc == 0, out.strip()[-200:]
    if "httpGet" in probe:
        h = probe["httpGet"]
        headers = {x["name"]: x["value"] for x in h.get("httpHeaders") or []}
        port = _port(h["port"], named_ports)
        return http_get(addr, port, h.get("path", "/"), h.get("scheme", "HTTP"), headers, timeout)
    if "tcpSocket" in probe:
        return tcp_socket(addr, _port(probe["tcpSocket"]["port"], named_ports), timeout)
    return False, f"probe kind {sorted(probe)} not supported on process nodes"


@dataclass
class ProbeState:
    """Thresholds and timing of one probe of one container."""

    probe: dict[str, Any]
    started_at: float
    ok: bool = False
    successes: int = 0
    failures: int = 0
    last_run: float = 0.0
    message: str = ""
    history: list[bool] = field(default_factory=list)

    def due(self, now: float) -> bool:
        """Whether the probe should run now (initial delay and period)."""
        if now - self.started_at < float(self.probe.get("initialDelaySeconds") or 0):
            return False
        return now - self.last_run >= float(self.probe.get("periodSeconds") or 10)

    def record(self, ok: bool, message: str) -> None:
        """Count a result; the state flips after successThreshold / failureThreshold."""
        self.last_run = time.time()
        self.message = message
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold") or 1):
                self.ok = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= int(self.probe.get("failureThreshold") or 3):
                self.ok = False

    def failed(self) -> bool:
        """failureThreshold consecutive failures (liveness: restart the container)."""
        return self.failures >= int(self.probe.get("failureThreshold") or 3)
