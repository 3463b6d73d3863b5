"""One client connection: the handshake (HELLO, CHALLENGE, AUTH, WELCOME), then SUBMIT frames run on the
tenant's executor. A state machine that both transports drive: a socket (:func:`serve_connection`, from
the listener's threads) and :class:`caserve.remote.local.LocalChannel` in process.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from typing import Any, Sequence

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.wire.errors import ConnectionLost
from caserve.remote.server.executor import Executor
from caserve.remote.server.errors import TenantError
from caserve.remote.server.gpu_server import GPUServer
from caserve.remote.wire.transport import as_bytes, recv_frame, send_frame

logger = logging.getLogger(__name__)


class Connection:
    """One client's session: handshake, then SUBMIT frames until the peer goes away.

    ``send`` and ``recv`` are the transport: a socket for real clients, direct calls for :class:`caserve.remote.local.LocalChannel`.
    """

    def __init__(self, server: GPUServer, peer: str, loopback: bool) -> None:
        self.server = server
        self.peer = peer
        self.loopback = loopback
        self.tenant: Executor | None = None
        self.nonce = b""
        self.client_nonce = b""
        self.opened = self.last_frame = time.monotonic()  # for the listener's handshake and idle deadlines

    # The handshake is a tiny state machine so that both transports drive it the same way.
    def on_frame(self, kind: int, header: Any, payloads: list[memoryview]) -> tuple[P.Kind, Any, Sequence] | None:
        if self.tenant is None:
            return self._handshake(kind, header)
        if kind != P.Kind.SUBMIT:
            raise P.ProtocolError(f"expected SUBMIT, got kind {kind}")
        return self._submit(header, payloads)

    def _handshake(self, kind: int, header: Any) -> tuple[P.Kind, Any, Sequence] | None:
        if kind == P.Kind.HELLO and not self.nonce:
            if header.version != P.PROTOCOL_VERSION:
                raise Refused("version", f"server speaks protocol {P.PROTOCOL_VERSION}, client {header.version}")
            if self.server.token is None and not self.loopback:
                raise Refused("auth", "this server has no token configured and accepts loopback clients only")
            self.client_nonce = header.nonce
            self.nonce = secrets.token_bytes(32)
            return P.Kind.CHALLENGE, P.Challenge(P.PROTOCOL_VERSION, self.nonce, self.server.token is not None), ()
        if kind == P.Kind.AUTH and self.nonce:
            group = self.server.authenticate(self.nonce, header.mac)
            if group is None:
                raise Refused("auth", "authentication failed: wrong token")
            self.tenant = self.server.new_tenant(*group)
            logger.info("tenant %d connected from %s", self.tenant.id, self.peer)
            token = self.server.token_of(*group)
            proof = P.server_proof(token, self.client_nonce, self.nonce) if token and self.client_nonce else b""
            welcome = P.Welcome(self.tenant.id, str(self.server.device), self.server.device_name,
                                self.server.memory_limit, self.server.limits, proof)
            return P.Kind.WELCOME, welcome, ()
        raise Refused("protocol", f"unexpected message kind {kind} during the handshake")

    def _submit(self, msg: P.Submit, payloads: list[memoryview]) -> tuple[P.Kind, Any, Sequence] | None:
        tenant = self.tenant
        assert tenant is not None
        tenant.stats.frames += 1
        start, cpu = time.perf_counter(), time.thread_time()
        if tenant.stream is not None:
            with torch.cuda.stream(tenant.stream):
                reply = self._execute(tenant, msg, payloads)
        else:
            reply = self._execute(tenant, msg, payloads)
        tenant.stats.busy_s += time.perf_counter() - start
        tenant.stats.cpu_s += time.thread_time() - cpu
        return reply

    def _execute(self, tenant: Executor, msg: P.Submit, payloads: list[memoryview]):
        with torch.inference_mode():
            tenant.run_ops(msg.ops, payloads)
            if msg.sync is None:
                return None
            value, out = None, []
            try:
                value, out = tenant.sync(msg.sync, lambda: self.server.stats_for(tenant))
            except Exception as exc:  # noqa: BLE001 - reported to this tenant
                tenant.fail(type(msg.sync).__name__, exc if isinstance(exc, TenantError) else TenantError(f"{type(exc).__name__}: {exc}"))
            error = tenant.take_error()
            if error is not None:
                value, out = None, []
            out = [as_bytes(p) for p in out]
            return P.Kind.REPLY, P.Reply(msg.seq, error, value, [len(p) for p in out]), out

    def close(self) -> None:
        if self.tenant is not None:
            logger.info("tenant %d (%s) disconnected after %d ops", self.tenant.id, self.peer, self.tenant.stats.ops)
            self.server.drop_tenant(self.tenant)
            self.tenant = None


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def serve_connection(server: GPUServer, sock: socket.socket, peer: str, loopback: bool,
                     conn: Connection | None = None) -> None:
    """Run one client connection to its end; never raises."""
    conn = conn or Connection(server, peer, loopback)
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            limit = server.max_frame if conn.tenant is not None else P.MAX_HANDSHAKE_FRAME
            kind, header, payloads = recv_frame(sock, limit)
            conn.last_frame = time.monotonic()
            reply = conn.on_frame(kind, header, payloads)
            if reply is not None:
                send_frame(sock, *reply)
    except ConnectionLost:
        pass
    except (P.ProtocolError, Refused) as exc:
        code = exc.code if isinstance(exc, Refused) else "protocol"
        logger.warning("closing connection from %s: %s", peer, exc)
        try:
            send_frame(sock, P.Kind.ERROR, P.Error(code, str(exc)))
        except OSError:
            pass
    except OSError as exc:
        logger.info("connection from %s lost: %s", peer, exc)
    except Exception:  # noqa: BLE001 - a bug must not take the server down with it
        logger.exception("connection from %s failed", peer)
    finally:
        conn.close()
        sock.close()
