"""The server side of SPDY/3.1, as much of it as the kubelet's streaming endpoints use.

The API server reaches a kubelet's ``/exec`` and ``/portForward`` over SPDY/3.1 (the
Go ``moby/spdystream`` framing): an HTTP upgrade, then multiplexed streams, each opened by
the client with a SYN_STREAM whose headers say what it carries (``streamtype: stdout``).
kube-apiserver v1.35 translates kubectl's WebSocket (v5.channel.k8s.io) into this toward
the kubelet, so SPDY is what a node must speak whatever kubectl uses.

What this does: frames, the zlib header compression with the SPDY/3 dictionary, SYN_REPLY
to every stream the client opens, data with FIN (half-close), RST_STREAM, PING echo and
GOAWAY. What it leaves out, as spdystream does: flow control (WINDOW_UPDATE is ignored),
server-initiated streams, priorities.

Threads: the handler's thread reads frames (:meth:`Connection.serve`); any thread may write.
One lock serializes every TLS read and write, because one ``ssl.SSLSocket`` must not be
used by two threads at once; reads only start once ``select`` (or TLS's own buffer) says a
frame is there, so a writer waits at most one frame.
"""

from __future__ import annotations

import queue
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS = 1, 2, 3, 4
PING, GOAWAY, HEADERS, WINDOW_UPDATE = 6, 7, 8, 9
FLAG_FIN = 0x01
RST_CANCEL = 5
CHUNK = 32 * 1024  # data frames written at most this big (spdystream reads any size)

_NAMES = (
    "options head post put delete trace accept accept-charset accept-encoding "
    "accept-language accept-ranges age allow authorization cache-control connection "
    "content-base content-encoding content-language content-length content-location "
    "content-md5 content-range content-type date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified location "
    "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after "
    "server te trailer transfer-encoding upgrade user-agent vary via warning "
    "www-authenticate method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive"]
_NAMES.append("origin")
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502"
    "504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
    "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
    "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
    "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
    "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,"
    "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
#: The zlib dictionary of SPDY/3 header blocks (spdystream's headerDictionary, 1423 bytes).
DICTIONARY = b"".join(struct.pack(">I", len(n)) + n.encode() for n in _NAMES) + _TAIL.encode()


class ProtocolError(Exception):
    """The peer sent something this endpoint cannot parse."""


def encode_headers(headers: dict[str, list[str]]) -> bytes:
    """A SPDY/3 name/value block (uncompressed): names lowercased, values NUL-joined."""
    out = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        n, v = name.lower().encode(), "\x00".join(values).encode()
        out += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
    return b"".join(out)


