"""``Controller.reconcile_one`` against an in-memory client that can fail any call: one table
of cases (in the manner of LWS's ``leaderworkerset_status_test.go``), each a starting world,
something that happens, and what the pass must have done: its outcome, why it planned, the
status it wrote, and the API calls it made, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from dsi_localcluster.builders import DSIWrapper
from dsi_operator.api import labels as L
from dsi_operator.runtime import controller as controller_module
from dsi_operator.runtime.controller import Controller
from dsi_operator.runtime.execute import AppliedChildren, ApplyInterrupted, ChildrenScope
from dsi_operator.runtime.passes import PLANNED, Outcome, PassResult, Replan
from dsi_operator.serving.plan import EVENT_GROUP_RESTART, EVENT_INVALID
from dsi_operator.serving.restart import PodInfo
from fakekube import DSI, DSI_STATUS, FakeKube, Key
from kubernetes.client.exceptions import ApiException

CLUSTER = "demo-raycluster"


class Kicks:
    """Stands in for the work queue: records the passes the controller asks for."""

    def __init__(self) -> None:
        self.causes: list[str] = []

    def kick(self, key: Key, cause: str, urgent: bool = False) -> None:
        self.causes.append(cause)


@dataclass
class World:
    """A fake cluster, a controller over it, and one DSI."""

    kube: FakeKube = field(default_factory=FakeKube)
    ctrl: Controller = field(default_factory=Controller)
    kicks: Kicks = field(default_factory=Kicks)
    key: Key = ("ns", "demo")

    def __post_init__(self) -> None:
        self.ctrl.kube = self.kube
        self.ctrl.scheduler = self.kicks  # type: ignore[assignment]

    def run(self, *, sync: bool = True) -> PassResult:
        """One pass; ``sync``: the watches have caught up with the cluster before it."""
        if sync:
            self.kube.sync(self.ctrl)
        return asyncio.run(self.ctrl.reconcile_one(self.key, "test"))

    @property
    def status(self) -> dict[str, object]:
        return dict(self.kube.dsis[self.key].get("status") or {})

    def group(self, g: int) -> dict[str, object]:
        groups = self.status.get("groups") or []
        assert isinstance(groups, list)
        return dict(groups[g])

    def calls(self) -> list[tuple[str, str]]:
        return [(c.verb, c.resource) for c in self.kube.calls]

    def clear(self) -> None:
        self.kube.calls.clear()
        self.kicks.causes.clear()


# --- starting worlds -------------------------------------------------------------------------


def fresh(replicas: int = 1) -> World:
    """A DSI just created: no status, no children."""
    w = World()
    w.kube.create_dsi(DSIWrapper("demo").tp(2).replicas(replicas).gpus(0).obj())
    return w


def provisioned() -> World:
    """Children applied and status written; no pods yet."""
    w = fresh()
    w.run()
    w.run()
    assert w.status["phase"] == "Provisioning", w.status
    w.clear()
    return w


def pods_running(w: World, *, ready: bool = True) -> None:
    """KubeRay made the group's pods from the current template, and reports the RayService."""
    group_hash = (w.ctrl.parsed(w.kube.dsis[w.key]).group_hashes or {})[0]
    for r in range(2):
        pod = PodInfo(f"demo-g0-r{r}", f"pod-{r}", r, "Running", ready, node_name=None)
        w.kube.add_pod(w.key, 0, replace(pod, cluster=CLUSTER, group_hash=group_hash))
    w.kube.rayclusters[("ns", CLUSTER)] = {"metadata": {"name": CLUSTER}}
    w.kube.set_rayservice_status(
        w.key,
        {
            "conditions": [{"type": "Ready", "status": "True"}],
            "activeServiceStatus": {"rayClusterName": CLUSTER},
        },
    )


def ready() -> World:
    """Serving: its one group formed and Ready."""
    w = provisioned()
    pods_running(w)
    w.run()  # the group forms
    w.run()  # and is Ready
    assert w.status["phase"] == "Ready", w.status
    w.clear()
    return w


def pod_failed() -> World:
    """Ready, then rank 0's pod failed."""
    w = ready()
    group, pod = w.kube.pods[w.key]["pod-0"]
    w.kube.pods[w.key]["pod-0"] = (group, replace(pod, phase="Failed", ready=False))
    return w


