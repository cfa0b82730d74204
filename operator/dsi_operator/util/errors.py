"""Human-readable messages from pydantic validation errors."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(
    err: ValidationError, prefix: str = "", whole: str = "", limit: int | None = None
) -> str:
    """``loc: message; ...`` naming every invalid field (the first ``limit`` of them).

    ``prefix`` goes before each field path (``"spec."``); an error about the whole input
    (no path) is shown as ``whole: message``, or as the bare message when ``whole`` is empty.
    pydantic's ``"Value error, "`` prefix on a validator's own message is dropped.
    """
    parts = []
    for e in err.errors()[:limit]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in e.get("loc", ()))
        if loc:
            parts.append(f"{prefix}{loc}: {msg}")
        else:
            parts.append(f"{whole}: {msg}" if whole else msg)
    return "; ".join(parts)
