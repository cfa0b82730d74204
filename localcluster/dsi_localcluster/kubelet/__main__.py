"""``python -m dsi_localcluster.kubelet --node NAME``: the agent of one process-backed node."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from . import apirelay, logs
from .agent import NodeAgent, clean_leftovers, exec_resolver, log_resolver, netns_resolver


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m dsi_localcluster.kubelet", description=__doc__)
    p.add_argument("--node", required=True, help="node name (registered if missing)")
    p.add_argument("--kubeconfig", type=Path, required=True)
    p.add_argument("--state-dir", type=Path, required=True, help="the cluster's state dir")
    p.add_argument("--log-port", type=int, required=True, help="port of the log endpoint")
    p.add_argument(
        "--api-relay-port", type=int, required=True, help="port pods reach the API server on"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the node agent until SIGTERM."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("process nodes need root (network namespaces)", file=sys.stderr)
        return 2
    from kubernetes import config as kconfig

    api: Any = kconfig.new_client_from_config(str(args.kubeconfig))  # type: ignore[no-untyped-call]
    args.state_dir = args.state_dir.resolve()
    root = args.state_dir / "process-nodes"
    clean_leftovers(root, args.node)
    agent = NodeAgent(api, args.node, root, args.log_port, args.api_relay_port)
    pki = args.state_dir / "pki"
    logs.serve(agent.host_ip, args.log_port, pki / "apiserver.crt", pki / "apiserver.key",
               log_resolver(agent), exec_resolver(agent), netns_resolver(agent))  # fmt: skip
    upstream = urllib.parse.urlsplit(api.configuration.host)
    apirelay.serve(
        agent.host_ip, args.api_relay_port, (upstream.hostname or "127.0.0.1", upstream.port or 443)
    )
    agent.register()
    agent.refresh_dns()
    for target in (agent.heartbeat_loop, agent.dns_loop, agent.watch_pods):
        threading.Thread(target=target, daemon=True, name=target.__name__).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    agent.stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
