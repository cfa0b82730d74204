"""Rendering a DeepSpeedBatchInference (pure): golden RayJobs, the contract with the job's
arguments, and the properties that keep batch pods apart from serving ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_operator.api import labels as L
from dsi_operator.api.batch_spec import parse_batch_spec
from dsi_operator.api.crd import dump_yaml
from dsi_operator.api.spec import parse_spec
from dsi_operator.batch.render import batch_args, render_batch_children, render_rayjob
from dsi_operator.serving.render import render_children
from test_render import check_golden

GOLDEN = Path(__file__).parent / "golden" / "batch"
NAME, NS, UID = "sweep", "team-a", "uid-1"

BASE: dict[str, Any] = {
    "model": {"pvc": {"claimName": "models", "path": "opt-66b"}, "dtype": "float16"},
    "tensorParallelSize": 2,
    "replicas": 2,
    "resources": {"gpus": 1, "cpu": "8", "memory": "64Gi"},
    "input": {"claimName": "data", "path": "prompts", "format": "parquet", "idColumn": "id"},
    "output": {"claimName": "results", "path": "runs/1"},
}
CASES: dict[str, dict[str, Any]] = {
    "tp2-groups2-pvc": BASE,
    "tp1-hub-paths-own-account": {
        "model": {"name": "facebook/opt-125m", "revision": "main"},
        "input": {"path": "/data/prompts.jsonl"},
        "output": {"path": "/data/out", "format": "parquet"},
        "generation": {"maxTokens": 16, "temperature": 0.7, "seed": 7},
        "podTemplate": {"serviceAccountName": "batch-runner"},
        "restartPolicy": {"maxJobRetries": 0},
        "activeDeadlineSeconds": 3600,
    },
}


def _render(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return render_batch_children(NAME, NS, UID, parse_batch_spec(spec))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = (
        f"# Golden output of render_batch_children({NAME!r}, {NS!r}, <uid>, spec), case "
        f"{case!r}\n# in tests/unit/test_batch_render.py. Regenerate: UPDATE_GOLDEN=1 pytest "
        "tests/unit/test_batch_render.py\n"
        + dump_yaml({"spec": CASES[case], "children": _render(CASES[case])})
    )
    check_golden(GOLDEN / f"{case}.yaml", text)


def test_no_stale_golden_files() -> None:
    assert {p.stem for p in GOLDEN.glob("*.yaml")} == set(CASES)


def _pod_templates(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [
        w["template"] for w in cluster["workerGroupSpecs"]
    ]


def test_batch_pods_never_carry_the_serving_label() -> None:
    rayjob = _render(BASE)[-1]
    text = json.dumps(rayjob)
    assert L.LABEL_INFERENCE not in text
    for tpl in _pod_templates(rayjob):
        assert tpl["metadata"]["labels"][L.LABEL_BATCH] == NAME


def test_worker_pods_equal_the_serving_pods_but_for_batch_parts() -> None:
    """Same cluster fields -> the same rank pods as a DeepSpeedInference, except the label
    key, the rendezvous address, the data volumes and the ServiceAccount."""
    serving = render_children(
        NAME, NS, UID, parse_spec({k: v for k, v in BASE.items() if k not in ("input", "output")})
    )[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    batch = _render(BASE)[-1]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [w["groupName"] for w in batch] == [w["groupName"] for w in serving]
    for s, b in zip(serving, batch, strict=True):
        assert b["rayStartParams"] == s["rayStartParams"]
        sc, bc = s["template"]["spec"]["containers"][0], b["template"]["spec"]["containers"][0]
        assert bc["resources"] == sc["resources"]
        senv = {e["name"]: e.get("value") for e in sc["env"]}
        benv = {e["name"]: e.get("value") for e in bc["env"]}
        g = b["template"]["metadata"]["labels"][L.LABEL_GROUP]
        assert benv.pop("MASTER_ADDR") == f"{NAME}-g{g}-rdzv.{NS}.svc.cluster.local"
        senv.pop("MASTER_ADDR")
        assert benv == senv
        mounts = {m["mountPath"]: m.get("readOnly") for m in bc["volumeMounts"]}
        assert mounts[L.BATCH_INPUT_MOUNT_PATH] is True
        assert mounts[L.BATCH_OUTPUT_MOUNT_PATH] is False
        assert b["template"]["spec"]["serviceAccountName"] == f"{NAME}-batch"


def test_rendezvous_service_selects_rank0_of_its_group_by_the_batch_label() -> None:
    services = [c for c in _render(BASE) if c["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == [f"{NAME}-g0-rdzv", f"{NAME}-g1-rdzv"]
    assert services[1]["spec"]["selector"] == {
        L.LABEL_BATCH: NAME,
        L.LABEL_GROUP: "1",
        L.LABEL_RANK: "0",
        L.LABEL_ROLE: L.ROLE_WORKER,
    }
    assert services[1]["spec"]["clusterIP"] == "None"


def test_every_child_is_owned_by_the_batch_resource() -> None:
    for child in _render(BASE):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (L.BATCH_KIND, NAME, UID)
        assert child["metadata"]["labels"][L.LABEL_BATCH] == NAME


def test_progress_role_grants_one_configmap_only() -> None:
    kinds = {c["kind"]: c for c in _render(BASE)}
    (rule,) = kinds["Role"]["rules"]
    assert rule == {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [f"{NAME}-progress"],
        "verbs": ["get", "patch"],
    }
    assert kinds["RoleBinding"]["subjects"][0]["name"] == f"{NAME}-batch"
    own = {c["kind"] for c in _render(CASES["tp1-hub-paths-own-account"])}
    assert "ServiceAccount" not in own  # the user's account is bound, none is made


def test_job_args_are_what_the_worker_accepts() -> None:
    """The contract with ``python -m dsi_worker.batch``: the rendered runtime env parses as
    its BatchArgs, with the data paths under the mounts."""
    from dsi_worker.batch.args import parse_batch_args

    for spec in CASES.values():
        rayjob = render_rayjob(NAME, NS, UID, parse_batch_spec(spec))
        env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]
        args = parse_batch_args(json.loads(env[L.BATCH_ARGS_ENV]))
        assert env[L.BATCH_PROGRESS_ENV] == f"{NAME}-progress"
        assert env[L.BATCH_NAMESPACE_ENV] == NS
        assert args.num_groups == parse_batch_spec(spec).replicas
    args = parse_batch_args(batch_args(parse_batch_spec(BASE)))
    assert args.input.path == "/mnt/dsi-input/prompts"
    assert args.output.path == "/mnt/dsi-output/runs/1"
    assert args.model == "/mnt/model/opt-66b"
    assert (args.input.format, args.input.id_column) == ("parquet", "id")


def test_retry_budget_and_cleanup_reach_the_rayjob() -> None:
    spec = render_rayjob(NAME, NS, UID, parse_batch_spec(CASES["tp1-hub-paths-own-account"]))
    assert spec["spec"]["backoffLimit"] == 0
    assert spec["spec"]["activeDeadlineSeconds"] == 3600
    assert spec["spec"]["shutdownAfterJobFinishes"] is True
    assert spec["spec"]["ttlSecondsAfterFinished"] == 60
    assert spec["spec"]["entrypoint"] == "python -m dsi_worker.batch"


def test_rank_pods_are_ready_when_their_raylet_is() -> None:
    """KubeRay submits a RayJob only once every pod is Ready, and a batch group forms inside
    the job: serving's "rank formed" readiness would never turn true."""
    rayjob = _render(BASE)[-1]
    for w in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        probe = w["template"]["spec"]["containers"][0]["readinessProbe"]
        command = " ".join(probe["exec"]["command"])
        assert "local_raylet_healthz" in command and "flock" not in command
