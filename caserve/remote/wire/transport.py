"""Transports: how frames travel between a client and the GPU server.

One interface, two implementations: :class:`SocketChannel` (TCP with TCP_NODELAY, or a Unix socket
when both ends share a host) and, for tests and single-process use, the server's in-process channel
in :mod:`caserve.remote.server`. Framing is defined in :mod:`caserve.remote.wire.protocol`.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import tempfile
from typing import Any, Protocol, Sequence

from caserve.remote.wire import protocol as P
from caserve.remote.wire.errors import ConnectionLost


class Channel(Protocol):
    """A bidirectional, ordered stream of frames."""

    def send(self, kind: P.Kind, header: Any, payloads: Sequence[memoryview | bytes] = ()) -> int:
        """Send one frame; returns the bytes it took on the wire."""
        ...

    def recv(self) -> tuple[int, Any, list[memoryview]]:
        """The next frame: kind, decoded header, payload segments."""
        ...

    def close(self) -> None: ...


def unix_dir() -> str:
    """This user's directory for GPU-server sockets: ``$TMPDIR/caserve-UID``, mode 0700."""
    return os.path.join(tempfile.gettempdir(), f"caserve-{os.getuid()}")


def default_unix_path(port: int) -> str:
    """Where a GPU server on TCP ``port`` also listens for clients of the same user on the same host."""
    return os.path.join(unix_dir(), f"gpu-{port}.sock")


def make_unix_dir(path: str) -> None:
    """Create the directory of a server's socket, private to this user (refusing one owned by another)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{parent} is not a directory of this user; not putting a socket there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(parent, 0o700)


def owned_socket(path: str) -> bool:
    """Whether ``path`` is a socket that this user owns in a directory only this user can enter (a client
    checks before it trusts a local server with its weights and token proof)."""
    try:
        parent, sock = os.lstat(os.path.dirname(path)), os.lstat(path)
    except OSError:
        return False
    uid = os.getuid()
    return (stat.S_ISDIR(parent.st_mode) and parent.st_uid == uid and not stat.S_IMODE(parent.st_mode) & 0o077
            and stat.S_ISSOCK(sock.st_mode) and sock.st_uid == uid)


def client_tls_context(ca_file: str) -> ssl.SSLContext:
    """TLS for a client: the server's certificate must chain to ``ca_file`` and name the host dialled."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"GPU server address must be host:port, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def send_frame(sock: socket.socket, kind: P.Kind, header: Any, payloads: Sequence[memoryview | bytes] = ()) -> int:
    """Write one frame and return its size; tensor payloads go from their own memory (no concatenation)."""
    hdr = P.encode_header(header)
    segments = [as_bytes(p) for p in payloads]
    total = sum(len(p) for p in segments)
    buffers: list[Any] = [P.frame_prefix(kind, len(hdr), total), hdr, *segments]
    size = P.FRAME_PREFIX.size + len(hdr) + total
    if isinstance(sock, ssl.SSLSocket):  # TLS has no scatter-gather send: small parts go as one record
        if total < (1 << 16):
            sock.sendall(b"".join(buffers))
        else:
            for b in buffers:
                sock.sendall(b)
        return size
    while buffers:
        sent = sock.sendmsg(buffers[:512])
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers[0])
            buffers.pop(0)
        if sent and buffers:
            buffers[0] = memoryview(buffers[0])[sent:]
    return size


def as_bytes(data: memoryview | bytes) -> memoryview:
    """A flat byte view of a payload (a tensor's memoryview counts elements, not bytes)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


RECV_STEP = 1 << 20  # a frame's buffer starts at most this large and doubles as its bytes arrive


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Read exactly ``n`` bytes. Memory is committed as the bytes arrive (the buffer grows from
    RECV_STEP by doubling), so a peer that announces a large frame and stalls holds little."""
    buf = bytearray(min(n, RECV_STEP))
    pos = 0
    while pos < n:
        if pos == len(buf):
            buf += bytes(min(n - pos, len(buf)))
        with memoryview(buf) as view:
            got = sock.recv_into(view[pos:], len(buf) - pos)
        if got == 0:
            raise ConnectionLost("connection closed by peer")
        pos += got
    return buf


def recv_frame(sock: socket.socket, max_frame: int) -> tuple[int, Any, list[memoryview]]:
    """Read one frame, refusing any longer than ``max_frame`` before buffering it."""
    (length,) = P.struct.unpack("<I", recv_exact(sock, 4))
    if length > max_frame:
        raise P.ProtocolError(f"frame of {length} bytes exceeds the limit of {max_frame}")
    body = memoryview(recv_exact(sock, length))
    kind, hdr, data = P.split_frame(body)
    header = P.decode_header(kind, hdr)
    sizes = getattr(header, "payloads", None) or []
    return kind, header, P.split_payloads(data, sizes) if sizes or len(data) else []


class SocketChannel:
    """A frame channel over a connected stream socket."""

    def __init__(self, sock: socket.socket, max_frame: int = P.MAX_HANDSHAKE_FRAME) -> None:
        self.sock = sock
        self.max_frame = max_frame
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def connect(cls, address: str, *, transport: str = "auto", timeout: float = 10.0,
                tls_ca: str | None = None) -> "SocketChannel":
        """Connect to ``host:port``; on the same host prefer the server's Unix socket (``transport="auto"``)
        when it is this user's own. ``tls_ca`` (default ``$CASERVE_TLS_CA``): TCP goes over TLS, and the
        server's certificate must chain to that CA file."""
        host, port = parse_address(address)
        if transport not in ("auto", "tcp", "unix"):
            raise ValueError(f"transport must be auto, tcp or unix, got {transport!r}")
        tls_ca = tls_ca or os.environ.get("CASERVE_TLS_CA") or None
        path = default_unix_path(port)
        if transport == "unix" and not owned_socket(path):
            raise PermissionError(f"{path} is not a socket of this user in a private directory")
        if transport == "unix" or (transport == "auto" and is_loopback(host) and owned_socket(path)):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                if transport == "unix":
                    raise
            else:
                sock.settimeout(None)
                return cls(sock)
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls_ca:
            try:
                sock = client_tls_context(tls_ca).wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError):
                sock.close()
                raise
        sock.settimeout(None)
        return cls(sock)

    @property
    def kind(self) -> str:
        if self.sock.family == socket.AF_UNIX:
            return "unix"
        return "tls" if isinstance(self.sock, ssl.SSLSocket) else "tcp"

    def send(self, kind: P.Kind, header: Any, payloads: Sequence[memoryview | bytes] = ()) -> int:
        try:
            return send_frame(self.sock, kind, header, payloads)
        except OSError as exc:
            raise ConnectionLost(f"send failed: {exc}") from exc

    def recv(self) -> tuple[int, Any, list[memoryview]]:
        try:
            return recv_frame(self.sock, self.max_frame)
        except OSError as exc:
            raise ConnectionLost(f"receive failed: {exc}") from exc

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
