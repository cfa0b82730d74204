"""A DeepSpeedBatchInference's status from its RayJob and the job's progress (pure).

KubeRay's RayJob says where the run is (``jobDeploymentStatus``: Initializing, Running,
Retrying, Complete, Failed; ``jobStatus``: the Ray job's own state); the job's driver says how
far it got, in the progress ConfigMap (:class:`~dsi_operator.api.progress.BatchProgress`). This
module folds both into the resource's status and says which Events the change deserves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dsi_operator.api.batch_spec import BatchPhase, DeepSpeedBatchInferenceStatus
from dsi_operator.api.progress import BatchProgress
from dsi_operator.api.spec import Condition
from dsi_operator.serving.status import merge_conditions

COND_COMPLETE = "Complete"
COND_FAILED = "Failed"

#: KubeRay deployment states in which the Ray job runs (or is being retried).
_RUNNING = {"Running", "Retrying"}
_TERMINAL = {"Complete", "Failed", "ValidationFailed"}


@dataclass(frozen=True)
class BatchEvent:
    """An Event to post about the resource."""

    type: str
    reason: str
    message: str


@dataclass
class BatchInputs:
    """What one pass read: the resource, its RayJob (None: not there) and the progress
    ConfigMap's data (None: not there or empty)."""

    body: Mapping[str, Any]
    rayjob: Mapping[str, Any] | None
    progress: Mapping[str, str] | None
    now: datetime
    events: list[BatchEvent] = field(default_factory=list)


def progress_fields(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Status fields from a progress report (the ConfigMap's data, or the progress part of
    a stored status); values that do not parse are left out (the driver's report is input,
    not trusted to be well formed). ``progress`` is recomputed when ``rowsDone`` is given."""
    reported = BatchProgress.read(data)
    out = reported.reported()
    if "rows_done" in reported.model_fields_set:
        out["progress"] = progress_text(reported.rows_done, reported.rows_total)
    return out


def progress_text(done: int, total: int | None) -> str:
    """``900/2000 (45%)``; ``900/?`` while the total is unknown."""
    if total is None:
        return f"{done}/?"
    pct = 100 if total == 0 else min(100, done * 100 // total)
    return f"{done}/{total} ({pct}%)"


def phase_of(rayjob: Mapping[str, Any] | None) -> tuple[BatchPhase, str]:
    """Phase and message from the RayJob alone."""
    if rayjob is None:
        return BatchPhase.Pending, "creating the RayJob"
    st = rayjob.get("status") or {}
    deploy, job = st.get("jobDeploymentStatus") or "", st.get("jobStatus") or ""
    why = st.get("message") or st.get("reason") or ""
    if deploy == "Complete":
        if job == "SUCCEEDED":
            return BatchPhase.Succeeded, "every row written"
        return BatchPhase.Failed, f"Ray job ended {job or 'without a status'}" + (
            f": {why}" if why else ""
        )
    if deploy in _TERMINAL:
        return BatchPhase.Failed, why or f"RayJob {deploy}"
    if deploy == "Retrying":
        return BatchPhase.Running, f"retrying the job after {st.get('failed', 0)} failed run(s)"
    if deploy in _RUNNING:
        return BatchPhase.Running, f"Ray job {job or 'starting'}"
    return BatchPhase.Pending, f"waiting for the Ray cluster ({deploy or 'New'})"


def _conditions(phase: BatchPhase, message: str, rayjob: Mapping[str, Any] | None) -> list[Any]:
    reason = str(((rayjob or {}).get("status") or {}).get("reason") or "")
    done = phase == BatchPhase.Succeeded
    failed = phase == BatchPhase.Failed
    return [
        Condition.of(
            COND_COMPLETE,
            "True" if done else "False",
            "JobSucceeded" if done else ("JobFailed" if failed else "JobNotFinished"),
            message if done else "",
        ),
        Condition.of(
            COND_FAILED,
            "True" if failed else "False",
            (reason or "JobFailed") if failed else "NotFailed",
            message if failed else "",
        ),
    ]


def _events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[BatchEvent]:
    out: list[BatchEvent] = []
    before, after = old.get("phase"), new["phase"]
    if new.get("failedAttempts", 0) > old.get("failedAttempts", 0):
        out.append(
            BatchEvent(
                "Warning",
                "JobRetrying",
                f"run {new['failedAttempts']} failed; retrying (finished shards are kept)",
            )
        )
    if before == after:
        return out
    if after == BatchPhase.Running:
        out.append(BatchEvent("Normal", "JobStarted", new.get("message") or "running"))
    elif after == BatchPhase.Succeeded:
        out.append(BatchEvent("Normal", "JobSucceeded", f"{new.get('progress', '')} rows"))
    elif after == BatchPhase.Failed:
        out.append(BatchEvent("Warning", "JobFailed", new.get("message") or "failed"))
    return out


def compute_batch_status(inp: BatchInputs) -> dict[str, Any]:
    """The whole status for this pass; appends the Events it calls for to ``inp.events``."""
    old = dict(inp.body.get("status") or {})
    meta = inp.body.get("metadata") or {}
    rj = dict((inp.rayjob or {}).get("status") or {})
    phase, message = phase_of(inp.rayjob)
    new: dict[str, Any] = {
        # Progress survives a RayJob that is gone (a finished run's cluster is deleted).
        **BatchProgress.read(old).reported(),
        **progress_fields(inp.progress),
        "phase": phase.value,
        "message": message,
        "observedGeneration": meta.get("generation"),
        "failedAttempts": int(rj.get("failed") or 0) or int(old.get("failedAttempts") or 0),
        "jobId": rj.get("jobId") or old.get("jobId"),
        "jobStatus": rj.get("jobStatus") or old.get("jobStatus"),
        "jobDeploymentStatus": rj.get("jobDeploymentStatus") or old.get("jobDeploymentStatus"),
        "rayCluster": rj.get("rayClusterName") or old.get("rayCluster"),
        "startTime": rj.get("startTime") or old.get("startTime"),
        "completionTime": rj.get("endTime") if phase.value in _DONE else None,
    }
    if phase.value in _DONE:
        new["groupsAlive"] = 0
    new["conditions"] = merge_conditions(
        old.get("conditions"),
        _conditions(phase, message, inp.rayjob),
        meta.get("generation"),
        inp.now,
    )
    new = {k: v for k, v in new.items() if v is not None}
    inp.events.extend(_events(old, new))
    # Through the model: a key the CRD does not know fails here, not silently pruned.
    DeepSpeedBatchInferenceStatus.model_validate(new)
    return new


_DONE = {BatchPhase.Succeeded.value, BatchPhase.Failed.value}


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` changes anything (conditions compared without their times)."""

    def strip(s: Mapping[str, Any] | None) -> dict[str, Any]:
        d = dict(s or {})
        d["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in d.get("conditions") or []
        ]
        return d

    return strip(old) != strip(new)
