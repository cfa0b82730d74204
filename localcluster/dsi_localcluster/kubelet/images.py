"""What a process node runs for an image whose container names no ``command``.

A real kubelet runs the image's ENTRYPOINT (with the container's ``args``, or else the image's
CMD). Process nodes have no images: the project's virtualenv stands in for them, so the
entrypoints of the project's own images are read from the one place that declares them,
the ``Dockerfile``, and keyed by the repository the chart installs them from
(``charts/dsi-operator/values.yaml``). Other images' pods must name a command (KubeRay's
always do).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

#: The Dockerfile stage built into the operator image.
OPERATOR_STAGE = "operator"


@dataclass(frozen=True)
class Entrypoint:
    """An image's ENTRYPOINT and CMD (exec form)."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()


def repository(image: str) -> str:
    """``registry:port/name:tag@sha256:...`` -> ``registry:port/name``."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:  # a tag (a registry's port sits before the last slash)
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def dockerfile_entrypoints(text: str) -> dict[str, Entrypoint]:
    """Each named stage's exec-form ENTRYPOINT and CMD, from a Dockerfile's text."""
    stages: dict[str, dict[str, tuple[str, ...]]] = {}
    current: dict[str, tuple[str, ...]] | None = None
    for line in text.splitlines():
        if m := re.match(r"\s*FROM\s+\S+\s+AS\s+(\S+)", line, re.I):
            current = stages.setdefault(m.group(1), {})
        elif current is not None and (m := re.match(r"\s*(ENTRYPOINT|CMD)\s+(\[.*\])", line)):
            current[m.group(1).upper()] = tuple(json.loads(m.group(2)))
    return {
        name: Entrypoint(kw["ENTRYPOINT"], kw.get("CMD", ()))
        for name, kw in stages.items()
        if "ENTRYPOINT" in kw
    }


def project_images(root: Path) -> dict[str, Entrypoint]:
    """{repository: entrypoint} of the project's images (only the operator's needs one)."""
    values = yaml.safe_load((root / "charts" / "dsi-operator" / "values.yaml").read_text())
    stages = dockerfile_entrypoints((root / "Dockerfile").read_text())
    return {values["image"]["repository"]: stages[OPERATOR_STAGE]}
