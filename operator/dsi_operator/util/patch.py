"""JSON merge patches (RFC 7386) between two status dicts, for both custom resources."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def merge_patch(
    current: Mapping[str, Any] | None,
    desired: Mapping[str, Any],
    ignore: Collection[str] = (),
) -> dict[str, Any] | None:
    """A JSON merge patch turning ``current`` into ``desired``; ``None`` when they are equal.

    Top-level keys only: a changed value (lists and objects too) is replaced whole, and a key
    that disappears is set to null. Keys in ``ignore`` (owned by another writer, such as kopf's
    own ``status.kopf``) are neither compared nor removed.
    """
    current = {k: v for k, v in (current or {}).items() if k not in ignore}
    patch: dict[str, Any] = {k: v for k, v in desired.items() if current.get(k) != v}
    for k in current:
        if k not in desired:
            patch[k] = None
    return patch or None
