"""`python -m dsi_localcluster build|up|down|status|env` (also the `dsi-localcluster` script)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import build, cluster, config


def parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="dsi-localcluster",
        description="A real local Kubernetes control plane (etcd, kube-apiserver, "
        "kube-controller-manager, kube-scheduler, kwok, KubeRay) with simulated GPU nodes, "
        "listening on 127.0.0.1 only.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build the Go components into the cache (skips cached)")
    b.add_argument(
        "components",
        nargs="*",
        metavar="COMPONENT",
        help=f"any of {', '.join(build.COMPONENTS)} (default: all)",
    )
    b.add_argument("--force", action="store_true", help="rebuild even when cached")

    u = sub.add_parser("up", help="start the cluster (no-op when it already runs)")
    u.add_argument("--gpu-nodes", type=int, help="GPU nodes (env DSI_GPU_NODES, default 4)")
    u.add_argument("--cpu-nodes", type=int, help="CPU-only nodes (env DSI_CPU_NODES, default 1)")
    u.add_argument(
        "--gpus-per-node",
        type=int,
        help="nvidia.com/gpu per GPU node (env DSI_GPUS_PER_NODE, default 8)",
    )
    u.add_argument(
        "--gpu-taint",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="taint GPU nodes nvidia.com/gpu=present:NoSchedule (env DSI_GPU_TAINT, default off)",
    )

    sub.add_parser("down", help="stop every process of the cluster and remove its state")
    s = sub.add_parser("status", help="show which processes run")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("env", help="print `export KUBECONFIG=...` for eval")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        if args.command == "build":
            unknown = [c for c in args.components if c not in build.COMPONENTS]
            if unknown:
                raise ValueError(
                    f"unknown component(s) {', '.join(unknown)}; choose from "
                    f"{', '.join(build.COMPONENTS)}"
                )
            cfg = config.ClusterConfig.from_env()
            build.build(args.components or list(build.COMPONENTS), cfg.cache_dir, args.force)
            for name in args.components or build.COMPONENTS:
                print(f"{name}: {build.COMPONENTS[name].dir(cfg.cache_dir)}")
            return 0
        if args.command == "up":
            cfg = config.ClusterConfig.from_env(
                gpu_nodes=args.gpu_nodes,
                cpu_nodes=args.cpu_nodes,
                gpus_per_node=args.gpus_per_node,
                gpu_taint=args.gpu_taint,
            )
            cluster.up(cfg)
            return 0
        cfg = config.ClusterConfig.from_env()
        if args.command == "down":
            cluster.down(cfg)
            return 0
        if args.command == "status":
            report = cluster.status_report(cfg)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                for name, proc in report["processes"].items():
                    state = (
                        f"pid {proc['pid']}, "
                        + ("healthy" if proc["healthy"] else f"unhealthy: {proc['detail']}")
                        if proc["pid"]
                        else "not running"
                    )
                    print(f"{name:25s} {state}")
                print(f"kubeconfig: {report['kubeconfig']}")
                print("cluster is " + ("up" if report["running"] else "not (fully) running"))
            return 0 if report["running"] else 1
        if args.command == "env":
            print(env_lines(cfg))
            return 0
    except (build.BuildError, cluster.ClusterError, ValueError) as exc:
        print(f"dsi-localcluster {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def env_lines(cfg: config.ClusterConfig) -> str:
    """`export` lines for eval: KUBECONFIG, and PATH with the built kubectl and helm first,
    so the printed hints work on a machine that has neither installed. Only what is built
    goes on PATH (``make run`` builds kubectl, not helm); a comment says how to build the rest."""
    tools = {
        "kubectl": cluster.binaries(cfg.cache_dir)["kubectl"],
        "helm": build.HELM.binary(cfg.cache_dir),
    }
    built = {name: exe for name, exe in tools.items() if exe.exists()}
    dirs = dict.fromkeys(str(exe.parent) for exe in built.values())
    lines = [f"export KUBECONFIG={cfg.kubeconfig}", "export PATH=" + ":".join([*dirs, "$PATH"])]
    component = {"kubectl": build.KUBERNETES.name, "helm": build.HELM.name}
    lines += [
        f"# {name} is not built yet: python -m dsi_localcluster build {component[name]}"
        for name in tools
        if name not in built
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