# --- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A starting world, what happens before the pass, and what the pass must have done."""

    name: str
    given: Callable[[], World]
    when: Callable[[World], None] = lambda w: None
    outcome: Outcome | None = None  # None: the pass raises ``raises``
    raises: type[Exception] | None = None
    plans: tuple[str, ...] = (PLANNED,)
    check: Callable[[World], None] = lambda w: None
    #: Whether the watches show the cluster as it is when the pass starts.
    watched: bool = True


def _fresh_gets_rayservice_alone(w: World) -> None:
    assert w.calls() == [("apply", "rayservices")]  # no read, no status, no Services yet
    assert w.kicks.causes == ["children"]  # the rest follows at once
    assert w.ctrl.applied[w.key] == AppliedChildren(
        "uid-demo-0123456789",
        w.ctrl.parsed(w.kube.dsis[w.key]).spec_hash or "",
        ChildrenScope.RAYSERVICE_ONLY,
    )
    assert "status" not in w.kube.dsis[w.key]


def _second_pass_applies_the_rest(w: World) -> None:
    # Not the RayService again, and no listing of leftovers: the resource is new.
    assert ("apply", "rayservices") not in w.calls()
    assert [c.name for c in w.kube.made("apply")] == ["demo-g0-master", "demo-api"]
    assert not w.kube.made("list")
    assert w.calls().index(("get", DSI)) < w.calls().index(("patch", DSI_STATUS))
    assert w.status["phase"] == "Provisioning"
    assert w.ctrl.applied[w.key].scope is ChildrenScope.ALL


def _pods_ready_make_it_ready(w: World) -> None:
    assert w.status["phase"] == "Ready" and w.status["readyReplicas"] == 1
    assert not w.kube.made("delete")
    # Nothing left to do: the next pass makes no API call at all and leaves the ticker.
    w.clear()
    assert w.run().outcome is Outcome.NOOP
    assert w.kube.calls == [] and w.key not in w.ctrl.clock_waiters


def _restart_recorded_before_pods_deleted(w: World) -> None:
    assert w.group(0)["restarts"] == 1 and w.status["phase"] == "Restarting"
    assert sorted(w.group(0)["restartPods"]) == ["pod-0", "pod-1"]  # type: ignore[arg-type]
    patch = w.kube.index_of("patch", DSI_STATUS)
    event = w.kube.index_of("create", "events")
    delete = w.kube.index_of("delete", "pods")
    assert patch < event < delete
    # The patch that records the restart is conditional on the version it was planned from.
    assert w.kube.calls[patch].detail[1] is not None
    # The healthy rank goes now; the Failed pod is KubeRay's for its grace period.
    assert [c.name for c in w.kube.made("delete", "pods")] == ["demo-g0-r1"]
    assert [e["reason"] for e in w.kube.events if e["name"]] == [EVENT_GROUP_RESTART]


def _conflict_deletes_nothing_and_requeues(w: World) -> None:
    assert not w.kube.made("delete") and not w.kube.made("create", "events")
    assert "restarts" not in w.group(0) or w.group(0)["restarts"] == 0
    assert w.kicks.causes == ["conflict"]
    # The requeued pass plans again and records the restart once.
    w.clear()
    assert w.run().outcome is Outcome.ACTED
    assert w.group(0)["restarts"] == 1 and w.status["restarts"] == 1
    assert [c.name for c in w.kube.made("delete", "pods")] == ["demo-g0-r1"]


def _delete_error_retried_and_counted_once(w: World) -> None:
    # The status write came first: the restart is on record though no pod was deleted.
    assert w.group(0)["restarts"] == 1 and "pod-1" in w.kube.pods[w.key]
    assert w.key in w.ctrl.clock_waiters  # the ticker retries it
    w.clear()
    assert w.run().outcome is Outcome.ACTED  # continues the recorded restart
    assert [c.name for c in w.kube.made("delete", "pods")] == ["demo-g0-r1"]
    assert w.group(0)["restarts"] == 1 and w.status["restarts"] == 1
    restart_events = [e for e in w.kube.events if e["reason"] == EVENT_GROUP_RESTART]
    assert len(restart_events) == 1
    assert not [c for c in w.kube.made("create", "events") if c.detail == EVENT_GROUP_RESTART]


def _bad_spec_reported_nothing_created(w: World) -> None:
    assert w.status["phase"] == "Failed"
    assert "spec.replicas" in str(w.status["message"])
    assert not w.kube.made("apply") and not w.kube.rayservices and not w.kube.services
    assert [e["reason"] for e in w.kube.events] == [EVENT_INVALID]
    # Reported once; only a spec change helps, so it leaves the ticker.
    w.clear()
    assert w.run().outcome is Outcome.NOOP
    assert w.kube.calls == [] and w.key not in w.ctrl.clock_waiters


