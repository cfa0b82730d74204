"""Kubernetes resource quantities: scaling one by a whole number (a pod of several ranks).

``kubernetes.utils.parse_quantity`` parses; nothing in the client formats a quantity back,
so :func:`scale_quantity` keeps the user's own suffix (``16Gi`` x 2 = ``32Gi``), which is
what a reader of the rendered pod expects to see.
"""

from __future__ import annotations

import re
from decimal import Decimal

from kubernetes.utils import parse_quantity

# A number with an optional binary or decimal suffix; exponent forms (1e3) take the slow path.
_SUFFIXED = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE])?$")


def _plain(n: Decimal) -> str:
    text = format(n.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def scale_quantity(quantity: str, factor: int) -> str:
    """``quantity`` times ``factor`` (>= 1), as a quantity string."""
    if factor == 1:
        return quantity
    m = _SUFFIXED.match(quantity)
    if m is not None:
        return f"{_plain(Decimal(m.group(1)) * factor)}{m.group(2) or ''}"
    total: Decimal = parse_quantity(quantity) * factor  # type: ignore[no-untyped-call]
    if total == total.to_integral_value():
        return _plain(total)
    return f"{_plain(total * 1000)}m"
