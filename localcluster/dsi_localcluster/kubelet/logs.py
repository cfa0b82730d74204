"""The node's kubelet API: ``kubectl logs`` (/containerLogs/<ns>/<pod>/<container>) here,
``kubectl exec`` and ``kubectl port-forward`` (/exec/..., /portForward/...) in
:mod:`.streaming`.

The API server connects to the node's InternalIP at daemonEndpoints.kubeletEndpoint.Port
over TLS. It is not given a CA for kubelets here, so any certificate serves; the local
cluster's API server certificate is reused.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import streaming

#: (namespace, pod, container, previous) -> the log file, or None when unknown.
Resolver = Callable[[str, str, str, bool], tuple[Path, Callable[[], bool]] | None]


def tail(data: bytes, lines: int | None) -> bytes:
    """The last ``lines`` lines of data (all when None)."""
    if lines is None:
        return data
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


def _handler(
    resolve: Resolver,
    exec_target: streaming.ExecResolver | None,
    netns_of: streaming.NetnsResolver | None,
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # the API server polls; keep the agent's log quiet

        def _streaming(self) -> bool:
            if exec_target is None or netns_of is None:
                return False
            return streaming.handle(self, exec_target, netns_of)

        def do_POST(self) -> None:  # noqa: N802 - the API server POSTs exec and port-forward
            if not self._streaming():
                self.send_error(404, "only /exec/... and /portForward/... accept POST")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self._streaming():
                return
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            q = urllib.parse.parse_qs(url.query)
            if len(parts) != 4 or parts[0] != "containerLogs":
                self.send_error(404, "only /containerLogs/<ns>/<pod>/<container> is served")
                return
            previous = q.get("previous", ["false"])[0] == "true"
            found = resolve(parts[1], parts[2], parts[3], previous)
            if found is None:
                self.send_error(404, f"no logs for {'/'.join(parts[1:])}")
                return
            path, running = found
            lines = int(q["tailLines"][0]) if "tailLines" in q else None
            follow = q.get("follow", ["false"])[0] == "true"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self._stream(path, lines, follow, running)

        def _stream(
            self, path: Path, lines: int | None, follow: bool, running: Callable[[], bool]
        ) -> None:
            with open(path, "rb") as fh:
                self.wfile.write(tail(fh.read(), lines))
                while follow:
                    chunk = fh.read()
                    if chunk:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    elif not running():
                        return
                    else:
                        time.sleep(0.5)

    return Handler


def serve(
    host: str,
    port: int,
    cert: Path,
    key: Path,
    resolve: Resolver,
    exec_target: streaming.ExecResolver | None = None,
    netns_of: streaming.NetnsResolver | None = None,
) -> ThreadingHTTPServer:
    """Start the node's kubelet API server in a daemon thread and return it (logs; exec and
    port-forward too when their resolvers are given)."""
    server = ThreadingHTTPServer((host, port), _handler(resolve, exec_target, netns_of))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="logs").start()
    return server
