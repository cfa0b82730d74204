"""RFC 3339 times as Kubernetes writes them (UTC, ``Z`` suffix), and back.

One place for the format, so that the status the operator writes, the progress the batch
driver reports and the messages both print agree on it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso(t: datetime | None) -> str | None:
    """RFC 3339 with second precision and a Z, as Kubernetes writes times (None stays None)."""
    if t is None:
        return None
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def iso_precise(t: datetime | None) -> str | None:
    """RFC 3339 with microseconds: bookkeeping times where a second matters (backoff)."""
    if t is None:
        return None
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> datetime | None:
    """Parse an RFC 3339 string (or pass a datetime through, as UTC when naive); ``None`` on
    anything else, so a malformed time in a stored object reads as unset."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
