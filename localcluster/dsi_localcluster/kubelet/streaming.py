"""The kubelet's streaming endpoints: ``kubectl exec`` and ``kubectl port-forward``.

``/exec/<ns>/<pod>/<container>?command=..&input=1&output=1&error=1&tty=1`` and
``/portForward/<ns>/<pod>`` are upgraded to SPDY/3.1 (:mod:`.spdy`), as the real kubelet
does: kube-apiserver v1.35 turns kubectl's WebSocket into SPDY toward the node
(TranslateStreamCloseWebsocketRequests, on by default) and tunnels port-forward's SPDY
through it, so SPDY is the one protocol a node must speak.

exec speaks remotecommand ``v4.channel.k8s.io``: the client opens an ``error`` stream and
one stream per std stream (and ``resize`` with a TTY); the command's exit status comes back
on ``error`` as a JSON metav1.Status. The command enters the container's network, mount and
UTS namespaces (``nsenter --target <container pid>``), with the container's environment and
working directory: it sees what the container's processes see (pod IP, hostname, volumes,
its own /tmp). Pods share the host's pid namespace here, so ``py-spy dump --pid N`` works
on any pid the command can see.

port-forward speaks ``portforward.k8s.io``: per connection, an ``error`` and a ``data``
stream with the same ``requestID``; the data is relayed to 127.0.0.1:<port> inside the pod's
network namespace (as the real kubelet's runtimes dial localhost in the pod).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import IO

from . import runtime, spdy

log = logging.getLogger("dsi-kubelet")

EXEC_PROTOCOLS = ["v4.channel.k8s.io"]
PORT_FORWARD_PROTOCOLS = ["portforward.k8s.io"]
STREAM_CREATION_TIMEOUT_S = 30.0
#: How long output may keep flowing after the command exited (a background child that
#: holds stdout open must not keep the session open forever).
DRAIN_S = 5.0
CLONE_NEWNET = 0x40000000
TIOCSWINSZ = 0x5414


@dataclass(frozen=True)
class Target:
    """What an exec needs of a running container."""

    pid: int  # the container's main process, whose namespaces the command enters
    env: dict[str, str]  # the container's environment
    cwd: str | None  # the container's workingDir (None: "/", as the container runs)


#: (namespace, pod, container) -> the running container, or a message why there is none.
ExecResolver = Callable[[str, str, str], Target | str]
#: (namespace, pod) -> the pod's network namespace name, or None when not on this node.
NetnsResolver = Callable[[str, str], str | None]


@dataclass(frozen=True)
class ExecOptions:
    """Which streams the client asked for (the kubelet's remotecommand.Options)."""

    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    @classmethod
    def from_query(cls, q: dict[str, list[str]]) -> ExecOptions:
        """From the query the API server sends (input/output/error/tty = "1")."""

        def on(k: str) -> bool:
            return q.get(k, [""])[0] in ("1", "true")

        tty = on("tty")
        # With a TTY stderr is merged into stdout, as the kubelet does.
        return cls(on("input"), on("output"), on("error") and not tty, tty)

    def stream_count(self) -> int:
        """Streams the client opens: error, the std streams asked for, resize with a TTY."""
        return 1 + self.stdin + self.stdout + self.stderr + self.tty


def exit_status(code: int) -> dict[str, object]:
    """The v4 error-stream payload for an exit code (pure): Success, or NonZeroExitCode
    with the code as its ExitCode cause (which kubectl turns into its own exit status)."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def negotiate(offered: list[str], supported: list[str]) -> str | None:
    """The first protocol the client offered that this side supports (pure)."""
    flat = [p.strip() for v in offered for p in v.split(",") if p.strip()]
    return next((p for p in flat if p in supported), None)


# -- the HTTP side ---------------------------------------------------------------------------


def _fail(
    h: BaseHTTPRequestHandler, code: int, msg: str, headers: dict[str, str] | None = None
) -> None:
    body = msg.encode()
    h.send_response(code)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Type", "text/plain; charset=utf-8")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def upgrade(h: BaseHTTPRequestHandler, supported: list[str]) -> spdy.Connection | None:
    """Answer 101 Switching Protocols (SPDY/3.1) with a negotiated stream protocol; on
    failure answer the error, as the kubelet does, and return None."""
    conn_hdr = (h.headers.get("Connection") or "").lower()
    up_hdr = (h.headers.get("Upgrade") or "").lower()
    if "upgrade" not in conn_hdr or "spdy/3.1" not in up_hdr:
        _fail(h, 400, f"unable to upgrade: this node speaks SPDY/3.1, got Upgrade: {up_hdr!r}")
        return None
    proto = negotiate(h.headers.get_all("X-Stream-Protocol-Version") or [], supported)
    if proto is None:
        accepted = {"X-Accepted-Stream-Protocol-Versions": ", ".join(supported)}
        _fail(
            h,
            403,
            f"unable to upgrade: unable to negotiate protocol; server accepts {supported}",
            accepted,
        )
        return None
    # http.server answers HTTP/1.0 by default; an upgrade is an HTTP/1.1 exchange.
    h.protocol_version = "HTTP/1.1"
    h.send_response(101, "Switching Protocols")
    h.send_header("Connection", "Upgrade")
    h.send_header("Upgrade", "SPDY/3.1")
    h.send_header("X-Stream-Protocol-Version", proto)
    h.end_headers()
    h.wfile.flush()
    h.close_connection = True  # no more HTTP requests on this socket
    sock = h.connection
    sock.settimeout(60.0)  # bounds a write to a peer that stopped reading
    # Frames are read through rfile (read1: what it holds, else one socket read) so that
    # bytes it buffered with the request would come first; the Go client sends none before
    # it has read the 101, so select on the socket sees every frame.
    return spdy.Connection(sock, h.rfile.read1)


def handle(h: BaseHTTPRequestHandler, exec_target: ExecResolver, netns_of: NetnsResolver) -> bool:
    """Serve /exec/... or /portForward/... when that is the path; False for other paths."""
    url = urllib.parse.urlsplit(h.path)
    parts = url.path.strip("/").split("/")
    q = urllib.parse.parse_qs(url.query)
    if parts[0] == "exec":
        if len(parts) != 4:
            _fail(h, 404, "only /exec/<namespace>/<pod>/<container> is served")
        else:
            serve_exec(h, parts[1], parts[2], parts[3], q, exec_target)
        return True
    if parts[0] == "portForward":
        if len(parts) != 3:
            _fail(h, 404, "only /portForward/<namespace>/<pod> is served")
        else:
            serve_port_forward(h, parts[1], parts[2], netns_of)
        return True
    return False


# -- exec ------------------------------------------------------------------------------------


def serve_exec(
    h: BaseHTTPRequestHandler,
    ns: str,
    pod: str,
    container: str,
    q: dict[str, list[str]],
    resolve: ExecResolver,
) -> None:
    """One ``kubectl exec``: upgrade, wait for the streams, run, report the exit code."""
    argv = q.get("command") or []
    opts = ExecOptions.from_query(q)
    if not argv:
        _fail(h, 400, "no command given")
        return
    if not (opts.stdin or opts.stdout or opts.stderr):
        _fail(h, 400, "you must specify at least 1 of stdin, stdout, stderr")
        return
    target = resolve(ns, pod, container)
    if isinstance(target, str):
        _fail(h, 404, target)
        return
    conn = upgrade(h, EXEC_PROTOCOLS)
    if conn is None:
        return
    threading.Thread(target=conn.serve, daemon=True, name=f"spdy-exec-{pod}").start()
    try:
        streams = spdy.wait_streams(conn, opts.stream_count(), STREAM_CREATION_TIMEOUT_S)
    except (TimeoutError, EOFError) as e:
        log.info("exec %s/%s: %s", ns, pod, e)
        conn.closed.set()
        return
    try:
        code = run_exec(target, argv, opts, streams)
        status = exit_status(code)
    except OSError as e:  # the command could not start at all
        status = {"metadata": {}, "status": "Failure", "message": f"exec failed: {e}",
                  "reason": "InternalError", "code": 500}  # fmt: skip
    finish_exec(conn, streams, status)


def finish_exec(
    conn: spdy.Connection, streams: dict[str, spdy.Stream], status: dict[str, object]
) -> None:
    """Status on the error stream, every stream half-closed, GOAWAY; then give the client
    a moment to read it all and hang up first (its GOAWAY ends conn.serve)."""
    for kind in ("stdout", "stderr"):
        if kind in streams:
            streams[kind].close()
    err = streams.get("error")
    if err is not None:
        err.write(json.dumps(status).encode())
        err.close()
    if "stdin" in streams:
        streams["stdin"].close()  # the client waits for this to end its stdin copy
    conn.goaway()
    conn.closed.wait(5.0)
    conn.closed.set()


def _command(target: Target, argv: list[str], tty: bool) -> list[str]:
    cmd = runtime.nsenter_argv(target.pid, argv, target.cwd)
    # setsid -c: a new session whose controlling terminal is the pty on stdin, so the
    # shell gets job control and ^C reaches it as SIGINT.
    return ["setsid", "-w", "-c", *cmd] if tty else cmd


def run_exec(
    target: Target, argv: list[str], opts: ExecOptions, streams: dict[str, spdy.Stream]
) -> int:
    """Run the command with its std streams wired to the client's; its exit code (128+N
    for a death by signal N)."""
    env = dict(target.env)
    if opts.tty:
        env.setdefault("TERM", "xterm")
        return _run_tty(target, argv, env, streams)
    pipe, null = subprocess.PIPE, subprocess.DEVNULL
    proc = subprocess.Popen(
        _command(target, argv, tty=False),
        env=env,
        stdin=pipe if opts.stdin else null,
        stdout=pipe if opts.stdout else null,
        stderr=pipe if opts.stderr else null,
        start_new_session=True,  # a signal to the agent's group must not reach it
        cwd="/",
    )
    pumps = []
    for kind, fh in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        if fh is not None:
            pumps.append(_start(_pump_out, fh.fileno(), streams[kind]))
    if proc.stdin is not None:
        _start(_pump_in, streams["stdin"], proc.stdin)
    code = proc.wait()
    for t in pumps:
        t.join(DRAIN_S)
    return 128 - code if code < 0 else code


def _run_tty(
    target: Target, argv: list[str], env: dict[str, str], streams: dict[str, spdy.Stream]
) -> int:
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            _command(target, argv, tty=True), env=env, stdin=slave, stdout=slave,
            stderr=slave, cwd="/",
        )  # fmt: skip
    finally:
        os.close(slave)  # else reading the master never ends (EIO) after the command exits
    out = _start(_pump_out, master, streams["stdout"]) if "stdout" in streams else None
    _start(_hang_up_on_close, streams["error"].conn, proc)
    if "stdin" in streams:
        _start(_pump_in_fd, streams["stdin"], master)
    if "resize" in streams:
        _start(_pump_resize, streams["resize"], master)
    code = proc.wait()
    if out is not None:
        out.join(DRAIN_S)
    os.close(master)
    return 128 - code if code < 0 else code


def _hang_up_on_close(conn: spdy.Connection, proc: subprocess.Popen[bytes]) -> None:
    """A client that went away is a terminal hung up: SIGHUP the session (a shell would
    otherwise wait for input forever)."""
    conn.closed.wait()
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGHUP)
        except ProcessLookupError:
            pass


def _start(fn: Callable[..., None], *args: object) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True, name=f"exec-{fn.__name__}")
    t.start()
    return t


def _pump_out(fd: int, stream: spdy.Stream) -> None:
    """The command's output to the client until EOF (EIO on a pty whose command exited)."""
    while True:
        try:
            chunk = os.read(fd, spdy.CHUNK)
        except OSError:
            break
        if not chunk:
            break
        stream.write(chunk)
    stream.close()


