"""Scaling and rolling out a serving resource for real, while requests flow.

`kubectl scale dsi` down and up again: the group that stays keeps its pods, its Serve epoch
(no re-forming, no model reload) and keeps answering; the removed group's pods go; scaling
back up forms it again. A change of the worker templates then replaces one group at a time:
the other keeps answering, and no more worker pods run than the spec asks for."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from dsi_localcluster.harness import worker_pod_count
from dsi_localcluster.wait import events, sampling, wait_for
from e2e_stack import Stack, background_load, group_restarts


def _health(stack: Stack) -> dict[int, dict[str, Any]]:
    """/healthz's groups by index (200 or 503 alike)."""
    req = urllib.request.Request(f"{stack.endpoint}/healthz")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
    return {int(g["group"]): g for g in body.get("groups") or []}


def _scale(stack: Stack, replicas: int) -> None:
    stack.kubectl("scale", "dsi", stack.name, "-n", stack.namespace, f"--replicas={replicas}")


def test_scale_down_and_up_leaves_the_staying_group_serving(stack: Stack) -> None:
    st = stack
    epochs = {g: h["epoch"] for g, h in _health(st).items()}
    assert sorted(epochs) == [0, 1], _health(st)
    g0_pods = st.uids(0)
    restarts = group_restarts(st)

    t0 = time.monotonic()
    with background_load(st) as load:
        _scale(st, 1)

        def down() -> bool:
            health = _health(st)
            return sorted(health) == [0] and not st.uids(1) and health[0]["state"] == "ready"

        wait_for(down, 180, "group 1 gone, group 0 ready", dump=st.dump, interval=1)
        time.sleep(5)  # requests keep flowing on group 0 alone
    took_down = time.monotonic() - t0
    print(f"\n[e2e] scale 2->1 settled in {took_down:.0f}s; requests meanwhile: {load.summary()}")
    assert _health(st)[0]["epoch"] == epochs[0], "group 0 re-formed on a scale-down"
    assert st.uids(0) == g0_pods, f"group 0 pods replaced\n{st.dump()}"
    assert load.ok_share() == 1.0, load.summary()

    t0 = time.monotonic()
    with background_load(st) as load:
        _scale(st, 2)
        st.wait_ready()

        def both_answer() -> bool:
            health = _health(st)
            return sorted(health) == [0, 1] and all(h["state"] == "ready" for h in health.values())

        wait_for(both_answer, 300, "group 1 formed again", dump=st.dump, interval=1)
        since = time.monotonic()
        wait_for(lambda: load.answered(1, since), 60, "group 1 answers", dump=st.dump)
    took_up = time.monotonic() - t0
    print(f"[e2e] scale 1->2 serving in {took_up:.0f}s; requests meanwhile: {load.summary()}")
    health = _health(st)
    assert health[0]["epoch"] == epochs[0], "group 0 re-formed on a scale-up"
    assert st.uids(0) == g0_pods, f"group 0 pods replaced\n{st.dump()}"
    assert load.ok_share() == 1.0, load.summary()
    # Scaling is not a failure: no group's restart count grew (group 1's record may start
    # again at 0 when it comes back: it is a new group).
    after = group_restarts(st)
    assert after[0] == restarts[0] and after[1] <= restarts[1], st.dump()


def _patch_spec(st: Stack, spec: dict[str, Any]) -> None:
    """What `kubectl patch dsi --type=merge` does."""
    body = json.dumps({"spec": spec})
    st.kubectl("patch", "dsi", st.name, "-n", st.namespace, "--type=merge", "-p", body)


def _both_answer(st: Stack, load: Any) -> None:
    """Until both groups answered a request sent from now on."""
    since = time.monotonic()
    wait_for(
        lambda: load.answered(0, since) and load.answered(1, since),
        120,
        "both groups answer",
        dump=st.dump,
    )


def _rollout_complete(status: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Progressing" and c.get("reason") == "RolloutComplete"
        for c in status.get("conditions") or []
    )


class _PodPeak:
    """Peaks of the worker pods while a rollout runs: the live ones and all of them
    (Terminating pods still hold their GPUs until they are gone)."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.live, self.all = stack, 0, 0

    def sample(self) -> None:
        live, every = worker_pod_count(self.stack.kube.core, self.stack.namespace, self.stack.name)
        self.all, self.live = max(self.all, every), max(self.live, live)


def test_a_rollout_replaces_one_group_at_a_time_while_requests_flow(stack: Stack) -> None:
    st = stack
    before = {g: st.uids(g) for g in (0, 1)}
    assert all(before.values()), st.dump()
    restarts = st.dsi()["status"].get("restarts", 0)
    # A change of the worker templates only (the head keeps its pod): /dev/shm's size.
    patch = {"spec": {"gpu": {"sharedMemorySize": "320Mi"}}}
    t0 = time.monotonic()
    peak = _PodPeak(st)
    with background_load(st) as load, sampling(peak.sample, 0.5):
        _patch_spec(st, patch["spec"])

        def rolled_out() -> bool:
            status = st.dsi().get("status") or {}
            return (
                _rollout_complete(status)
                and status.get("phase") == "Ready"
                and all(st.uids(g) and st.uids(g).isdisjoint(before[g]) for g in (0, 1))
            )

        wait_for(rolled_out, 900, "both groups replaced and Ready", dump=st.dump, interval=1)
        took = time.monotonic() - t0
        _both_answer(st, load)
    status = st.dsi()["status"]
    print(
        f"\n[e2e] rollout of 2 groups x 2 pods: {took:.0f}s ({took / 2:.0f}s per group); "
        f"requests meanwhile: {load.summary()}; peak worker pods {peak.live} live, "
        f"{peak.all} counting Terminating (spec: 4)"
    )
    assert status.get("restarts", 0) == restarts, st.dump()
    assert peak.live <= 4, f"{peak.live} live worker pods during the rollout"
    assert load.ok_share() == 1.0, load.summary()


def test_a_tp_change_rolls_one_group_at_a_time_while_requests_flow(stack: Stack) -> None:
    st = stack
    restarts = st.dsi()["status"].get("restarts", 0)
    t0 = time.monotonic()
    with background_load(st) as load:
        _patch_spec(st, {"tensorParallelSize": 1})

        def reshaped() -> bool:
            status = st.dsi().get("status") or {}
            groups = status.get("groups") or []
            return (
                _rollout_complete(status)
                and status.get("phase") == "Ready"
                and [g.get("ranks") for g in groups] == [1, 1]
                and len(st.pods()) == 2
            )

        wait_for(reshaped, 900, "both groups at TP 1 and Ready", dump=st.dump, interval=1)
        took = time.monotonic() - t0
        _both_answer(st, load)
    print(f"\n[e2e] TP 2 -> 1, one group at a time: {took:.0f}s; requests: {load.summary()}")
    rolls = [e for e in events(st.kube.core, st.namespace) if "GroupRollout" in e]
    assert not any("all groups at once" in e for e in rolls), rolls
    assert (st.dsi().get("status") or {}).get("restarts", 0) == restarts, st.dump()
    assert load.ok_share() == 1.0, load.summary()