def decode_headers(block: bytes) -> dict[str, list[str]]:
    """Parse an uncompressed name/value block into {lowercase name: [values]}."""
    try:
        (count,), pos = struct.unpack_from(">I", block), 4
        headers: dict[str, list[str]] = {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", block, pos)
            name = block[pos + 4 : pos + 4 + n].decode().lower()
            pos += 4 + n
            (n,) = struct.unpack_from(">I", block, pos)
            value = block[pos + 4 : pos + 4 + n].decode()
            pos += 4 + n
            headers.setdefault(name, []).extend(value.split("\x00"))
    except (struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(f"bad header block: {e}") from e
    return headers


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    """A control frame: version and type, then flags and the 24-bit length."""
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    """A data frame of one stream."""
    flags = FLAG_FIN if fin else 0
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


@dataclass
class Stream:
    """One stream the client opened: its headers, what it sent, and a way to answer."""

    conn: Connection
    id: int
    headers: dict[str, list[str]]
    incoming: queue.Queue[bytes | None] = field(default_factory=queue.Queue)
    local_closed: bool = False
    remote_closed: bool = False

    def header(self, name: str) -> str:
        """The first value of a header ("" when absent)."""
        return (self.headers.get(name.lower()) or [""])[0]

    def read(self, timeout: float | None = None) -> bytes:
        """The next chunk the client sent; b"" once it half-closed (FIN) or reset it.

        Raises queue.Empty after ``timeout`` seconds without data."""
        chunk = self.incoming.get(timeout=timeout)
        if chunk is None:
            self.incoming.put(None)  # every later read sees the end too
            return b""
        return chunk

    def write(self, data: bytes) -> None:
        """Send data on this stream (split into frames)."""
        for i in range(0, len(data), CHUNK):
            self.conn.send(data_frame(self.id, data[i : i + CHUNK]))

    def close(self) -> None:
        """Half-close: an empty data frame with FIN (what spdystream's Close sends)."""
        if not self.local_closed:
            self.local_closed = True
            self.conn.send(data_frame(self.id, b"", fin=True))

    def reset(self) -> None:
        """Abort the stream in both directions (RST_STREAM, CANCEL)."""
        self.local_closed = True
        self.conn.send(control_frame(RST_STREAM, 0, struct.pack(">II", self.id, RST_CANCEL)))
        self._remote_end()

    def _remote_end(self) -> None:
        if not self.remote_closed:
            self.remote_closed = True
            self.incoming.put(None)


class Connection:
    """A SPDY/3.1 server connection over an upgraded (TLS) socket."""

    def __init__(self, sock: socket.socket, read: Callable[[int], bytes]) -> None:
        """``read(n)`` returns up to n bytes (b"" at EOF); ``sock`` is used for select and
        writes."""
        self.sock = sock
        self._read = read
        self.lock = threading.Lock()
        self.inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.deflate = zlib.compressobj(9, zdict=DICTIONARY)
        self.streams: dict[int, Stream] = {}
        self.new_streams: queue.Queue[Stream | None] = queue.Queue()
        self.closed = threading.Event()
        self._buf = b""

    # -- writing -----------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Write one frame (silently dropped once the connection is closed)."""
        if self.closed.is_set():
            return
        with self.lock:
            try:
                self.sock.sendall(frame)
            except OSError:
                self.closed.set()

    def _reply(self, stream_id: int) -> None:
        # The compressor's state spans frames, so compressing and writing happen under the
        # one lock: frames must reach the peer in the order their blocks were compressed.
        block = encode_headers({})
        with self.lock:
            z = self.deflate.compress(block) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
            try:
                self.sock.sendall(control_frame(SYN_REPLY, 0, struct.pack(">I", stream_id) + z))
            except OSError:
                self.closed.set()

    def goaway(self) -> None:
        """Tell the client no more streams will be accepted (GOAWAY, status OK)."""
        last = max(self.streams, default=0)
        self.send(control_frame(GOAWAY, 0, struct.pack(">II", last, 0)))

    # -- reading -----------------------------------------------------------------------------

    def _fill(self, n: int) -> bytes:
        """Exactly n bytes from the socket; raises EOFError when the peer is gone."""
        while len(self._buf) < n:
            if self.closed.is_set():
                raise EOFError
            # A socket closed under us (the session ended) raises ValueError or OSError.
            try:
                pending = getattr(self.sock, "pending", lambda: 0)()
                if not pending and not select.select([self.sock], [], [], 0.5)[0]:
                    continue
                with self.lock:
                    chunk = self._read(65536)
            except (TimeoutError, BlockingIOError):
                continue
            except (OSError, ValueError) as e:
                raise EOFError from e
            if not chunk:
                raise EOFError
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read_frame(self) -> tuple[int | None, int, bytes]:
        """(control type or None for data, flags, payload); data payloads keep their id."""
        head = self._fill(8)
        first, second = struct.unpack(">II", head)
        flags, length = second >> 24, second & 0xFFFFFF
        payload = self._fill(length)
        if first & 0x80000000:
            return first & 0xFFFF, flags, payload
        return None, flags, struct.pack(">I", first) + payload

    def serve(self, on_stream: Callable[[Stream], None] | None = None) -> None:
        """Read frames until EOF or GOAWAY; every stream the client opens is replied to and
        put on ``new_streams`` (or given to on_stream). Ends every stream when it returns."""
        try:
            while not self.closed.is_set():
                kind, flags, payload = self.read_frame()
                if kind == GOAWAY:
                    break
                self._dispatch(kind, flags, payload, on_stream)
        except (EOFError, ProtocolError, zlib.error):
            pass
        finally:
            self.closed.set()
            for s in list(self.streams.values()):
                s._remote_end()
            self.new_streams.put(None)

    def _dispatch(
        self,
        kind: int | None,
        flags: int,
        payload: bytes,
        on_stream: Callable[[Stream], None] | None,
    ) -> None:
        fin = bool(flags & FLAG_FIN)
        if kind is None or kind in (RST_STREAM, HEADERS):
            (sid,) = struct.unpack_from(">I", payload)
            stream = self.streams.get(sid & 0x7FFFFFFF)
            if stream is None:
                return
            if kind is None and len(payload) > 4:
                stream.incoming.put(payload[4:])
            if kind == RST_STREAM or fin:
                stream._remote_end()
        elif kind == SYN_STREAM:
            self._open(payload, fin, on_stream)
        elif kind == PING:
            self.send(control_frame(PING, 0, payload[:4]))  # the client's pings are echoed
        # SETTINGS, WINDOW_UPDATE, SYN_REPLY (no server streams): nothing to do.

    def _open(self, payload: bytes, fin: bool, on_stream: Callable[[Stream], None] | None) -> None:
        (sid,) = struct.unpack_from(">I", payload)
        sid &= 0x7FFFFFFF
        # Decompress every block, even of a stream that is then ignored: the zlib
        # context is shared by all header blocks of the connection.
        block = self.inflate.decompress(payload[10:])
        stream = Stream(self, sid, decode_headers(block))
        self.streams[sid] = stream
        self._reply(sid)
        if fin:
            stream._remote_end()
        if on_stream is not None:
            on_stream(stream)
        else:
            self.new_streams.put(stream)


def wait_streams(conn: Connection, count: int, timeout: float) -> dict[str, Stream]:
    """The first ``count`` streams the client opens, by their ``streamtype`` header."""
    out: dict[str, Stream] = {}
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the client opened {len(out)} of {count} streams")
        try:
            s = conn.new_streams.get(timeout=left)
        except queue.Empty:
            continue
        if s is None:
            raise EOFError("the client closed the connection while opening streams")
        out[s.header("streamtype")] = s
    return out