def _pump_in(stream: spdy.Stream, fh: IO[bytes]) -> None:
    """The client's stdin to the command; closing it when the client half-closes."""
    try:
        while chunk := stream.read():
            fh.write(chunk)
            fh.flush()
    except (OSError, ValueError):
        pass  # the command exited and closed its stdin
    finally:
        try:
            fh.close()
        except OSError:
            pass


def _pump_in_fd(stream: spdy.Stream, fd: int) -> None:
    """The client's keystrokes to the pty (left open at the client's EOF: a TTY session
    ends when the command exits)."""
    try:
        while chunk := stream.read():
            os.write(fd, chunk)
    except OSError:
        pass


def _pump_resize(stream: spdy.Stream, fd: int) -> None:
    """Apply the client's terminal sizes: one JSON object {"Width", "Height"} per line."""
    buf = b""
    while chunk := stream.read():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                size = json.loads(line)
                winsize = struct.pack("HHHH", int(size["Height"]), int(size["Width"]), 0, 0)
                fcntl.ioctl(fd, TIOCSWINSZ, winsize)
            except (ValueError, KeyError, TypeError, OSError):
                continue


# -- port-forward ----------------------------------------------------------------------------


def serve_port_forward(
    h: BaseHTTPRequestHandler, ns: str, pod: str, resolve: NetnsResolver
) -> None:
    """One ``kubectl port-forward`` session: pairs of streams, each pair one connection."""
    netns = resolve(ns, pod)
    if netns is None:
        _fail(h, 404, f"pod {ns}/{pod} is not running on this node")
        return
    conn = upgrade(h, PORT_FORWARD_PROTOCOLS)
    if conn is None:
        return
    threading.Thread(target=conn.serve, daemon=True, name=f"spdy-pf-{pod}").start()
    pairs: dict[str, dict[str, spdy.Stream]] = {}
    while (s := conn.new_streams.get()) is not None:
        kind = s.header("streamtype")
        # Old clients send no requestID: error and data streams are then consecutive ids.
        rid = s.header("requestid") or str(s.id if kind == "error" else s.id - 2)
        pair = pairs.setdefault(rid, {})
        pair[kind] = s
        if "error" in pair and "data" in pair:
            del pairs[rid]
            _start(forward, netns, pair["data"], pair["error"])
    conn.closed.set()