def _newer_object_planned_again(w: World) -> None:
    # Planned from the stale copy, the pass would have written generation 1's status.
    assert w.status["observedGeneration"] == 2 and w.status["replicas"] == 2
    assert w.group(0)["restarts"] == 1  # the failed pod's restart, decided again
    assert w.ctrl.dsis[w.key]["metadata"]["generation"] == 2


def _vanished_children_applied_and_planned_with(w: World) -> None:
    assert ("ns", "demo") in w.kube.rayservices
    assert w.ctrl.applied[w.key].scope is ChildrenScope.ALL
    # Planned with the children it just created: the status keeps its endpoint.
    assert "endpoint" in w.status


def _gone_before_write(w: World) -> None:
    assert not w.kube.writes()
    assert w.key not in w.kube.dsis


def _service_apply_error_keeps_the_rayservice_record(w: World) -> None:
    assert ("patch", DSI_STATUS) not in w.calls()
    assert w.ctrl.applied[w.key].scope is ChildrenScope.RAYSERVICE_ONLY
    assert w.kube.made("apply", "services")[0].name == "demo-g0-master"
    assert "demo-g0-master" in w.ctrl.services[w.key]  # written before the error: recorded
    w.clear()
    assert w.run().outcome is Outcome.ACTED
    assert ("apply", "rayservices") not in w.calls()  # still not needed again
    assert w.status["phase"] == "Provisioning"


def _status_gone_stops_before_pods(w: World) -> None:
    assert not w.kube.made("delete") and not w.kube.made("create", "events")
    assert w.kicks.causes == []


def _event_error_is_best_effort(w: World) -> None:
    # The failed Event does not hold up the restart; it is posted on the next pass.
    assert [c.name for c in w.kube.made("delete", "pods")] == ["demo-g0-r1"]
    assert not [e for e in w.kube.events if e["reason"] == EVENT_GROUP_RESTART]
    w.clear()
    w.run()
    assert [e["reason"] for e in w.kube.events if e["name"]] == [EVENT_GROUP_RESTART]
    assert w.group(0)["restarts"] == 1


def _rollout_moves_templates_before_deleting(w: World) -> None:
    rayservice = w.calls().index(("apply", "rayservices"))
    patch = w.kube.index_of("patch", DSI_STATUS)
    delete = w.kube.index_of("delete", "pods")
    assert rayservice < patch < delete
    assert sorted(c.name for c in w.kube.made("delete", "pods")) == ["demo-g0-r0", "demo-g0-r1"]
    assert w.group(0)["restartTrigger"] == "Rollout"


def _cluster_patch_error_moves_nothing(w: World) -> None:
    assert not w.kube.made("delete") and ("patch", DSI_STATUS) not in w.calls()
    # The RayService was written, but its RayCluster does not carry the new template: the
    # controller must not take the template as moved (pods deleted now would come back old).
    annotations = w.ctrl.rayservices[w.key]["metadata"]["annotations"]
    new_hash = w.ctrl.parsed(w.kube.dsis[w.key]).spec_hash
    assert annotations[L.ANNOTATION_SPEC_HASH] != new_hash


def _new_image_and_cluster_patch_fails(w: World) -> None:
    _new_image(w)
    w.kube.fail("patch", "rayclusters", 500)


def _edit_generation(w: World) -> None:
    w.kube.edit_dsi(w.key, replicas=2)


def _lose_children(w: World) -> None:
    w.kube.rayservices.clear()
    w.ctrl.rayservices.clear()


def _new_image(w: World) -> None:
    w.kube.edit_dsi(w.key, image="example.com/other:1")  # in every worker pod template


