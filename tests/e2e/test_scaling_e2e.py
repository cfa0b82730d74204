"""Scaling a serving resource for real: `kubectl scale dsi` down and up again while requests
flow. The group that stays keeps its pods, its Serve epoch (no re-forming, no model reload)
and keeps answering; the removed group's pods go; scaling back up forms it again."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from dsi_localcluster.wait import wait_for
from e2e_stack import Stack, background_load


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


def test_scale_down_and_up_leaves_the_staying_group_serving(scaled_stack: Stack) -> None:
    st = scaled_stack
    epochs = {g: h["epoch"] for g, h in _health(st).items()}
    assert sorted(epochs) == [0, 1], _health(st)
    g0_pods = st.uids(0)

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
    groups = (st.dsi().get("status") or {}).get("groups") or []
    assert [g.get("restarts", 0) for g in groups] == [0, 0], st.dump()