def dial_in_netns(netns: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port inside network namespace ``netns``.

    setns changes the namespace of the calling thread only, so a short-lived thread enters
    it and connects; the socket stays in that namespace wherever it is used afterwards."""
    result: dict[str, socket.socket | OSError] = {}

    def run() -> None:
        try:
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["sock"] = socket.create_connection(("127.0.0.1", port), timeout)
        except OSError as e:
            result["err"] = e

    t = threading.Thread(target=run, name=f"dial-{netns}")
    t.start()
    t.join()
    got = result.get("sock") or result.get("err") or OSError("dial failed")
    if isinstance(got, OSError):
        raise got
    got.settimeout(None)
    return got


def forward(netns: str, data: spdy.Stream, err: spdy.Stream) -> None:
    """Relay one forwarded connection between its data stream and the pod's port."""
    port_s = data.header("port")
    try:
        sock = dial_in_netns(netns, int(port_s))
    except (OSError, ValueError) as e:
        err.write(f"error forwarding port {port_s} to pod: {e}".encode())
        err.close()
        data.reset()
        err.reset()
        return

    def upstream() -> None:
        try:
            while chunk := data.read():
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)  # the client half-closed: so does the pod's side
        except OSError:
            pass

    _start(upstream)
    try:
        while chunk := sock.recv(spdy.CHUNK):
            data.write(chunk)
    except OSError:
        pass
    data.close()
    err.close()
    sock.close()
