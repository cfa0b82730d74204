"""The shared helpers in dsi_operator.util and the status field types in dsi_operator.api.fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from dsi_operator.api.progress import BatchProgress
from dsi_operator.api.spec import GroupStatus
from dsi_operator.serving.status import group_states_from_status
from dsi_operator.util.errors import describe_validation_error
from dsi_operator.util.patch import merge_patch
from dsi_operator.util.timefmt import iso, iso_precise, parse_time
from pydantic import BaseModel, ValidationError, field_validator

T = datetime(2026, 12, 5, 10, 0, 1, 250000, tzinfo=UTC)


def test_rfc3339_in_utc_with_and_without_microseconds() -> None:
    cet = T.astimezone(timezone(timedelta(hours=1)))
    assert iso(cet) == "2026-12-05T10:00:01Z"
    assert iso_precise(cet) == "2026-12-05T10:00:01.250000Z"
    assert iso(None) is None and iso_precise(None) is None


def test_parse_time_reads_what_iso_writes_and_nothing_else() -> None:
    assert parse_time(iso_precise(T)) == T
    assert parse_time("2026-12-05T10:00:01Z") == T.replace(microsecond=0)
    assert parse_time(datetime(2026, 1, 1)) == datetime(2026, 1, 1, tzinfo=UTC)  # naive: UTC
    assert parse_time("yesterday") is None
    assert parse_time("") is None and parse_time(None) is None


def test_merge_patch_nulls_removed_keys_replaces_lists_and_leaves_ignored_keys() -> None:
    assert merge_patch({"a": 1, "b": [1, 2]}, {"a": 1, "b": [2]}) == {"b": [2]}
    assert merge_patch({"a": 1, "gone": 2}, {"a": 1}) == {"gone": None}
    assert merge_patch({"a": 1}, {"a": 1}) is None
    assert merge_patch(None, {"a": 1}) == {"a": 1}
    assert merge_patch({"kopf": {"x": 1}, "a": 1}, {"a": 2}, ignore={"kopf"}) == {"a": 2}


class _Args(BaseModel):
    port: int
    name: str

    @field_validator("name")
    @classmethod
    def _lower(cls, v: str) -> str:
        if v != v.lower():
            raise ValueError("must be lowercase")
        return v


def test_validation_errors_name_each_field() -> None:
    with pytest.raises(ValidationError) as info:
        _Args.model_validate({"port": "x", "name": "A"})
    msg = describe_validation_error(info.value, prefix="spec.")
    assert msg.startswith("spec.port: Input should be a valid integer")
    assert msg.endswith("spec.name: must be lowercase")  # pydantic's "Value error, " dropped
    assert describe_validation_error(info.value, limit=1).count(";") == 0
    with pytest.raises(ValidationError) as whole:
        _Args.model_validate([1])
    assert describe_validation_error(whole.value, whole="<args>").startswith("<args>: ")


def test_group_status_reads_and_writes_its_wire_form() -> None:
    raw = {
        "index": 1,
        "restarts": 2,
        "restartTimes": [iso_precise(T), "garbage"],
        "formedAt": "2026-12-05T10:00:01Z",
        "members": ["u0", "u1"],
        "abandonedPods": [],
        "rayCluster": "rc",
    }
    st = GroupStatus.model_validate(raw)
    assert st.restart_times == (T,) and st.members == ("u0", "u1") and st.abandoned_pods == ()
    assert st.formed_at == T.replace(microsecond=0) and st.ray_cluster == "rc"
    out = st.model_dump(mode="json", by_alias=True)
    # Unset fields (None, empty lists) are left out; counters are always written.
    assert out == {
        "index": 1,
        "readyRanks": 0,
        "readyPods": 0,
        "restarts": 2,
        "reforms": 0,
        "restartTimes": [iso_precise(T)],
        "members": ["u0", "u1"],
        "formedAt": "2026-12-05T10:00:01Z",
        "rayCluster": "rc",
    }


def test_a_malformed_status_field_does_not_lose_the_rest_of_the_group() -> None:
    status = {
        "groups": [
            {"index": 0, "restarts": "many", "members": ["u0"], "controllerNote": 1},
            {"noIndex": True},
        ]
    }
    states = group_states_from_status(status)
    assert list(states) == [0]
    assert states[0].restarts == 0 and states[0].members == ("u0",)


def test_batch_progress_round_trips_through_the_configmap() -> None:
    p = BatchProgress(rows_done=7, rows_total=20, rows_per_second=1.26, progress_updated_at=T)
    data = p.configmap_data()
    assert data == {
        "rowsDone": "7",
        "rowsTotal": "20",
        "rowsPerSecond": "1.3",
        "progressUpdatedAt": "2026-12-05T10:00:01Z",
    }
    back = BatchProgress.read(data)
    assert back.reported() == {
        "rowsDone": 7,
        "rowsTotal": 20,
        "rowsPerSecond": "1.3",
        "progressUpdatedAt": "2026-12-05T10:00:01Z",
    }
    bad = BatchProgress.read({"rowsDone": "-4", "shardsDone": "lots"})
    assert bad.reported() == {"rowsDone": 0}


def test_progress_from_a_driver_of_the_previous_release_keeps_its_time() -> None:
    # A job started before an operator upgrade writes the time under its old key.
    old = BatchProgress.read({"rowsDone": "3", "updatedAt": "2026-12-05T10:00:01Z"})
    assert old.reported() == {"rowsDone": 3, "progressUpdatedAt": "2026-12-05T10:00:01Z"}
    both = BatchProgress.read(
        {"updatedAt": "2026-12-05T09:00:00Z", "progressUpdatedAt": "2026-12-05T10:00:01Z"}
    )
    assert both.reported()["progressUpdatedAt"] == "2026-12-05T10:00:01Z"
