"""Pure rendering of a DeepSpeedInference into its children (golden files + properties).

Regenerate the golden files after an intended rendering change with::

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render.py

and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsi_localcluster.builders import DSIWrapper
from dsi_operator.api import labels as L
from dsi_operator.api.crd import dump_yaml
from dsi_operator.api.quantity import scale_quantity
from dsi_operator.api.spec import DEFAULT_WORKER_IMAGE, parse_spec
from dsi_operator.serving import render
from dsi_operator.serving.render import (
    NCCL_DEFAULTS,
    expected_pods,
    head_hash,
    render_body,
    render_children,
    serve_config,
    serve_shape_hash,
    spec_hash_by_group,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
NAME, NS, UID = "llm", "serving", "0b5c3b8e-6a43-4f0e-9d7c-2f1f3c2a9e01"
IMAGE = "registry.example.com/dsi/worker:test"


def _spec(**overrides: Any) -> dict[str, Any]:
    wrapper = DSIWrapper(NAME).model("facebook/opt-66b", "float16").set(image=IMAGE)
    return wrapper.replace(**overrides).spec()


CASES: dict[str, dict[str, Any]] = {
    # The minimal resource: defaults everywhere, GPU Operator conventions, no runtime class.
    "tp1-replicas1": _spec(tensorParallelSize=1, replicas=1),
    "tp2-replicas1": _spec(tensorParallelSize=2, replicas=1),
    "tp8-replicas1": _spec(
        tensorParallelSize=8,
        replicas=1,
        resources={"gpus": 1, "cpu": "12", "memory": "160Gi"},
    ),
    "tp2-replicas3": _spec(tensorParallelSize=2, replicas=3),
    # Several ranks per pod: a whole TP-8 group in one 8-GPU pod; TP 16 as two such pods
    # (ranks 0-7 and 8-15); TP 4 as two pods of two ranks, twice.
    "tp8-8-per-pod": _spec(
        tensorParallelSize=8,
        ranksPerPod=8,
        replicas=1,
        resources={"gpus": 1, "cpu": "12", "memory": "160Gi"},
    ),
    "tp16-8-per-pod": _spec(
        tensorParallelSize=16,
        ranksPerPod=8,
        replicas=1,
        resources={"gpus": 1, "cpu": "12", "memory": "160Gi"},
    ),
    "tp4-2-per-pod": _spec(
        tensorParallelSize=4,
        ranksPerPod=2,
        replicas=2,
        resources={"gpus": 1, "cpu": "7500m", "memory": "64Gi"},
        gpu={"sharedMemorySize": "8Gi"},
    ),
    # A MIG slice as the GPU resource, 2 per rank, custom placement; still no runtime class.
    "custom-gpu-resource": _spec(
        tensorParallelSize=2,
        replicas=1,
        resources={"gpus": 2, "cpu": "8", "memory": "64Gi"},
        gpu={
            "resourceName": "nvidia.com/mig-3g.40gb",
            "nodeSelector": {"nvidia.com/mig.strategy": "mixed"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
            ],
            "sharedMemorySize": "8Gi",
        },
    ),
    # Everything optional switched on: runtime class, PVC model, env, pod overrides, head.
    "runtime-class-pvc-overrides": _spec(
        model={
            "pvc": {"claimName": "weights", "path": "llama-70b"},
            "dtype": "bfloat16",
            "servedModelName": "llama-70b",
        },
        tensorParallelSize=4,
        replicas=2,
        imagePullPolicy="IfNotPresent",
        gpu={"runtimeClassName": "nvidia", "requireGPUOperator": True},
        serve={
            "port": 8080,
            "routePrefix": "/llm",
            "maxModelLen": 4096,
            "maxNewTokens": 1024,
            "kernelInject": True,
        },
        head={
            "resources": {"cpu": "4", "memory": "16Gi"},
            "serviceType": "LoadBalancer",
            "nodeSelector": {"pool": "cpu"},
        },
        env=[
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "RANK", "value": "99"},
        ],
        podTemplate={
            "labels": {"team": "ml", "app.kubernetes.io/managed-by": "someone-else"},
            "annotations": {"prometheus.io/scrape": "true"},
            "serviceAccountName": "llm-runner",
            "imagePullSecrets": [{"name": "regcred"}],
            "priorityClassName": "inference",
        },
        masterPort=29600,
        networkPolicy={"enabled": True},
    ),
    # CPU-only ranks (gpus 0) on any node.
    "cpu-only": _spec(
        model={"name": "hf-internal-testing/tiny-random-LlamaForCausalLM", "dtype": "float32"},
        tensorParallelSize=2,
        replicas=1,
        resources={"gpus": 0, "cpu": "1", "memory": "2Gi"},
        gpu={"nodeSelector": {}, "tolerations": []},
    ),
}


def _render(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return render_children(NAME, NS, UID, parse_spec(spec))


# --- Golden files ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = (
        f"# Golden output of render_children({NAME!r}, {NS!r}, <uid>, spec) for case {case!r}\n"
        "# in tests/unit/test_render.py. Regenerate: UPDATE_GOLDEN=1 pytest "
        "tests/unit/test_render.py\n"
        + dump_yaml({"spec": CASES[case], "children": _render(CASES[case])})
    )
    check_golden(GOLDEN / f"{case}.yaml", text)


def check_golden(path: Path, text: str) -> None:
    """``path`` holds ``text`` (with UPDATE_GOLDEN=1: write it first)."""
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
    assert path.read_text() == text, f"{path.name} differs: review, then UPDATE_GOLDEN=1"


def test_no_stale_golden_files() -> None:
    on_disk = {p.stem for p in GOLDEN.glob("*.yaml")}
    assert on_disk == set(CASES)


# --- Properties over every case ------------------------------------------------------------------


def _workers(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rs = children[0]
    return list(rs["spec"]["rayClusterConfig"].get("workerGroupSpecs", []))


def _env(group: dict[str, Any]) -> dict[str, Any]:
    container = group["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_children_shape_owners_and_labels(case: str) -> None:
    spec = parse_spec(CASES[case])
    children = _render(CASES[case])
    policies = spec.replicas if spec.network_policy.enabled else 0
    assert [c["kind"] for c in children] == ["RayService"] + ["Service"] * (spec.replicas + 1) + [
        "NetworkPolicy"
    ] * policies
    assert children[0]["apiVersion"] == "ray.io/v1"
    assert children[0]["metadata"]["name"] == NAME
    assert [c["metadata"]["name"] for c in children[1 : spec.replicas + 2]] == [
        f"{NAME}-g{g}-master" for g in range(spec.replicas)
    ] + [f"{NAME}-api"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == NS
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "deepspeed.ai/v1alpha1",
                "kind": "DeepSpeedInference",
                "name": NAME,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][L.LABEL_INFERENCE] == NAME
        assert meta["labels"][L.LABEL_MANAGED_BY] == "dsi-operator"


def _check_rank_env(env: dict[str, str], spec: Any, pod: int) -> None:
    k = spec.ranks_per_pod
    if k == 1:
        assert (env["RANK"], env["LOCAL_RANK"]) == (str(pod), "0")
        assert "LOCAL_SIZE" not in env  # see DESIGN: CPU shm all-reduce across pods
        assert "NODE_RANK" not in env and "LOCAL_WORLD_SIZE" not in env
    else:
        # Per process, set by the group deployment: no pod-wide value could be right.
        assert "RANK" not in env and "LOCAL_RANK" not in env
        assert env["NODE_RANK"] == str(pod)
        assert env["LOCAL_WORLD_SIZE"] == env["LOCAL_SIZE"] == str(k)
        # Every rank sees the pod's GPUs and picks cuda:LOCAL_RANK (DeepSpeed's set_device).
        noset = env.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")
        assert noset == ("1" if spec.resources.gpus else None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_worker_group_per_pod_with_its_env_and_pin(case: str) -> None:
    spec = parse_spec(CASES[case])
    workers = _workers(_render(CASES[case]))
    k = spec.ranks_per_pod
    assert [(w["groupName"]) for w in workers] == [f"g{g}-r{p * k}" for g, p in expected_pods(spec)]
    for w, (g, p) in zip(workers, expected_pods(spec), strict=True):
        assert (w["replicas"], w["minReplicas"], w["maxReplicas"]) == (1, 1, 1)
        env = _env(w)
        _check_rank_env(env, spec, p)
        assert env["WORLD_SIZE"] == str(spec.tensor_parallel_size)
        assert env["MASTER_ADDR"] == f"{NAME}-g{g}-master.{NS}.svc.cluster.local"
        assert env["MASTER_PORT"] == str(spec.master_port)
        assert env["DSI_GROUP"] == str(g)
        assert "DSI_NUM_GROUPS" not in env  # would roll every group on scale-up
        for key in NCCL_DEFAULTS:
            assert key in env
        params = w["rayStartParams"]
        pinned = json.loads(params["resources"].strip("'"))
        assert pinned == {f"dsi_g{g}_r{r}": 1 for r in range(p * k, (p + 1) * k)}
        assert params["num-gpus"] == str(spec.resources.gpus * k)
        pod = w["template"]
        assert pod["metadata"]["labels"][L.LABEL_GROUP] == str(g)
        assert pod["metadata"]["labels"][L.LABEL_RANK] == str(p * k)
        assert pod["metadata"]["labels"][L.LABEL_ROLE] == "worker"
        assert L.group_of_pod(pod["metadata"]["labels"]) == (g, p)
        container = pod["spec"]["containers"][0]
        assert container["name"] == "ray-worker"
        assert container["image"] == spec.image
        ports = container.get("ports", [])
        if p == 0:
            assert ports == [{"name": "dist", "containerPort": spec.master_port}]
        else:
            assert ports == []
        shm = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm == [
            {
                "name": "dshm",
                "emptyDir": {
                    "medium": "Memory",
                    "sizeLimit": scale_quantity(spec.gpu.shared_memory_size, k),
                },
            }
        ]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_operator_prerequisites(case: str) -> None:
    spec = parse_spec(CASES[case])
    for w in _workers(_render(CASES[case])):
        pod = w["template"]["spec"]
        res = pod["containers"][0]["resources"]
        if spec.resources.gpus:
            for kind in ("requests", "limits"):
                want = spec.resources.gpus * spec.ranks_per_pod
                assert res[kind][spec.gpu.resource_name] == str(want)
        else:
            assert spec.gpu.resource_name not in res.get("limits", {})
        if spec.gpu.runtime_class_name:
            assert pod["runtimeClassName"] == spec.gpu.runtime_class_name
        else:
            assert "runtimeClassName" not in pod
        assert pod.get("nodeSelector", {}) == spec.gpu.node_selector
        assert pod.get("tolerations", []) == [
            t.model_dump(mode="json", by_alias=True, exclude_none=True)
            for t in spec.gpu.tolerations
        ]


def test_default_gpu_settings_follow_the_gpu_operator() -> None:
    (w,) = _workers(_render(CASES["tp1-replicas1"]))
    pod = w["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert "runtimeClassName" not in pod


@pytest.mark.parametrize("case", sorted(CASES))
def test_head_has_no_gpus_and_takes_no_work(case: str) -> None:
    spec = parse_spec(CASES[case])
    head = _render(CASES[case])[0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    container = head["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    assert set(limits) == {"cpu", "memory"}
    assert {"name": "serve", "containerPort": spec.serve.port} in container["ports"]
    assert head["template"]["metadata"]["labels"][L.LABEL_ROLE] == "head"
    assert "tolerations" not in head["template"]["spec"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_master_service_selects_exactly_its_groups_rank0(case: str) -> None:
    spec = parse_spec(CASES[case])
    children = _render(CASES[case])
    pods = {
        (g, p): w["template"]["metadata"]["labels"]
        for w, (g, p) in zip(_workers(children), expected_pods(spec), strict=True)
    }
    for svc in children[1 : spec.replicas + 1]:
        s = svc["spec"]
        assert s["clusterIP"] == "None" and s["publishNotReadyAddresses"] is True
        assert s["ports"][0]["port"] == spec.master_port
        selected = [
            k
            for k, labels in pods.items()
            if all(labels.get(key) == value for key, value in s["selector"].items())
        ]
        g = int(svc["metadata"]["labels"][L.LABEL_GROUP])
        assert selected == [(g, 0)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_serve_config_is_accepted_by_the_worker_app(case: str) -> None:
    from dsi_worker.config import GroupUserConfig, parse_args, parse_user_config

    spec = parse_spec(CASES[case])
    rs = _render(CASES[case])[0]
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert config == serve_config(parse_spec(spec))
    (app,) = config["applications"]
    assert app["import_path"] == "dsi_worker.app:build_app"
    assert app["route_prefix"] == spec.serve.route_prefix
    args = parse_args(app["args"])  # raises if a key or value is not what the worker takes
    # The TP shape is per group (user_config), so a TP change can reach one group at a time.
    groups = [d for d in app["deployments"] if d["name"].startswith("group-")]
    assert [d["name"] for d in groups] == [f"group-{g}" for g in range(spec.replicas)]
    for d in groups:
        config = parse_user_config(GroupUserConfig, d["user_config"], d["name"])
        assert config.active and config.tensor_parallel_size == spec.tensor_parallel_size
        assert (config.ranks_per_pod or 1) == spec.ranks_per_pod
    assert args.num_groups == spec.replicas
    assert args.max_new_tokens == spec.serve.max_new_tokens
    assert args.model_name() == spec.served_model_name
    if spec.model.pvc is not None:
        assert args.model == f"/mnt/model/{spec.model.pvc.path}"


def test_custom_serve_port_sets_http_options() -> None:
    config = serve_config(parse_spec(CASES["runtime-class-pvc-overrides"]))
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8080}
    assert "http_options" not in serve_config(parse_spec(CASES["tp1-replicas1"]))


# --- Specific behaviours ---------------------------------------------------------------------


def test_no_kopf_annotations_or_labels_leak() -> None:
    body = {
        "apiVersion": "deepspeed.ai/v1alpha1",
        "kind": "DeepSpeedInference",
        "metadata": {
            "name": NAME,
            "namespace": NS,
            "uid": UID,
            "generation": 3,
            "annotations": {
                "kopf.zalando.org/last-handled-configuration": '{"spec": {}}',
                "kopf.zalando.org/touch-dummy": "x",
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
            },
            "labels": {"owner-label": "x"},
            "finalizers": ["kopf.zalando.org/KopfFinalizerMarker"],
        },
        "spec": CASES["tp2-replicas3"],
    }
    children = render_body(body)
    text = json.dumps(children)
    assert "kopf" not in text and "last-applied" not in text and "owner-label" not in text
    assert children == _render(CASES["tp2-replicas3"])


def test_user_env_cannot_override_rank_vars_but_can_override_nccl() -> None:
    w = _workers(_render(CASES["runtime-class-pvc-overrides"]))[5]  # group 1, rank 1
    env = _env(w)
    assert env["RANK"] == "1"
    assert env["NCCL_DEBUG"] == "INFO"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    names = [e["name"] for e in w["template"]["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names))


def test_operator_labels_win_over_user_labels() -> None:
    w = _workers(_render(CASES["runtime-class-pvc-overrides"]))[1]
    labels = w["template"]["metadata"]["labels"]
    assert labels[L.LABEL_RANK] == "1" and labels["team"] == "ml"
    assert labels[L.LABEL_MANAGED_BY] == "dsi-operator"


def test_rendering_is_deterministic_and_does_not_mutate_input() -> None:
    spec = copy.deepcopy(CASES["runtime-class-pvc-overrides"])
    first = _render(spec)
    assert spec == CASES["runtime-class-pvc-overrides"]
    assert _render(spec) == first
    assert render_children(NAME, NS, UID, parse_spec(spec)) == first


def test_default_image_is_the_pinned_worker_image() -> None:
    spec = {"model": {"name": "facebook/opt-66b"}}
    rs = _render(spec)[0]
    (w,) = _workers([rs])
    assert w["template"]["spec"]["containers"][0]["image"] == DEFAULT_WORKER_IMAGE
    assert ":" in DEFAULT_WORKER_IMAGE and not DEFAULT_WORKER_IMAGE.endswith(":latest")


def test_endpoint_service_selects_only_the_serving_head() -> None:
    children = _render(_spec())
    svc = children[-1]
    assert svc["metadata"]["name"] == f"{NAME}-api"
    assert svc["spec"]["selector"] == {
        L.LABEL_INFERENCE: NAME,
        "ray.io/node-type": "head",
        "ray.io/serve": "true",
    }
    head_labels = children[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert head_labels["metadata"]["labels"][L.LABEL_INFERENCE] == NAME
    for w in _workers(children):
        # Workers are never selected: a node without a Serve replica runs no proxy.
        assert w["template"]["metadata"]["labels"].get("ray.io/node-type") != "head"


def test_worker_probes_check_the_rank_and_the_raylet_not_the_serve_proxy() -> None:
    for w in _workers(_render(_spec())):
        c = w["template"]["spec"]["containers"][0]
        live = " ".join(c["livenessProbe"]["exec"]["command"])
        assert "local_raylet_healthz" in live and ":8000" not in live
        # Ready = this pod's rank formed its group (the worker's lock on READY_FILE).
        ready = " ".join(c["readinessProbe"]["exec"]["command"])
        assert "flock" in ready and render.READY_FILE in ready and ":8000" not in ready
        assert {"name": "DSI_READY_FILE", "value": render.READY_FILE} in c["env"]


def test_head_prefers_nodes_without_gpus_unless_placed() -> None:
    head = _render(_spec())[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    pref = head["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref[0]["preference"]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}
    ]
    assert "nodeSelector" not in head and "tolerations" not in head
    placed = _spec(
        head={"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "t", "operator": "Exists"}]}
    )
    head = _render(placed)[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"pool": "cpu"} and "affinity" not in head
    assert head["tolerations"] == [{"key": "t", "operator": "Exists"}]


def test_zero_replicas_renders_head_only() -> None:
    children = _render(_spec(replicas=0, tensorParallelSize=4))
    assert [c["kind"] for c in children] == ["RayService", "Service"]  # + the endpoint
    assert "workerGroupSpecs" not in children[0]["spec"]["rayClusterConfig"]


# --- Group hashes ------------------------------------------------------------------------------


def test_group_hash_is_on_every_worker_pod_template() -> None:
    spec = CASES["tp2-replicas3"]
    hashes = spec_hash_by_group(parse_spec(spec))
    assert sorted(hashes) == [0, 1, 2]
    for w in _workers(_render(spec)):
        g, _ = L.parse_worker_group_name(w["groupName"]) or (-1, -1)
        assert w["template"]["metadata"]["annotations"][L.ANNOTATION_GROUP_HASH] == hashes[g]


def test_changes_outside_the_pod_templates_keep_every_group_hash() -> None:
    base = spec_hash_by_group(parse_spec(CASES["tp2-replicas3"]))
    for change in (
        {"restartPolicy": {"maxRestarts": 1, "formationTimeoutSeconds": 60}},
        {"serve": {"maxBatchSize": 32, "maxNewTokens": 64}},
        {"model": {"name": "facebook/opt-30b", "dtype": "float16"}},
    ):
        assert spec_hash_by_group(parse_spec({**CASES["tp2-replicas3"], **change})) == base, change


def test_scaling_up_keeps_existing_groups() -> None:
    spec = CASES["tp2-replicas3"]
    base = spec_hash_by_group(parse_spec(spec))
    scaled = spec_hash_by_group(parse_spec({**spec, "replicas": 5}))
    # KubeRay appends new worker groups in place only when the existing ones are unchanged.
    assert {g: scaled[g] for g in base} == base
    assert set(scaled) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "change",
    [
        {"image": "other:1"},
        {"tensorParallelSize": 4},
        {"resources": {"gpus": 2}},
        {"gpu": {"runtimeClassName": "nvidia"}},
        {"env": [{"name": "X", "value": "1"}]},
        {"masterPort": 29501},
        {"model": {"pvc": {"claimName": "weights"}}},
        {"podTemplate": {"annotations": {"a": "b"}}},
    ],
)
def test_pod_template_changes_roll_every_group(change: dict[str, Any]) -> None:
    base = spec_hash_by_group(parse_spec(CASES["tp2-replicas3"]))
    changed = spec_hash_by_group(parse_spec({**CASES["tp2-replicas3"], **change}))
    assert all(changed[g] != base[g] for g in base)
    assert len(set(base.values())) == len(base)  # groups differ from each other


@pytest.mark.parametrize(
    "change",
    [
        {"head": {"resources": {"cpu": "3"}}},
        {"head": {"image": "head:2"}},
        {"serve": {"port": 9000}},
    ],
)
def test_head_only_changes_keep_group_hashes_and_move_the_head_hash(
    change: dict[str, Any],
) -> None:
    base = parse_spec(CASES["tp2-replicas3"])
    changed = parse_spec({**CASES["tp2-replicas3"], **change})
    assert spec_hash_by_group(changed) == spec_hash_by_group(base)
    assert head_hash(changed) != head_hash(base)


def test_image_moves_head_and_groups_unless_the_head_image_is_pinned() -> None:
    base = parse_spec({**CASES["tp2-replicas3"], "image": "w:1"})
    bumped = parse_spec({**CASES["tp2-replicas3"], "image": "w:2"})
    assert head_hash(bumped) != head_hash(base)
    pinned = {**CASES["tp2-replicas3"], "head": {"image": "w:1"}}
    assert head_hash(parse_spec({**pinned, "image": "w:2"})) == head_hash(base)
    assert spec_hash_by_group(parse_spec({**pinned, "image": "w:2"})) == spec_hash_by_group(bumped)


def test_serve_shape_moves_with_the_model_not_with_tp_or_batching() -> None:
    base = parse_spec(CASES["tp2-replicas3"])
    assert serve_shape_hash(parse_spec({**CASES["tp2-replicas3"], "tensorParallelSize": 4})) == (
        serve_shape_hash(base)
    )  # per group: rolls one group at a time
    for change in ({"model": {"name": "other/m"}}, {"model": {"name": "x", "dtype": "bfloat16"}}):
        assert serve_shape_hash(parse_spec({**CASES["tp2-replicas3"], **change})) != (
            serve_shape_hash(base)
        )
    batching = {"serve": {"maxBatchSize": 32, "maxNewTokens": 64}}
    assert serve_shape_hash(parse_spec({**CASES["tp2-replicas3"], **batching})) == (
        serve_shape_hash(base)
    )


def test_hash_does_not_depend_on_name_or_namespace() -> None:
    spec = CASES["tp2-replicas1"]
    a = render_children("a", "ns1", UID, parse_spec(spec))
    b = render_children("bb", "ns2", UID, parse_spec(spec))
    annotations_a = [w["template"]["metadata"]["annotations"] for w in _workers(a)]
    annotations_b = [w["template"]["metadata"]["annotations"] for w in _workers(b)]
    assert annotations_a == annotations_b


# --- Helpers -------------------------------------------------------------------------------------


def test_helpers() -> None:
    assert L.group_of_pod({L.LABEL_GROUP: "3", L.LABEL_RANK: "1", L.LABEL_ROLE: "worker"}) == (
        3,
        1,
    )
    assert L.group_of_pod({L.LABEL_ROLE: "head", L.LABEL_INFERENCE: "x"}) is None
    assert L.group_of_pod({L.LABEL_GROUP: "x", L.LABEL_RANK: "1"}) is None
    assert L.group_of_pod(None) is None
    assert L.endpoint_url("llm", "ns") == "http://llm-api.ns.svc.cluster.local:8000"
    assert L.parse_worker_group_name(L.worker_group_name(12, 7)) == (12, 7)
    assert L.parse_worker_group_name("headgroup") is None
    assert L.selector_for("llm") == "deepspeed.ai/inference=llm,deepspeed.ai/role=worker"


def test_api_key_secret_reaches_only_the_head_and_never_the_rayservice_text() -> None:
    spec = _spec(
        tensorParallelSize=2,
        replicas=1,
        serve={"apiKeySecret": {"name": "llm-api-key", "key": "token"}},
        env=[{"name": "DSI_API_KEY", "value": "user-set-must-not-win"}],
    )
    rs = _render(spec)[0]
    cluster = rs["spec"]["rayClusterConfig"]
    head_env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    key_env = [e for e in head_env if e["name"] == render.API_KEY_ENV]
    assert key_env == [
        {
            "name": "DSI_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "llm-api-key", "key": "token"}},
        }
    ]
    for w in _workers([rs]):
        assert render.API_KEY_ENV not in _env(w)
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["api_key_env"] == "DSI_API_KEY"
    assert "user-set-must-not-win" not in json.dumps(rs)


def test_no_api_key_secret_no_key_env_and_no_auth_arg() -> None:
    rs = _render(_spec(tensorParallelSize=1, replicas=1))[0]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert render.API_KEY_ENV not in {e["name"] for e in head.get("env", [])}
    assert (
        "api_key_env" not in yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    )


def test_pods_meet_restricted_by_default_and_baseline_renders_none_of_it() -> None:
    strict = _render(_spec(tensorParallelSize=2, replicas=1))[0]["spec"]["rayClusterConfig"]
    groups = [strict["headGroupSpec"], *strict["workerGroupSpecs"]]
    for g in groups:
        pod = g["template"]["spec"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert pod["containers"][0]["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    loose_spec = _spec(tensorParallelSize=2, replicas=1, podTemplate={"securityLevel": "baseline"})
    loose = _render(loose_spec)[0]["spec"]["rayClusterConfig"]
    for g in [loose["headGroupSpec"], *loose["workerGroupSpecs"]]:
        assert "securityContext" not in g["template"]["spec"]
        assert "securityContext" not in g["template"]["spec"]["containers"][0]


# --- NetworkPolicies (spec.networkPolicy.enabled) ---------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_network_policies_fence_each_groups_ranks() -> None:
    spec = _spec(tensorParallelSize=2, replicas=2, networkPolicy={"enabled": True})
    children = _render(spec)
    policies = [c for c in children if c["kind"] == "NetworkPolicy"]
    assert [p["metadata"]["name"] for p in policies] == [f"{NAME}-g0-ranks", f"{NAME}-g1-ranks"]
    rs = children[0]["spec"]["rayClusterConfig"]
    head = rs["headGroupSpec"]["template"]["metadata"]["labels"]
    workers = {
        tuple(map(int, w["groupName"][1:].split("-r"))): w["template"]["metadata"]["labels"]
        for w in rs["workerGroupSpecs"]
    }
    for g, pol in enumerate(policies):
        assert pol["metadata"]["ownerReferences"][0]["uid"] == UID
        ps = pol["spec"]
        assert ps["policyTypes"] == ["Ingress"]  # egress (head, DNS, model store) stays open
        # Applies to exactly group g's rank pods...
        assert {k for k, lab in workers.items() if _selects(ps["podSelector"], lab)} == {
            (g, 0),
            (g, 1),
        }
        assert not _selects(ps["podSelector"], head)
        # ...and lets in exactly the head and group g's own ranks.
        peers = [peer["podSelector"] for rule in ps["ingress"] for peer in rule["from"]]
        allowed = {k for k, lab in workers.items() if any(_selects(p, lab) for p in peers)}
        assert allowed == {(g, 0), (g, 1)}
        assert any(_selects(p, head) for p in peers)
        assert all("ports" not in rule for rule in ps["ingress"])  # NCCL/gloo ports are dynamic


def test_no_network_policies_unless_asked() -> None:
    kinds = [c["kind"] for c in _render(_spec(tensorParallelSize=2, replicas=2))]
    assert "NetworkPolicy" not in kinds
