"""Scaling a DeepSpeedInference: groups switched off and on by ``user_config`` re-form none
of the groups that stay.

The app is deployed the way KubeRay deploys a RayService's serveConfigV2 (the declarative
path: ``apply_config`` on the Serve controller, what ``PUT /api/serve/applications/``
calls), so a new config whose only change is per-deployment ``user_config`` keeps the app's
code version and Serve calls ``reconfigure`` on the running replicas instead of replacing
them. (``serve.run`` would not do: it gives every deploy a new random code version.) One
module-scoped Ray: 2 groups x TP 2 of the tiny model, local mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dsi_localcluster.wait import wait_for
from dsi_worker.ports import free_port

pytestmark = pytest.mark.worker

NUM_GROUPS = 2
TP = 2
FORM_DEADLINE_S = 420
SETTLE_S = 120
APP = "dsi"

ON = {"group-0": {"active": True}, "group-1": {"active": True}, "ingress": {"active_groups": 2}}
OFF = {"group-0": {"active": True}, "group-1": {"active": False}, "ingress": {"active_groups": 1}}


class Deployer:
    """Deploys the app's serve config (import path + args + ``deployments`` overrides)."""

    def __init__(self, client: Any, model_dir: Path, url: str) -> None:
        self.client = client
        self.url = url
        self.args = {
            "model": str(model_dir),
            "dtype": "float32",
            "tensor_parallel_size": TP,
            "num_groups": NUM_GROUPS,
            "max_new_tokens": 8,
            "served_model_name": "tiny",
            "torch_threads": 1,
            "local_mode": True,
        }

    def deploy(self, user_configs: dict[str, Any] | None) -> None:
        """Apply the config; ``user_configs`` (deployment name -> user_config) become the
        ``deployments:`` overrides the operator renders once a group was switched off."""
        from ray.serve.schema import ServeDeploySchema

        app: dict[str, Any] = {
            "name": APP,
            "route_prefix": "/",
            "import_path": "dsi_worker.app:build_app",
            "args": self.args,
        }
        if user_configs is not None:
            app["deployments"] = [{"name": n, "user_config": c} for n, c in user_configs.items()]
        self.client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))


def _health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/healthz", timeout=10)


def _group(g: int) -> dict[str, Any]:
    from ray import serve

    st: dict[str, Any] = (
        serve.get_deployment_handle(f"group-{g}", app_name=APP).status.remote().result()
    )
    return st


def _identity(st: dict[str, Any]) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    """What changes when a group re-forms: its epoch, rank actor names and their pids."""
    return st["epoch"], tuple(st["ranks"]), tuple(i["pid"] for i in st["rank_info"])


def _replicas(deployment: str) -> set[str]:
    """Names of the deployment's live Serve replica actors (a replaced one gets a new name)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if prefix in a["name"]
    }


def _alive(name: str) -> bool:
    import ray
    from dsi_worker.group import RANK_NAMESPACE

    try:
        ray.get_actor(name, namespace=RANK_NAMESPACE)
    except ValueError:
        return False
    return True


def _rank_actors(g: int) -> list[str]:
    """Names of group ``g``'s live rank actors, of any epoch."""
    import ray
    from dsi_worker.group import RANK_NAMESPACE

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == RANK_NAMESPACE and a["name"].startswith(f"dsi-g{g}-")
    ]


def _app_status() -> Any:
    from ray import serve

    return serve.status().applications.get(APP)


def _running() -> bool:
    app = _app_status()
    return app is not None and app.status == "RUNNING"


def _serving(url: str, groups: list[int]) -> bool:
    """The app is RUNNING and /healthz is 200 with exactly ``groups``, all ready."""
    r = _health(url)
    got = [(g["group"], g["state"]) for g in r.json()["groups"]]
    return _running() and r.status_code == 200 and got == [(g, "ready") for g in groups]


