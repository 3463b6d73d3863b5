"""The in-process channel: a client session talking to a :class:`~caserve.remote.server.GPUServer` in the
same process, with the same frames and no socket (tests, single-process setups).

The only module that imports both :mod:`caserve.remote.client` and :mod:`caserve.remote.server`; a
CPU node imports it only when :func:`caserve.remote.connect` is given ``server=``.
"""

from __future__ import annotations

from typing import Any, Sequence

from caserve.remote.server.connection import Connection, Refused
from caserve.remote.server.gpu_server import GPUServer
from caserve.remote.wire import protocol as P
from caserve.remote.wire.errors import ConnectionLost


class LocalChannel:
    """An in-process channel to a :class:`GPUServer`: the same frames, no socket.

    Used by tests and by single-process setups; frames are still encoded and decoded, so behaviour
    matches the socket transport.
    """

    kind = "local"

    def __init__(self, server: GPUServer) -> None:
        self.conn = Connection(server, "in-process", loopback=True)
        self._replies: list[tuple[int, Any, list[memoryview]]] = []

    def send(self, kind: P.Kind, header: Any, payloads: Sequence[memoryview | bytes] = ()) -> int:
        data = memoryview(b"".join(bytes(p) for p in payloads)) if payloads else memoryview(b"")
        encoded = P.encode_header(header)
        decoded = P.decode_header(kind, encoded)
        sizes = getattr(decoded, "payloads", None) or []
        try:
            reply = self.conn.on_frame(kind, decoded, P.split_payloads(memoryview(bytearray(data)), sizes))
        except Refused as exc:
            reply = (P.Kind.ERROR, P.Error(exc.code, str(exc)), ())
        if reply is not None:
            rkind, rheader, rpayloads = reply
            rdecoded = P.decode_header(rkind, P.encode_header(rheader))
            self._replies.append((rkind, rdecoded, [memoryview(bytearray(p)) for p in rpayloads]))
        return P.FRAME_PREFIX.size + len(encoded) + len(data)

    def recv(self) -> tuple[int, Any, list[memoryview]]:
        if not self._replies:
            raise ConnectionLost("no reply pending on the local channel")
        return self._replies.pop(0)

    def close(self) -> None:
        self.conn.close()
