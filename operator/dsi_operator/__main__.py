"""``python -m dsi_operator`` / ``dsi-operator``: run the kopf operator in the foreground.

Examples::

    python -m dsi_operator                      # all namespaces, $KUBECONFIG or .cluster/kubeconfig
    python -m dsi_operator --namespace team-a --namespace team-b
    python -m dsi_operator --liveness http://0.0.0.0:8080/healthz --metrics-port 9090
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import kopf

from dsi_operator._version import __version__
from dsi_operator.runtime import (
    batch_handlers,  # noqa: F401 - imported to register the batch kind's kopf handlers
    handlers,
    metrics,
)
from dsi_operator.runtime.kube import default_kubeconfig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        prog="dsi-operator",
        description="DeepSpeedInference operator: serves DeepSpeed tensor-parallel groups on "
        "KubeRay and restarts whole groups on failure.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable; globs like 'team-*' allowed)",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG, else .cluster/kubeconfig if it exists, "
        "else the in-cluster service account)",
    )
    p.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("DSI_OPERATOR_METRICS_PORT", "0")),
        help="serve Prometheus metrics on this port (0 disables; default 0)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    # Standalone is the default (the chart passes --standalone explicitly); naming both flags
    # is an error rather than the last one silently winning.
    peering = p.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone",
        dest="standalone",
        action="store_const",
        const=True,
        help="no kopf peering: run a single replica (the default)",
    )
    peering.add_argument(
        "--peering",
        dest="standalone",
        action="store_const",
        const=False,
        help="use kopf peering (needs kopf's peering CRDs installed)",
    )
    p.set_defaults(standalone=True)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: run the operator until interrupted."""
    args = parse_args(argv)
    kubeconfig = args.kubeconfig or default_kubeconfig()
    if kubeconfig:
        # kopf's own login (piggybacking on the kubernetes client) reads $KUBECONFIG.
        os.environ["KUBECONFIG"] = os.path.abspath(kubeconfig)
    level = getattr(logging, args.log_level.upper())
    kopf.configure(verbose=level <= logging.DEBUG, quiet=level >= logging.WARNING)
    logging.getLogger().setLevel(level)
    if level > logging.DEBUG:
        # kopf logs every event handler's success at INFO: one line per pod/node event.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    memo = handlers.new_memo(kubeconfig, exact_namespaces=_exact(args.namespace))
    metrics.serve(args.metrics_port)
    logging.getLogger("dsi_operator").info(
        "dsi-operator %s starting (%s; kubeconfig %s)",
        __version__,
        "namespaces " + ",".join(args.namespace) if args.namespace else "all namespaces",
        kubeconfig or "in-cluster",
    )
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        liveness_endpoint=args.liveness,
        memo=memo,
    )
    return 0


def _exact(namespaces: Sequence[str]) -> bool:
    """True when every namespace is a plain name (no globs/negations): no need to list them."""
    return bool(namespaces) and not any(set(n) & set("*?[]!,") for n in namespaces)


if __name__ == "__main__":
    sys.exit(main())
