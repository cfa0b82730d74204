"""Process nodes: the project's images' entrypoints (read from the Dockerfile), kept pod logs."""

from __future__ import annotations

from pathlib import Path

import pytest
from dsi_localcluster import config
from dsi_localcluster.kubelet import images, podspec

DOCKERFILE = """
FROM python:3.11 AS wheel
RUN build
FROM python:3.11-slim AS operator
ENTRYPOINT ["python", "-m", "dsi_operator"]
CMD ["--all-namespaces"]
FROM ray AS worker
CMD ["bash"]
"""


def test_each_stage_keeps_its_own_entrypoint_and_cmd() -> None:
    got = images.dockerfile_entrypoints(DOCKERFILE)
    assert got == {
        "operator": images.Entrypoint(("python", "-m", "dsi_operator"), ("--all-namespaces",))
    }  # the worker stage has a CMD but no ENTRYPOINT: nothing to stand in for


@pytest.mark.parametrize(
    "image, repo",
    [
        ("ghcr.io/o/operator:0.1.0", "ghcr.io/o/operator"),
        ("localhost:5000/operator", "localhost:5000/operator"),
        ("localhost:5000/operator:1@sha256:ab12", "localhost:5000/operator"),
        ("operator", "operator"),
    ],
)
def test_repository_drops_tag_and_digest_but_not_a_registry_port(image: str, repo: str) -> None:
    assert images.repository(image) == repo


def test_the_charts_operator_image_runs_the_dockerfiles_entrypoint() -> None:
    known = images.project_images(config.repo_root())
    import yaml

    values = yaml.safe_load((config.repo_root() / "charts/dsi-operator/values.yaml").read_text())
    entry = known[values["image"]["repository"]]
    assert entry.entrypoint == ("python", "-m", "dsi_operator")
    image = values["image"]["repository"] + ":0.1.0"
    c = {"name": "operator", "image": image, "args": ["--namespace=a", "--standalone"]}
    assert podspec.argv(c, {}, known) == [
        "python",
        "-m",
        "dsi_operator",
        "--namespace=a",
        "--standalone",
    ]
    # No args: the image's CMD, as a kubelet does; a command replaces the entrypoint.
    assert podspec.argv({"name": "o", "image": image}, {}, known)[3:] == list(entry.cmd)
    assert podspec.argv({"name": "o", "image": image, "command": ["sh"]}, {}, known) == ["sh"]


def test_an_unknown_image_without_a_command_still_needs_one() -> None:
    with pytest.raises(podspec.PodSpecError, match="no command"):
        podspec.argv({"name": "c", "image": "busybox"}, {}, {})
    assert podspec.argv({"name": "c", "image": "busybox", "args": ["sleep", "1"]}, {}) == [
        "sleep",
        "1",
    ]


def test_keep_logs_copies_container_and_ray_session_logs(tmp_path: Path) -> None:
    from dsi_localcluster.kubelet import runtime

    pod = tmp_path / "pod"
    (pod / "logs").mkdir(parents=True)
    (pod / "logs" / "ray-worker.0.log").write_text("exit 1")
    session = pod / "tmp" / "ray" / "session_2026-12-07_10-00-00_1" / "logs"
    session.mkdir(parents=True)
    (session / "raylet.out").write_text("node is dead")
    (pod / "tmp" / "ray" / "session_latest").symlink_to(session.parent)
    runtime.keep_logs(pod, tmp_path / "kept")
    assert (tmp_path / "kept" / "containers" / "ray-worker.0.log").read_text() == "exit 1"
    kept = tmp_path / "kept" / "session_2026-12-07_10-00-00_1" / "raylet.out"
    assert kept.read_text() == "node is dead"
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [
        "containers",
        "session_2026-12-07_10-00-00_1",
    ]