def _generate(url: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/generate", json={"prompt": "scale", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path) -> Iterator[Deployer]:
    """The app on a local Ray with every rank resource, deployed with no ``deployments``
    overrides (as every resource is before its first scale-down), all groups formed."""
    import ray
    from dsi_worker.local import start_ray
    from ray import serve
    from ray.serve.context import _get_global_client

    start_ray(NUM_GROUPS, TP, num_cpus=4, namespace="dsi-tests", object_store_mb=100)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        d = Deployer(_get_global_client(), tiny_model_dir, f"http://127.0.0.1:{port}")
        d.deploy(None)
        wait_for(
            lambda: _serving(d.url, [0, 1]),
            FORM_DEADLINE_S,
            "every group to form",
            dump=lambda: str(_app_status()),
        )
        yield d
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def before(app: Deployer) -> dict[str, Any]:
    """Group 0's rank actors and the replicas as first formed, before any scaling."""
    return {
        "group0": _identity(_group(0)),
        "replicas": {d: _replicas(d) for d in ("group-0", "group-1", "ingress")},
    }


def _assert_group0_untouched(before: dict[str, Any]) -> None:
    assert _identity(_group(0)) == before["group0"], "group 0 re-formed"
    assert _replicas("group-0") == before["replicas"]["group-0"], "group 0's replica replaced"


def test_without_user_config_every_group_is_active(app: Deployer, before: dict[str, Any]) -> None:
    sts = [_group(g) for g in range(NUM_GROUPS)]
    assert [(s["state"], s["active"]) for s in sts] == [("ready", True)] * NUM_GROUPS
    assert all(len(s["rank_info"]) == TP for s in sts)
    assert {_generate(app.url)["group"] for _ in range(4)} == {0, 1}


def test_switching_group_1_off_leaves_group_0_alone(app: Deployer, before: dict[str, Any]) -> None:
    ranks1 = _group(1)["ranks"]
    app.deploy(OFF)
    wait_for(
        lambda: _serving(app.url, [0]) and _group(1)["state"] == "inactive",
        SETTLE_S,
        "group 1 switched off",
        dump=lambda: str(_app_status()),
    )
    # Reconfigured, not replaced: the same replicas, group 0's same rank actors.
    _assert_group0_untouched(before)
    assert _replicas("group-1") == before["replicas"]["group-1"]
    assert _replicas("ingress") == before["replicas"]["ingress"]
    # Group 1's rank actors are gone (on Kubernetes their pods are), its replica healthy.
    wait_for(lambda: not any(_alive(n) for n in ranks1), 60, "group 1's rank actors to die")
    st1 = _group(1)
    assert (st1["active"], st1["ranks"], st1["rank_info"], st1["error"]) == (False, [], [], None)
    from ray import serve

    serve.get_deployment_handle("group-1", app_name=APP).check_health.remote().result()
    assert _app_status().deployments["group-1"].status == "HEALTHY"
    # Everything goes to group 0, and readiness counts it alone.
    assert [_generate(app.url)["group"] for _ in range(4)] == [0] * 4
    metrics = httpx.get(f"{app.url}/metrics", timeout=10).text
    assert "dsi_groups 1.0" in metrics and "dsi_groups_ready 1.0" in metrics
    _assert_group0_untouched(before)


def test_bad_user_config_is_a_deploy_error_naming_the_key(
    app: Deployer, before: dict[str, Any]
) -> None:
    # On the switched-off group: its replica, which Serve replaces for a failed reconfigure,
    # has no rank actors to lose.
    app.deploy(OFF)
    wait_for(lambda: _serving(app.url, [0]), SETTLE_S, "group 1 off")
    app.deploy({**OFF, "group-1": {"enabled": False}})

    def reported() -> str | None:
        msg = str(_app_status().deployments["group-1"].message)
        return msg if "enabled" in msg else None

    msg = wait_for(reported, SETTLE_S, "the bad key in group-1's status")
    assert "invalid user_config of deployment group-1" in msg
    # The good config again: group 1 comes back switched off, group 0 never noticed.
    app.deploy(OFF)
    wait_for(
        lambda: _serving(app.url, [0]) and _group(1)["state"] == "inactive",
        SETTLE_S,
        "group 1 back to inactive",
        dump=lambda: str(_app_status()),
    )
    _assert_group0_untouched(before)
    assert _generate(app.url)["group"] == 0
    # Group 1's replica was replaced (the failed reconfigure); the new one, created switched
    # off, never created rank actors.
    assert _replicas("group-1") != before["replicas"]["group-1"]
    assert not _rank_actors(1)


def test_switching_group_1_on_again_forms_it_and_leaves_group_0_alone(
    app: Deployer, before: dict[str, Any]
) -> None:
    app.deploy(OFF)
    wait_for(lambda: _serving(app.url, [0]), SETTLE_S, "group 1 off")
    replicas1 = _replicas("group-1")
    app.deploy(ON)
    wait_for(
        lambda: _serving(app.url, [0, 1]),
        FORM_DEADLINE_S,
        "group 1 to form again",
        dump=lambda: str(_app_status()),
    )
    _assert_group0_untouched(before)
    assert _replicas("group-1") == replicas1, "group 1 formed in its running replica"
    st1 = _group(1)
    assert st1["active"] and len(st1["rank_info"]) == TP
    assert all(_alive(n) for n in st1["ranks"])
    wait_for(lambda: _generate(app.url)["group"] == 1, 60, "a request on group 1", interval=0.2)
    metrics = httpx.get(f"{app.url}/metrics", timeout=10).text
    assert "dsi_groups 2.0" in metrics and "dsi_groups_ready 2.0" in metrics
    # Switched back on is not a restart.
    assert 'dsi_group_restarts_total{group="1"}' not in metrics


def test_a_new_tp_shape_re_forms_only_that_group(app: Deployer, before: dict[str, Any]) -> None:
    """What a TP-size rollout does on the Serve side: group 1's user_config takes the new
    shape when its pods are replaced; group 1 re-forms at it, group 0 keeps serving as it
    was (its replica and rank actors untouched)."""
    app.deploy(ON)
    wait_for(lambda: _serving(app.url, [0, 1]), FORM_DEADLINE_S, "both groups")
    replicas1 = _replicas("group-1")
    reshaped = {**ON, "group-1": {"active": True, "tensor_parallel_size": 1}}
    app.deploy(reshaped)

    def one_rank() -> bool:
        st = _group(1)
        return _serving(app.url, [0, 1]) and len(st["rank_info"]) == 1

    wait_for(one_rank, FORM_DEADLINE_S, "group 1 formed at TP 1", dump=lambda: str(_group(1)))
    _assert_group0_untouched(before)
    assert _replicas("group-1") == replicas1, "reconfigured, not replaced"
    wait_for(lambda: _generate(app.url)["group"] == 1, 60, "a request on group 1", interval=0.2)
    # The same config again changes nothing: no re-forming on a repeated reconfigure.
    epoch = _group(1)["epoch"]
    app.deploy(reshaped)
    assert _group(1)["epoch"] == epoch
    app.deploy(ON)
    wait_for(
        lambda: _serving(app.url, [0, 1]) and len(_group(1)["rank_info"]) == TP,
        FORM_DEADLINE_S,
        "group 1 back at TP 2",
    )
    _assert_group0_untouched(before)


def test_user_config_validation_names_the_key() -> None:
    from dsi_worker.config import GroupUserConfig, parse_ingress_config, parse_user_config

    assert parse_user_config(GroupUserConfig, {"active": False}, "group-1").active is False
    assert parse_ingress_config({"active_groups": 0}, 2).active_groups == 0
    bad: list[tuple[Any, str]] = [
        ({"active": True, "enabled": True}, "enabled"),
        ({"active": "yes"}, "active"),
        ({"active": 1}, "active"),
        ({}, "active"),
        ({"active": True, "tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"active": True, "ranks_per_pod": "2"}, "ranks_per_pod"),
    ]
    for cfg, key in bad:
        with pytest.raises(ValueError, match=f"group-1: .*{key}"):
            parse_user_config(GroupUserConfig, cfg, "group-1")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_user_config(GroupUserConfig, ["active"], "group-1")
    for icfg, key in [
        ({"active_groups": 3}, "active_groups: 3 is more than num_groups"),
        ({"active_groups": -1}, "active_groups"),
        ({"active_groups": True}, "active_groups"),
        ({"active_groups": 1, "groups": [0]}, "groups"),
    ]:
        with pytest.raises(ValueError, match=f"ingress: .*{key}"):
            parse_ingress_config(icfg, 2)


def test_closed_batcher_fails_queued_and_running_requests() -> None:
    """What a group switched off does to its batchers: nobody waits forever."""
    import asyncio

    from dsi_worker.batcher import Batcher, Waiter

    async def main() -> None:
        started = asyncio.Event()

        async def run(waiters: list[Waiter[int]]) -> None:
            started.set()
            await asyncio.Event().wait()  # a batch on ranks that were just killed

        b: Batcher[int] = Batcher(run, max_batch_size=1, wait_s=0.0)
        running, queued = b.submit(1), b.submit(2)
        await started.wait()
        b.close(RuntimeError("group switched off"))
        got = [await asyncio.wait_for(w.out.get(), 5) for w in (running, queued)]
        assert [str(e) for e in got] == ["batch cancelled", "group switched off"]
        assert b.pending() == 0

    asyncio.run(main())
