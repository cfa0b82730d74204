"""A pod's runtime record and the status a kubelet reports for it (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..timestamps import rfc3339
from .probes import ProbeState


def stamp(t: float | None) -> str | None:
    """An RFC 3339 timestamp (seconds) from time.time()."""
    return None if t is None else rfc3339(t)


@dataclass
class ContainerRecord:
    """What the node agent knows of one container."""

    spec: dict[str, Any]
    init: bool = False
    pid: int | None = None
    started_at: float | None = None
    running: bool = False
    restart_count: int = 0
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    terminated: dict[str, Any] | None = None  # current state when exited, not restarted
    last_terminated: dict[str, Any] | None = None
    next_start: float = 0.0
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None
    startup: ProbeState | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The container's name."""
        return str(self.spec["name"])

    def started(self) -> bool:
        """Running and past its startup probe (if any)."""
        return self.running and (self.startup is None or self.startup.ok)

    def ready(self) -> bool:
        """Started and passing its readiness probe (if any)."""
        return self.started() and (self.readiness is None or self.readiness.ok)

    def state(self) -> dict[str, Any]:
        """The container's ``state`` as the API shows it."""
        if self.running:
            return {"running": {"startedAt": stamp(self.started_at)}}
        if self.terminated is not None:
            return {"terminated": self.terminated}
        waiting = {"reason": self.waiting_reason}
        if self.waiting_message:
            waiting["message"] = self.waiting_message
        return {"waiting": waiting}

    def status(self) -> dict[str, Any]:
        """One entry of containerStatuses / initContainerStatuses."""
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready() if not self.init else self.terminated is not None,
            "started": self.started(),
            "restartCount": self.restart_count,
            "state": self.state(),
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.pid is not None:
            out["containerID"] = f"proc://{self.pid}"
        return out


def terminated(exit_code: int, started: float | None, finished: float) -> dict[str, Any]:
    """A ``terminated`` state with the kubelet's reason."""
    return {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "startedAt": stamp(started),
        "finishedAt": stamp(finished),
        "containerID": None,
    }


def _cond(kind: str, ok: bool, reason: str = "") -> dict[str, Any]:
    c: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
    if reason and not ok:
        c["reason"] = reason
    return c


def stamp_transitions(
    status: dict[str, Any], previous: dict[str, Any] | None, now: float
) -> dict[str, Any]:
    """``status`` with each condition's ``lastTransitionTime``, as a kubelet reports it: kept
    from ``previous`` while the condition's status is unchanged, ``now`` when it changed or
    is new. The operator reads it (how long a rank pod has been NotReady)."""
    before = {c["type"]: c for c in (previous or {}).get("conditions") or []}
    conds = []
    for c in status.get("conditions") or []:
        old = before.get(c["type"])
        kept = old is not None and old.get("status") == c["status"]
        t = old.get("lastTransitionTime") if kept and old is not None else stamp(now)
        conds.append({**c, "lastTransitionTime": t})
    return {**status, "conditions": conds}


def phase(inits_done: bool, failed: bool, main: list[ContainerRecord], policy: str) -> str:
    """Pending / Running / Succeeded / Failed, as the kubelet decides it."""
    if failed:
        return "Failed"
    if not inits_done or not any(c.pid is not None for c in main):
        return "Pending"
    done = [c for c in main if c.terminated is not None]
    if len(done) == len(main) and policy != "Always":
        codes = [c.terminated["exitCode"] for c in done if c.terminated]
        return "Succeeded" if all(code == 0 for code in codes) else "Failed"
    return "Running"


def pod_status(
    records: list[ContainerRecord],
    pod_ip: str,
    host_ip: str,
    start_time: float,
    inits_done: bool,
    failed: bool,
    policy: str,
) -> dict[str, Any]:
    """The pod's status (without PodScheduled, which the scheduler owns)."""
    inits = [r for r in records if r.init]
    main = [r for r in records if not r.init]
    ready = bool(main) and all(r.ready() for r in main)
    ph = phase(inits_done, failed, main, policy)
    return {
        "phase": ph,
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": stamp(start_time),
        "conditions": [
            _cond("PodReadyToStartContainers", True),
            _cond("Initialized", inits_done, "ContainersNotInitialized"),
            _cond("ContainersReady", ready and ph == "Running", "ContainersNotReady"),
            _cond("Ready", ready and ph == "Running", "ContainersNotReady"),
        ],
        "initContainerStatuses": [r.status() for r in inits],
        "containerStatuses": [r.status() for r in main],
    }
