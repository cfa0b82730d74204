"""A batch run's status from its RayJob and the driver's progress (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from dsi_operator.batch.status import (
    BatchInputs,
    compute_batch_status,
    phase_of,
    progress_fields,
    progress_text,
    status_changed,
)
from dsi_operator.util.patch import merge_patch

NOW = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


def _rayjob(deploy: str, job: str = "", **extra: Any) -> dict[str, Any]:
    return {"status": {"jobDeploymentStatus": deploy, "jobStatus": job, **extra}}


def _body(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "b", "generation": 1}, "status": status or {}}


@pytest.mark.parametrize(
    ("rayjob", "phase"),
    [
        (None, "Pending"),
        (_rayjob(""), "Pending"),
        (_rayjob("Initializing"), "Pending"),
        (_rayjob("Waiting"), "Pending"),
        (_rayjob("Suspended"), "Pending"),
        (_rayjob("Running", "RUNNING"), "Running"),
        (_rayjob("Retrying", failed=1), "Running"),
        (_rayjob("Complete", "SUCCEEDED"), "Succeeded"),
        (_rayjob("Complete", "FAILED"), "Failed"),
        (_rayjob("Complete", "STOPPED"), "Failed"),
        (_rayjob("Failed", "FAILED", reason="AppFailed", message="boom"), "Failed"),
        (_rayjob("ValidationFailed", message="bad spec"), "Failed"),
    ],
)
def test_phase_follows_kuberay(rayjob: dict[str, Any] | None, phase: str) -> None:
    assert phase_of(rayjob)[0].value == phase


def test_failed_message_carries_kuberays_reason() -> None:
    _, msg = phase_of(_rayjob("Failed", "FAILED", message="BackoffLimitExceeded: 3 runs"))
    assert "BackoffLimitExceeded" in msg


def test_progress_text() -> None:
    assert progress_text(900, 2000) == "900/2000 (45%)"
    assert progress_text(5, None) == "5/?"
    assert progress_text(0, 0) == "0/0 (100%)"
    assert progress_text(3000, 2000) == "3000/2000 (100%)"


def test_progress_fields_parse_and_drop_garbage() -> None:
    got = progress_fields(
        {"rowsDone": "10", "rowsTotal": "x", "rowsPerSecond": "2.349", "groupsAlive": "-3"}
    )
    assert got == {"rowsDone": 10, "rowsPerSecond": "2.3", "groupsAlive": 0, "progress": "10/?"}
    assert progress_fields(None) == {}
    assert progress_fields({"rowsPerSecond": "fast"}) == {}


def test_worker_progress_round_trips() -> None:
    """What the driver writes (dsi_worker.batch.progress.configmap_data) is what the
    operator reads."""
    from dsi_operator.api.progress import BatchProgress
    from dsi_worker.batch.progress import configmap_data

    data = configmap_data(
        BatchProgress(
            rows_done=7,
            rows_total=20,
            rows_per_second=1.25,
            groups_alive=2,
            shards_done=1,
            shards_total=3,
            group_restarts=1,
        ),
        NOW,
    )
    got = progress_fields(data)
    assert got["progress"] == "7/20 (35%)"
    assert (got["groupsAlive"], got["shardsDone"], got["shardsTotal"]) == (2, 1, 3)
    assert got["groupRestarts"] == 1
    assert got["progressUpdatedAt"] == "2026-12-05T10:00:00Z"


def test_a_run_start_to_success_with_events() -> None:
    inp = BatchInputs(_body(), _rayjob("Initializing"), None, NOW)
    pending = compute_batch_status(inp)
    assert pending["phase"] == "Pending" and inp.events == []
    inp = BatchInputs(_body(pending), _rayjob("Running", "RUNNING"), {"rowsDone": "4"}, NOW)
    running = compute_batch_status(inp)
    assert running["phase"] == "Running" and running["progress"] == "4/?"
    assert [e.reason for e in inp.events] == ["JobStarted"]
    done_job = _rayjob("Complete", "SUCCEEDED", endTime="2026-12-05T10:05:00Z", jobId="j1")
    inp = BatchInputs(_body(running), done_job, {"rowsDone": "8", "rowsTotal": "8"}, NOW)
    done = compute_batch_status(inp)
    assert done["phase"] == "Succeeded" and done["groupsAlive"] == 0
    assert done["completionTime"] == "2026-12-05T10:05:00Z" and done["jobId"] == "j1"
    assert [e.reason for e in inp.events] == ["JobSucceeded"]
    conds = {c["type"]: c["status"] for c in done["conditions"]}
    assert conds == {"Complete": "True", "Failed": "False"}


def test_a_retry_is_an_event_and_progress_survives_the_rayjob() -> None:
    before = compute_batch_status(
        BatchInputs(_body(), _rayjob("Running", "RUNNING"), {"rowsDone": "50"}, NOW)
    )
    inp = BatchInputs(_body(before), _rayjob("Retrying", failed=1), None, NOW)
    after = compute_batch_status(inp)
    assert after["failedAttempts"] == 1 and after["rowsDone"] == 50
    assert [e.reason for e in inp.events] == ["JobRetrying"]
    inp = BatchInputs(_body(after), _rayjob("Failed", "FAILED", failed=3), None, NOW)
    failed = compute_batch_status(inp)
    assert failed["phase"] == "Failed"
    assert [e.reason for e in inp.events] == ["JobRetrying", "JobFailed"]


def test_status_changed_ignores_condition_times_only() -> None:
    a = compute_batch_status(BatchInputs(_body(), _rayjob("Running", "RUNNING"), None, NOW))
    later = datetime(2026, 12, 6, tzinfo=UTC)
    b = compute_batch_status(BatchInputs(_body(), _rayjob("Running", "RUNNING"), None, later))
    assert not status_changed(a, b)
    assert status_changed(a, {**b, "rowsDone": 1})
    assert merge_patch({"x": 1, "y": 2}, {"y": 3}) == {"y": 3, "x": None}
