"""RFC 3339 timestamps as the Kubernetes API writes them: UTC, ``Z``, whole seconds (``Time``)
or microseconds (``MicroTime``, e.g. a Lease's ``renewTime``)."""

from __future__ import annotations

import datetime as dt


def rfc3339(t: float | None = None, *, micro: bool = False) -> str:
    """``t`` (seconds since the epoch, as ``time.time()``; now when None) in RFC 3339 UTC,
    to the second, or to the microsecond with ``micro``."""
    when = dt.datetime.now(dt.UTC) if t is None else dt.datetime.fromtimestamp(t, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")
