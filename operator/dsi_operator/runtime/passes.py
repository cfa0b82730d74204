"""The types of one reconcile pass: the spec parsed once, the pass's working state, how the
pass ended and why it planned again (see :meth:`~.controller.Controller.reconcile_one`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dsi_operator.api import labels as L
from dsi_operator.api.spec import DeepSpeedInferenceSpec
from dsi_operator.runtime.workqueue import Key
from dsi_operator.serving.plan import Observed, Plan, RolloutState, declared_shape, safe_parse
from dsi_operator.serving.preflight import PreflightResult
from dsi_operator.serving.render import (
    head_hash,
    parse_group_hashes,
    serve_shape_hash,
    spec_hash,
    spec_hash_by_group,
)


@dataclass(frozen=True)
class Parsed:
    """A DSI spec parsed once per (uid, generation), with the hashes derived from it."""

    spec: DeepSpeedInferenceSpec | None
    error: str | None
    spec_hash: str | None = None
    group_hashes: dict[int, str] | None = None
    declared: tuple[int, int] = (0, 1)  # (replicas, tp) as the raw spec says, when invalid
    head_hash: str = ""
    serve_shape: str = ""


def parse_body(body: Mapping[str, Any]) -> Parsed:
    """Parse a DSI body's spec (never raises: a bad spec is an error message)."""
    raw = body.get("spec") or {}
    spec, err = safe_parse(raw)
    if spec is None:
        return Parsed(None, err, declared=declared_shape(raw))
    return Parsed(
        spec,
        None,
        spec_hash(spec),
        spec_hash_by_group(spec),
        head_hash=head_hash(spec),
        serve_shape=serve_shape_hash(spec),
    )


def rollout_view(annotations: Mapping[str, str] | None, parsed: Parsed) -> RolloutState:
    """The hashes the rollout compares: the RayService's annotations against the spec's."""
    annotations = annotations or {}
    return RolloutState(
        carried=parse_group_hashes(annotations.get(L.ANNOTATION_GROUP_HASHES)),
        carried_head=annotations.get(L.ANNOTATION_RS_HEAD_HASH) or None,
        head_target=parsed.head_hash,
        shape_target=parsed.serve_shape,
        spec_hash=parsed.spec_hash or "",
    )


class Outcome(StrEnum):
    """How a pass ended."""

    #: The DSI is not known (deleted), or went away during the pass.
    GONE = "gone"
    #: The plan writes nothing.
    NOOP = "noop"
    #: A new resource's RayService was applied alone; queued again for the rest.
    FIRST_APPLY = "first-apply"
    #: The status patch met a newer object (409): nothing more done; queued again.
    CONFLICT = "conflict"
    #: The plan was carried out.
    ACTED = "acted"


#: The cause of the pass queued at once after a pass that ended so.
REQUEUE = {Outcome.FIRST_APPLY: "children", Outcome.CONFLICT: "conflict"}

#: The reason of a pass's one regular plan.
PLANNED = "planned"


class Replan(StrEnum):
    """Why a pass plans again after its one plan: an explicit step, never a habit."""

    #: The read before writing found a newer DSI than the one planned from (its status or
    #: spec changed since the watch showed it): a restart is recorded only against the
    #: object it was decided on.
    NEWER_OBJECT = "newer-object"
    #: The pass created the children: restart decisions, the rollout and the status depend
    #: on whether they exist.
    CHILDREN_CREATED = "children-created"


@dataclass(frozen=True)
class PassResult:
    """What :meth:`Controller.reconcile_one` did: its outcome, and why it ran each plan."""

    outcome: Outcome
    plans: tuple[str, ...] = ()


@dataclass
class Pass:
    """One pass's working state, filled in step by step."""

    key: Key
    cause: str
    body: dict[str, Any]
    parsed: Parsed
    pre: PreflightResult | None
    obs: Observed
    #: Whether the children are up to date with the spec, as the pass found them.
    children_current: bool = False
    plan: Plan = field(init=False)
    #: Why each plan of this pass ran: :data:`PLANNED`, then any :class:`Replan`.
    plans: list[str] = field(default_factory=list)
    #: When the pass began to write (monotonic seconds); None while it only read.
    started: float | None = None
