"""Rolling a spec change through the groups inside the one RayCluster (pure).

KubeRay's ways of applying a changed pod template both cost GPUs or availability: its
``NewCluster`` strategy builds a second RayCluster as large as the first and switches over
(twice the GPUs for the whole upgrade), and its incremental strategy needs a Gateway API.
The operator renders the RayService with ``upgradeStrategy: None`` instead (KubeRay then
never replaces a pod after a spec change) and replaces the groups itself:

* Each group's worker templates carry their hash (``deepspeed.ai/group-hash``), and so does
  every pod made from them. The RayService records the hash each group's templates are at
  (``deepspeed.ai/group-hashes``). A group is *updated* when its template and all its live
  pods are at the target hash.
* A group is replaced by rendering its templates at the target spec (the others keep the
  templates they have), patching the running RayCluster the same way, and then deleting the
  group's pods: KubeRay recreates them from the new template. The deletion is a whole-group
  restart that is not counted against the restart budget (trigger ``Rollout``), so a crash
  at any point resumes it like any restart.
* At most ``spec.rollout.maxUnavailable`` groups are unavailable at once; groups that are not
  ready count, and a stale group that is not ready is replaced first (it serves nothing).
* A failed group that is not replaced yet comes back at the template it has (LWS's rule).
* Two kinds of change cannot be rolled one group at a time and replace every group at once
  (still in the one RayCluster, without extra GPUs): a head template change (Ray keeps no
  worker across a head restart without GCS fault tolerance), and a change of the Serve app
  arguments that shape a group (model, TP size, dtype...: Ray Serve runs one app, whose
  groups all take the new arguments when it is redeployed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: The restart trigger of a group replaced by a rollout (not counted against the budget).
TRIGGER_ROLLOUT = "Rollout"

#: Progressing condition reasons.
REASON_ROLLING = "RollingUpdate"
REASON_PAUSED = "RolloutPaused"
REASON_COMPLETE = "RolloutComplete"


@dataclass(frozen=True)
class GroupRollout:
    """What the rollout needs to know about one group."""

    index: int
    target: str  # hash of g's templates under the spec
    template: str | None  # hash of g's templates in the RayService now (None: not carried yet)
    shape_ok: bool  # g's templates were rendered under the spec's Serve shape
    pods_at_target: bool  # every live pod of g carries the target hash
    ready: bool  # g serves
    busy: bool  # a restart or a roll of g is under way, or waits for its backoff

    @property
    def template_at_target(self) -> bool:
        """Whether the RayService renders g at the spec (a new group always is)."""
        return self.template is None or self.template == self.target

    @property
    def updated(self) -> bool:
        """Template and every live pod at the spec."""
        return self.template_at_target and self.pods_at_target


@dataclass(frozen=True)
class RolloutInputs:
    """One pass's view of the rollout (plain data)."""

    groups: Sequence[GroupRollout]
    head_target: str
    head_template: str | None  # what the RayService carries (None: not recorded)
    stale_head_pods: Sequence[str] = ()  # UIDs of live head pods from another head template
    max_unavailable: int = 1
    paused: bool = False


@dataclass(frozen=True)
class RolloutPlan:
    """The rollout's decision for one pass."""

    rolls: tuple[int, ...]  # groups whose pods are replaced now
    target_groups: frozenset[int]  # groups the RayService renders at the spec
    head_at_target: bool  # the RayService renders the head at the spec
    head_pods: tuple[str, ...]  # head pod UIDs to delete now
    updated: int
    ready_updated: int
    complete: bool
    reason: str
    message: str


def _head_change(inp: RolloutInputs) -> bool:
    template_stale = inp.head_template not in (None, inp.head_target)
    return template_stale or bool(inp.stale_head_pods)


def _pick(inp: RolloutInputs, whole: bool) -> list[int]:
    """Groups to replace now: all stale ones at once, or within maxUnavailable."""
    if whole:
        # A head restart takes every worker with it: replace all, updated or not, so no
        # group counts it as a failure.
        if _head_change(inp):
            return [g.index for g in inp.groups if not g.busy]
        return [g.index for g in inp.groups if not g.updated and not g.busy]
    unavailable = sum(1 for g in inp.groups if not g.ready)
    picked: list[int] = []
    # Stale groups that serve nothing go first: replacing them costs no availability.
    candidates = sorted(
        (g for g in inp.groups if not g.updated and not g.busy), key=lambda g: (g.ready, g.index)
    )
    for g in candidates:
        if not g.ready:
            picked.append(g.index)
        elif unavailable < inp.max_unavailable:
            picked.append(g.index)
            unavailable += 1
    return picked


def plan_rollout(inp: RolloutInputs) -> RolloutPlan:
    """Decide which groups (and whether the head) move to the spec now."""
    whole = _head_change(inp) or any(not g.shape_ok for g in inp.groups)
    rolls = [] if inp.paused else _pick(inp, whole)
    target = frozenset(g.index for g in inp.groups if g.template_at_target) | set(rolls)
    head_moves = not inp.paused and _head_change(inp)
    head_at_target = inp.head_template in (None, inp.head_target) or head_moves
    updated = [g for g in inp.groups if g.updated and g.index not in rolls]
    ready_updated = sum(1 for g in updated if g.ready)
    n = len(inp.groups)
    complete = len(updated) == n and ready_updated == n and not _head_change(inp)
    all_updated = len(updated) == n and not _head_change(inp)
    if all_updated:
        reason = REASON_COMPLETE
        message = f"every group runs the current spec ({ready_updated}/{n} ready)"
    elif inp.paused:
        reason = REASON_PAUSED
        message = f"rollout paused with {len(updated)}/{n} groups updated"
    else:
        reason = REASON_ROLLING
        message = _rolling_message(inp, rolls, len(updated), n, whole)
    return RolloutPlan(
        rolls=tuple(rolls),
        target_groups=target,
        head_at_target=head_at_target,
        head_pods=tuple(inp.stale_head_pods) if head_moves else (),
        updated=len(updated),
        ready_updated=ready_updated,
        complete=complete,
        reason=reason,
        message=message,
    )


def _rolling_message(
    inp: RolloutInputs, rolls: Sequence[int], updated: int, n: int, whole: bool
) -> str:
    busy = [g.index for g in inp.groups if g.busy and g.template_at_target and not g.updated]
    moving = sorted(set(rolls) | set(busy))
    what = f"{updated}/{n} groups updated"
    if moving:
        what += "; replacing group" + ("s " if len(moving) > 1 else " ")
        what += ", ".join(str(g) for g in moving)
    if whole:
        why = "the head's template" if _head_change(inp) else "the model or group shape"
        what += f" (all groups at once: {why} changed)"
    return what
