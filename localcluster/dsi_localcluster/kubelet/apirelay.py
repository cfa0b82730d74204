"""The API server as pods see it: a TCP relay on the node's gateway address.

The control plane listens on 127.0.0.1 only, which a pod in its own network namespace
cannot reach (its 127.0.0.1 is its own). Each node agent relays ``<gateway>:<port>`` to the
API server, bytes both ways, TLS untouched end to end (the serving certificate names the
gateway address), so a pod's in-cluster client (``KUBERNETES_SERVICE_HOST``/``_PORT``, its
ServiceAccount token and CA) talks to the real API server. A plain byte pump: nothing in the
standard library relays TCP, and a proxy library would be a dependency for 30 lines.
"""

from __future__ import annotations

import socket
import socketserver
import threading


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass  # either side went away: the other pump ends too
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(host: str, port: int, upstream: tuple[str, int]) -> socketserver.ThreadingTCPServer:
    """Relay ``host:port`` to ``upstream`` from daemon threads; returns the server."""

    class Relay(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with socket.create_connection(upstream, timeout=10) as up:
                up.settimeout(None)
                back = threading.Thread(target=_pump, args=(up, self.request), daemon=True)
                back.start()
                _pump(self.request, up)
                back.join()

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer((host, port), Relay)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="api-relay").start()
    return server