CASES = [
    Case(
        "a new resource gets its RayService alone, then is queued again",
        fresh,
        outcome=Outcome.FIRST_APPLY,
        check=_fresh_gets_rayservice_alone,
    ),
    Case(
        "the second pass applies the Services and writes status Provisioning",
        lambda: _after(fresh(), 1),
        outcome=Outcome.ACTED,
        check=_second_pass_applies_the_rest,
    ),
    Case(
        "pods Ready and the RayService Ready: Ready, then nothing to do",
        lambda: _with_pods(provisioned()),
        outcome=Outcome.ACTED,
        check=_pods_ready_make_it_ready,
    ),
    Case(
        "a failed pod: the status records the restart before any pod is deleted",
        pod_failed,
        outcome=Outcome.ACTED,
        check=_restart_recorded_before_pods_deleted,
    ),
    Case(
        "409 on the status patch: nothing posted or deleted, queued again",
        pod_failed,
        when=lambda w: w.kube.fail("patch", DSI_STATUS, 409),
        outcome=Outcome.CONFLICT,
        check=_conflict_deletes_nothing_and_requeues,
    ),
    Case(
        "500 on the pod delete: the pass fails, the next one deletes, one restart",
        pod_failed,
        when=lambda w: w.kube.fail("delete", "pods", 500),
        raises=ApiException,
        check=_delete_error_retried_and_counted_once,
    ),
    Case(
        "a bad spec: status Failed naming the field, no child touched",
        lambda: _invalid(),
        outcome=Outcome.ACTED,
        check=_bad_spec_reported_nothing_created,
    ),
    Case(
        "the read before writing finds a newer object: planned again on it",
        lambda: _stale(pod_failed()),
        outcome=Outcome.ACTED,
        plans=(PLANNED, Replan.NEWER_OBJECT),
        check=_newer_object_planned_again,
        watched=False,
    ),
    Case(
        "children deleted behind the operator: applied again and planned with",
        ready,
        when=_lose_children,
        outcome=Outcome.ACTED,
        plans=(PLANNED, Replan.CHILDREN_CREATED),
        check=_vanished_children_applied_and_planned_with,
    ),
    Case(
        "404 on the read before writing: the resource went away, nothing written",
        pod_failed,
        when=lambda w: w.kube.dsis.pop(w.key),
        outcome=Outcome.GONE,
        check=_gone_before_write,
    ),
    Case(
        "500 on a Service apply: the pass fails, what was written is remembered",
        lambda: _after(fresh(), 1),
        when=lambda w: w.kube.fail("apply", "services", 500, after=1),
        raises=ApplyInterrupted,
        check=_service_apply_error_keeps_the_rayservice_record,
    ),
    Case(
        "404 on the status patch: deleted meanwhile, no Event, no pod deleted",
        pod_failed,
        when=lambda w: w.kube.fail("patch", DSI_STATUS, 404),
        outcome=Outcome.GONE,
        check=_status_gone_stops_before_pods,
    ),
    Case(
        "500 on an Event: best effort, the restart goes on; posted next pass",
        pod_failed,
        when=lambda w: w.kube.fail("create", "events", 500),
        outcome=Outcome.ACTED,
        check=_event_error_is_best_effort,
    ),
    Case(
        "a spec change rolls the group: templates first, then status, then pods",
        ready,
        when=_new_image,
        outcome=Outcome.ACTED,
        check=_rollout_moves_templates_before_deleting,
    ),
    Case(
        "500 on the RayCluster patch of a rollout: no pod deleted, template not taken as moved",
        ready,
        when=_new_image_and_cluster_patch_fails,
        raises=ApplyInterrupted,
        check=_cluster_patch_error_moves_nothing,
    ),
]


def _after(w: World, passes: int) -> World:
    for _ in range(passes):
        w.run()
    w.clear()
    return w


def _with_pods(w: World) -> World:
    pods_running(w)
    return w


def _invalid() -> World:
    w = World()
    w.kube.create_dsi(DSIWrapper("demo").tp(2).replicas(2).gpus(0).set(replicas="two").obj())
    return w


def _stale(w: World) -> World:
    """Another writer changed the spec; the watch has not shown it yet."""
    w.kube.sync(w.ctrl)
    _edit_generation(w)
    return w


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reconcile_one(case: Case) -> None:
    w = case.given()
    case.when(w)
    if case.raises is not None:
        with pytest.raises(case.raises):
            w.run(sync=case.watched)
    else:
        got = w.run(sync=case.watched)
        assert got.outcome is case.outcome
        assert got.plans == case.plans
    case.check(w)


def test_a_pass_plans_once_unless_a_step_names_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted at the planner itself: an acting pass over an up-to-date copy plans once (it
    # planned two or three times before the steps were named).
    calls: list[int] = []
    real = controller_module.plan

    def counting(obs: object) -> object:
        calls.append(1)
        return real(obs)  # type: ignore[arg-type]

    w = pod_failed()
    monkeypatch.setattr(controller_module, "plan", counting)
    assert w.run().outcome is Outcome.ACTED and len(calls) == 1
