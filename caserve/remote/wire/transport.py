"""Transports: how frames travel between a client and the GPU server.

One interface, two implementations: :class:`SocketChannel` (TCP with TCP_NODELAY, or a Unix socket
when both ends share a host) and, for tests and single-process use, the server's in-process channel
in :mod:`caserve.remote.server`. Framing is defined in :mod:`caserve.remote.wire.protocol`.
"""

from __future__ import annotations

import os
import socket
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


def default_unix_path(port: int) -> str:
    """Where a GPU server on TCP ``port`` also listens for clients on the same host."""
    return os.path.join(tempfile.gettempdir(), f"caserve-gpu-{port}.sock")


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


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos)
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
    def connect(cls, address: str, *, transport: str = "auto", timeout: float = 10.0) -> "SocketChannel":
        """Connect to ``host:port``; on the same host prefer the server's Unix socket (``transport="auto"``)."""
        host, port = parse_address(address)
        if transport not in ("auto", "tcp", "unix"):
            raise ValueError(f"transport must be auto, tcp or unix, got {transport!r}")
        path = default_unix_path(port)
        if transport == "unix" or (transport == "auto" and is_loopback(host) and os.path.exists(path)):
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
        sock.settimeout(None)
        return cls(sock)

    @property
    def kind(self) -> str:
        return "unix" if self.sock.family == socket.AF_UNIX else "tcp"

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
