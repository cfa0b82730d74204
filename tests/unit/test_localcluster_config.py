"""Pure parts of the local cluster: settings, process arguments, manifests, ports, pid files."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dsi_localcluster import build, cluster, config, manifests, pki, statedir
from dsi_localcluster.__main__ import main, parser
from dsi_localcluster.wait import WaitTimeout, wait_for


def test_defaults_match_the_issue() -> None:
    cfg = config.ClusterConfig.from_env({})
    assert (cfg.gpu_nodes, cfg.cpu_nodes, cfg.gpus_per_node, cfg.gpu_taint) == (4, 1, 8, False)
    assert cfg.kubeconfig.name == "kubeconfig" and cfg.kubeconfig.parent.name == ".cluster"


def test_env_and_overrides() -> None:
    env = {
        "DSI_GPU_NODES": "2",
        "DSI_CPU_NODES": "3",
        "DSI_GPUS_PER_NODE": "4",
        "DSI_GPU_TAINT": "true",
        "DSI_PORT_KUBE_APISERVER": "17443",
        "DSI_CLUSTER_DIR": "/tmp/x-cluster",
        "DSI_LOCALCLUSTER_CACHE": "/tmp/x-cache",
    }
    cfg = config.ClusterConfig.from_env(env, gpu_nodes=5, cpu_nodes=None)
    assert (cfg.gpu_nodes, cfg.cpu_nodes, cfg.gpus_per_node, cfg.gpu_taint) == (5, 3, 4, True)
    assert cfg.ports["kube-apiserver"] == 17443
    assert cfg.server_url == "https://127.0.0.1:17443"
    assert cfg.state_dir == Path("/tmp/x-cluster")
    assert cfg.cache_dir == Path("/tmp/x-cache")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DSI_GPU_NODES": "four"}, "not an integer"),
        ({"DSI_GPU_NODES": "-1"}, ">= 0"),
        ({"DSI_GPU_NODES": "0", "DSI_CPU_NODES": "0"}, "at least one node"),
        ({"DSI_GPU_TAINT": "maybe"}, "not a boolean"),
        ({"DSI_PORT_KWOK": "16443"}, "both kube-apiserver and kwok"),
        ({"DSI_PORT_ETCD_CLIENT": "70000"}, "out of range"),
    ],
)
def test_bad_settings_are_rejected(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.ClusterConfig.from_env(env)


def test_processes_listen_on_loopback_only(tmp_path: Path) -> None:
    cfg = config.ClusterConfig.from_env({"DSI_CLUSTER_DIR": str(tmp_path)})
    bins = cluster.binaries(cfg.cache_dir)
    args = cluster.process_args(cfg, statedir.Paths(tmp_path), bins)
    assert list(args) == list(cluster.PROCESS_ORDER)
    joined = "\n".join(a for argv in args.values() for a in argv)
    assert "0.0.0.0" not in joined
    # Every host:port in any flag is on 127.0.0.1.
    for host in re.findall(r"(?:https?://)?([a-z0-9.]+):\d{2,5}\b", joined):
        assert host == "127.0.0.1", host
    for name, port in cfg.ports.items():
        assert f"127.0.0.1:{port}" in joined or f"--secure-port={port}" in joined, name
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        assert "--bind-address=127.0.0.1" in args[name], name
    api = args["kube-apiserver"]
    assert "--anonymous-auth=false" in api
    assert any(a.startswith("--service-account-signing-key-file=") for a in api)
    assert any(a.startswith("--service-cluster-ip-range=") for a in api)
    kwok = args["kwok"]
    assert "--manage-all-nodes=false" in kwok
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in kwok
    kuberay = args["kuberay-operator"]
    # Under a restart loop, as its Deployment would restart it.
    assert kuberay[:2] == ["/bin/bash", "-c"] and "while true" in kuberay[2]
    assert kuberay[4].endswith("/ray-operator")
    assert "--enable-leader-election=true" in kuberay


def test_port_in_use_names_the_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not cluster.port_is_free(port)
        with pytest.raises(cluster.PortInUseError, match=rf"port {port} .*kube-apiserver"):
            cluster.check_ports(
                {"etcd-client": 1, "kube-apiserver": port}, is_free=lambda p: p != port
            )
    cluster.check_ports({"a": 1, "b": 2}, is_free=lambda p: True)


def test_gpu_nodes_carry_gpu_operator_labels() -> None:
    cfg = config.ClusterConfig.from_env({"DSI_GPU_NODES": "2", "DSI_CPU_NODES": "1"})
    nodes = manifests.nodes(cfg)
    assert [n["metadata"]["name"] for n in nodes] == ["kwok-gpu-0", "kwok-gpu-1", "kwok-cpu-0"]
    gpu = nodes[0]
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.count"] == "8"
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.product"] == config.GPU_PRODUCT
    assert gpu["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert gpu["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert "taints" not in gpu["spec"]
    cpu = nodes[2]
    assert "nvidia.com/gpu" not in cpu["status"]["capacity"]
    assert "nvidia.com/gpu.present" not in cpu["metadata"]["labels"]


def test_gpu_taint_is_optional() -> None:
    node = manifests.gpu_node(0, gpus=4, taint=True)
    assert node["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "4"


def test_node_stages_skip_faulted_nodes(tmp_path: Path) -> None:
    (tmp_path / "node.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kwok.x-k8s.io/v1alpha1",
                "kind": "Stage",
                "metadata": {"name": "node-initialize"},
                "spec": {
                    "resourceRef": {"apiGroup": "v1", "kind": "Node"},
                    "selector": {
                        "matchExpressions": [
                            {"key": ".status.phase", "operator": "In", "values": ["x"]}
                        ]
                    },
                    "next": {"statusTemplate": "{}"},
                },
            }
        )
    )
    (tmp_path / "pod.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kwok.x-k8s.io/v1alpha1",
                "kind": "Stage",
                "metadata": {"name": "pod-ready"},
                "spec": {"resourceRef": {"apiGroup": "v1", "kind": "Pod"}, "next": {}},
            }
        )
    )
    heartbeat = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "node-heartbeat-with-lease"},
        "spec": {"resourceRef": {"apiGroup": "v1", "kind": "Node"}, "next": {}},
    }
    (tmp_path / "node-heartbeat.yaml").write_text(yaml.safe_dump(heartbeat))
    stages = {s["metadata"]["name"]: s for s in manifests.kwok_stages(tmp_path)}
    # Its delayed timer revived lost nodes: it is left out.
    assert "node-heartbeat-with-lease" not in stages
    node_exprs = stages["node-initialize"]["spec"]["selector"]["matchExpressions"]
    assert node_exprs[-1] == {
        "key": f'.metadata.annotations["{manifests.NODE_FAULT_ANNOTATION}"]',
        "operator": "DoesNotExist",
    }
    assert len(node_exprs) == 2
    assert "selector" not in stages["pod-ready"]["spec"]
    text = manifests.kwok_config_yaml(list(stages.values()))
    assert len(list(yaml.safe_load_all(text))) == 2


def test_no_stages_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        manifests.kwok_stages(tmp_path)


def test_pidfiles_detect_stale_and_recycled_pids(tmp_path: Path) -> None:
    paths = statedir.Paths(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        statedir.write_pidfile(paths.pidfile("etcd"), proc.pid, Path(sys.executable))
        # A live pid running some other program is not ours.
        statedir.write_pidfile(paths.pidfile("kwok"), os.getpid(), Path("/bin/not-kwok"))
        statedir.write_pidfile(paths.pidfile("kube-scheduler"), 2**22 + 12345, Path("/x"))
        paths.pidfile("kube-apiserver").write_text("garbage")
        assert cluster.running_processes(paths) == {"etcd": proc.pid}
        assert not paths.pidfile("kwok").exists()
        assert not paths.pidfile("kube-scheduler").exists()
    finally:
        proc.kill()
        proc.wait()
    assert cluster.running_processes(paths) == {}


def test_stop_process_kills_the_group(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    cluster.stop_process(proc.pid, sys.executable, "sleeper", timeout=5)
    assert proc.wait(timeout=5) is not None
    assert not statedir.pid_runs(proc.pid, sys.executable)


def test_down_without_cluster_removes_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "pids").mkdir(parents=True)
    (state / "pids" / "etcd.pid").write_text("999999999\n/nope\n")
    cfg = config.ClusterConfig.from_env({"DSI_CLUSTER_DIR": str(state)})
    assert cluster.down(cfg, quiet=True) is False
    assert not state.exists()


def test_pki_and_kubeconfig(tmp_path: Path) -> None:
    from cryptography import x509

    pki.generate(tmp_path, "10.96.0.0/16", "127.0.0.1", extra_ips=["198.18.0.1"])
    admin = x509.load_pem_x509_certificate((tmp_path / "admin.crt").read_bytes())
    assert "O=system:masters" in admin.subject.rfc4514_string()
    serving = x509.load_pem_x509_certificate((tmp_path / "apiserver.crt").read_bytes())
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    # 198.18.0.1: the process-node pods' gateway, where in-cluster clients reach the server.
    assert {"127.0.0.1", "10.96.0.1", "198.18.0.1"} <= ips
    kc = yaml.safe_load(pki.kubeconfig(tmp_path, "https://127.0.0.1:16443"))
    assert kc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:16443"
    assert kc["users"][0]["user"]["client-certificate-data"]
    assert oct((tmp_path / "sa.key").stat().st_mode & 0o777) == "0o600"


def test_build_commands_pin_versions() -> None:
    k8s_argv, cwd, env = build.KUBERNETES.go_command(Path("/out"))
    assert cwd == build.GOBUILD_DIR / "kubernetes"
    flags = k8s_argv[k8s_argv.index("-ldflags") + 1]
    assert "k8s.io/component-base/version.gitVersion=v1.35.4" in flags
    assert "k8s.io/client-go/pkg/version.gitMinor=35" in flags
    assert k8s_argv[-4:] == [f"k8s.io/kubernetes/cmd/{c}" for c in build.KUBERNETES.binaries]
    etcd_argv, _, _ = build.ETCD.go_command(Path("/out"))
    assert etcd_argv[etcd_argv.index("-o") + 1] == "/out/etcd"
    kwok_argv, cwd, env = build.KWOK.go_command(Path("/out"))
    assert kwok_argv[:2] == ["go", "install"] and env == {"GOBIN": "/out"} and cwd is None
    assert kwok_argv[-1] == f"sigs.k8s.io/kwok/cmd/kwok@{config.KWOK_VERSION}"


@pytest.mark.parametrize(
    "module, requirement",
    [
        ("kubernetes", f"k8s.io/kubernetes {config.KUBERNETES_VERSION}"),
        ("etcd", f"go.etcd.io/etcd/server/v3 {config.ETCD_VERSION}"),
        ("kuberay", f"github.com/ray-project/kuberay/ray-operator {config.KUBERAY_VERSION}"),
    ],
)
def test_wrapper_modules_match_pinned_versions(module: str, requirement: str) -> None:
    gomod = (build.GOBUILD_DIR / module / "go.mod").read_text()
    assert requirement in gomod
    assert (build.GOBUILD_DIR / module / "go.sum").is_file()


def test_is_built_needs_binaries_and_data(tmp_path: Path) -> None:
    comp = build.KUBERAY
    assert not comp.is_built(tmp_path)
    d = comp.dir(tmp_path)
    d.mkdir()
    (d / "ray-operator").write_text("#!/bin/sh\n")
    (d / "ray-operator").chmod(0o755)
    assert not comp.is_built(tmp_path), "CRDs missing"
    (d / "crds").mkdir()
    (d / "crds" / "x.yaml").write_text("{}")
    assert not comp.is_built(tmp_path), "no build key: built by an older build.py"
    (d / build.BUILD_KEY_FILE).write_text(comp.build_key())
    assert comp.is_built(tmp_path)


def test_build_failure_names_component_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = build.Component(
        name="broken",
        version="v0",
        binaries=("x",),
        module_dir=None,
        packages=("example.invalid/nope@v0.0.0",),
        ldflags="",
        minutes="0",
    )
    monkeypatch.setenv("GOPROXY", "off")
    monkeypatch.setenv("GOFLAGS", "-mod=mod")
    with pytest.raises(build.BuildError) as err:
        build.build_component(bad, tmp_path)
    text = str(err.value)
    assert "building broken v0 failed" in text
    assert "last lines of the log" in text and "example.invalid/nope" in text
    assert not bad.dir(tmp_path).exists()


def test_cli_parses_commands() -> None:
    args = parser().parse_args(["up", "--gpu-nodes", "2", "--no-gpu-taint"])
    assert (args.command, args.gpu_nodes, args.gpu_taint) == ("up", 2, False)
    assert parser().parse_args(["build", "etcd"]).components == ["etcd"]


def test_cli_env_and_unknown_component(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSI_CLUSTER_DIR", str(tmp_path))
    assert main(["env"]) == 0
    kube, path = capsys.readouterr().out.strip().splitlines()
    assert kube == f"export KUBECONFIG={tmp_path}/kubeconfig"
    # The built kubectl and helm come first on PATH, so printed hints work on a machine
    # that has neither installed.
    dirs = path.removeprefix("export PATH=").split(":")
    assert dirs[-1] == "$PATH" and (Path(dirs[0]) / "kubectl").name == "kubectl"
    assert any("helm" in d for d in dirs[:-1]) and any("kubernetes" in d for d in dirs[:-1])
    assert main(["build", "nonsense"]) == 1
    assert "unknown component(s) nonsense" in capsys.readouterr().err


def test_wait_for_returns_value_and_dumps_on_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    calls = iter([None, 0, "done"])
    assert wait_for(lambda: next(calls), 5, "thing", interval=0.01) == "done"

    def boom() -> None:
        raise KeyError("nope")

    with pytest.raises(WaitTimeout) as err:
        wait_for(boom, 0.05, "the impossible", dump=lambda: {"phase": "Pending"}, interval=0.01)
    text = str(err.value)
    assert "waiting for the impossible" in text
    assert "KeyError" in text and "phase: Pending" in text
    assert "the impossible" in capsys.readouterr().err


def test_fault_condition_helpers_keep_transition_times() -> None:
    from dsi_localcluster import faults

    conds = [{"type": "Ready", "status": "True", "lastTransitionTime": "old", "reason": "R"}]
    faults._set_condition(conds, "Ready", "True", None)
    assert conds[0]["lastTransitionTime"] == "old" and "reason" not in conds[0]
    faults._set_condition(conds, "Ready", "False", "PodFailed")
    assert conds[0]["status"] == "False" and conds[0]["lastTransitionTime"] != "old"
    faults._set_condition(conds, "ContainersReady", "False")
    assert [c["type"] for c in conds] == ["Ready", "ContainersReady"]

    pod = {
        "spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "j"}]},
        "status": {"containerStatuses": [{"name": "b", "restartCount": 4}]},
    }
    statuses = faults._container_statuses(pod)
    assert [s["name"] for s in statuses] == ["a", "b"]
    assert statuses[1]["restartCount"] == 4 and statuses[0]["restartCount"] == 0
    with pytest.raises(ValueError, match="no container 'c'"):
        faults._check_container({**pod, "metadata": {"name": "p"}}, "c")


def test_env_puts_only_built_tools_on_path_and_says_how_to_build_the_rest(tmp_path: Path) -> None:
    from dsi_localcluster.__main__ import env_lines

    cfg = config.ClusterConfig(cache_dir=tmp_path)
    kubectl = cluster.binaries(tmp_path)["kubectl"]
    kubectl.parent.mkdir(parents=True)
    kubectl.write_text("")
    lines = env_lines(cfg).splitlines()
    assert lines[0] == f"export KUBECONFIG={cfg.kubeconfig}"
    assert lines[1] == f"export PATH={kubectl.parent}:$PATH"  # helm is not built: not on PATH
    assert lines[2:] == ["# helm is not built yet: python -m dsi_localcluster build helm"]
    helm = build.HELM.binary(tmp_path)
    helm.parent.mkdir(parents=True)
    helm.write_text("")
    assert env_lines(cfg).splitlines()[1:] == [f"export PATH={kubectl.parent}:{helm.parent}:$PATH"]
