"""The GPU server: owns one device and executes the op streams of many CPU-node clients on it.

One thread per connection reads that tenant's frames and executes them in order on the tenant's own
CUDA stream; tenants share only the read-only weight store. A connection that breaks the protocol is
answered with an ERROR frame and closed, its memory freed; every other tenant keeps running.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Sequence

import msgspec
import torch

from caserve.remote.wire import protocol as P
from caserve.remote.wire.errors import ConnectionLost
from caserve.remote.server.blobs import BlobStore
from caserve.remote.server.executor import Executor, Tenant
from caserve.units import parse_size
from caserve.remote.server.templates import TenantError
from caserve.remote.wire.transport import as_bytes, default_unix_path, is_loopback, recv_frame, send_frame

logger = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU (logged, so nobody is surprised)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        logger.warning("no CUDA device found: the GPU server runs ops on the CPU")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"the GPU server runs on cuda:N or cpu, not {device}")
    return dev


class GPUServer:
    """The server's state: device, tenants and shared weights. Transport-independent."""

    def __init__(self, device: str = "auto", token: str | None = None, tenant_memory_limit: str | int = 0,
                 max_frame: int = P.LIMITS.max_frame) -> None:
        self.device = pick_device(device)
        self.token = token or None
        self.memory_limit = parse_size(tenant_memory_limit)
        self.max_frame = max_frame
        self.blobs = BlobStore()
        self.tenants: dict[int, Executor] = {}
        self._lock = threading.Lock()
        self._next_tenant = 1
        self.total_ops = 0
        self.started = time.time()

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def new_tenant(self) -> Executor:
        with self._lock:
            tid = self._next_tenant
            self._next_tenant += 1
            tenant = Tenant(tid, self.device, self.blobs, self.memory_limit)
            self.tenants[tid] = tenant
        return tenant

    def drop_tenant(self, tenant: Executor) -> None:
        tenant.close()
        with self._lock:
            self.tenants.pop(tenant.id, None)
            self.total_ops += tenant.stats.ops

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tenants = list(self.tenants.values())
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "tenants": [{"id": t.id, "bytes": t.bytes, "storages": len(t.storages), "ops": t.stats.ops,
                         "busy_s": round(t.stats.busy_s, 6)} for t in tenants],
            "tenant_bytes": sum(t.bytes for t in tenants),
            # What the device actually holds for tenants: private storages plus one copy of each shared weight.
            "stored_bytes": sum(t.private_bytes for t in tenants) + self.blobs.nbytes,
            "shared_blobs": len(self.blobs),
            "shared_bytes": self.blobs.nbytes,
            "device_allocated": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None,
            # The process's CPU time, at the clock's resolution (os.times counts 10 ms ticks).
            "cpu_seconds": time.process_time(),
            "uptime_s": time.time() - self.started,
            "ops": self.total_ops + sum(t.stats.ops for t in tenants),
        }


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
                raise _Refused("version", f"server speaks protocol {P.PROTOCOL_VERSION}, client {header.version}")
            if self.server.token is None and not self.loopback:
                raise _Refused("auth", "this server has no token configured and accepts loopback clients only")
            self.nonce = secrets.token_bytes(32)
            return P.Kind.CHALLENGE, P.Challenge(P.PROTOCOL_VERSION, self.nonce, self.server.token is not None), ()
        if kind == P.Kind.AUTH and self.nonce:
            if self.server.token is not None and not P.check_mac(self.server.token, self.nonce, header.mac):
                raise _Refused("auth", "authentication failed: wrong token")
            self.tenant = self.server.new_tenant()
            logger.info("tenant %d connected from %s", self.tenant.id, self.peer)
            limits = msgspec.structs.replace(P.LIMITS, max_frame=self.server.max_frame)
            welcome = P.Welcome(self.tenant.id, str(self.server.device), self.server.device_name,
                                self.server.memory_limit, limits)
            return P.Kind.WELCOME, welcome, ()
        raise _Refused("protocol", f"unexpected message kind {kind} during the handshake")

    def _submit(self, msg: P.Submit, payloads: list[memoryview]) -> tuple[P.Kind, Any, Sequence] | None:
        tenant = self.tenant
        assert tenant is not None
        tenant.stats.frames += 1
        start = time.perf_counter()
        if tenant.stream is not None:
            with torch.cuda.stream(tenant.stream):
                reply = self._execute(tenant, msg, payloads)
        else:
            reply = self._execute(tenant, msg, payloads)
        tenant.stats.busy_s += time.perf_counter() - start
        return reply

    def _execute(self, tenant: Executor, msg: P.Submit, payloads: list[memoryview]):
        with torch.inference_mode():
            tenant.run_ops(msg.ops, payloads)
            if msg.sync is None:
                return None
            value, out = None, []
            try:
                value, out = tenant.sync(msg.sync, self.server.stats)
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


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def serve_connection(server: GPUServer, sock: socket.socket, peer: str, loopback: bool) -> None:
    """Run one client connection to its end; never raises."""
    conn = Connection(server, peer, loopback)
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            limit = server.max_frame if conn.tenant is not None else P.MAX_HANDSHAKE_FRAME
            kind, header, payloads = recv_frame(sock, limit)
            reply = conn.on_frame(kind, header, payloads)
            if reply is not None:
                send_frame(sock, *reply)
    except ConnectionLost:
        pass
    except (P.ProtocolError, _Refused) as exc:
        code = exc.code if isinstance(exc, _Refused) else "protocol"
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


class Listener:
    """Accepts clients on TCP (and a Unix socket) and serves each in its own thread."""

    def __init__(self, server: GPUServer, host: str = "127.0.0.1", port: int = 0,
                 unix_socket: str | None = "auto") -> None:
        if server.token is None and not is_loopback(host):
            raise ValueError(
                f"refusing to listen on {host} without a token: give --token-file, or listen on 127.0.0.1"
            )
        self.server = server
        self.tcp = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        reuse_port=False)
        self.host, self.port = host, self.tcp.getsockname()[1]
        self.unix_path = default_unix_path(self.port) if unix_socket == "auto" else unix_socket
        self.unix: socket.socket | None = None
        if self.unix_path:
            try:
                if os.path.exists(self.unix_path):
                    os.unlink(self.unix_path)
                self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.unix.bind(self.unix_path)
                os.chmod(self.unix_path, 0o600)
                self.unix.listen(64)
            except OSError as exc:
                logger.warning("no Unix socket at %s: %s", self.unix_path, exc)
                self.unix = None
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept_loop(self, lsock: socket.socket, is_unix: bool) -> None:
        while not self._stopped.is_set():
            try:
                sock, addr = lsock.accept()
            except OSError:
                return
            peer = "unix" if is_unix else f"{addr[0]}:{addr[1]}"
            loopback = is_unix or is_loopback(addr[0])
            threading.Thread(target=serve_connection, args=(self.server, sock, peer, loopback),
                             name=f"tenant-{peer}", daemon=True).start()

    def start(self) -> "Listener":
        threading.Thread(target=self._accept_loop, args=(self.tcp, False), daemon=True, name="accept-tcp").start()
        if self.unix is not None:
            threading.Thread(target=self._accept_loop, args=(self.unix, True), daemon=True, name="accept-unix").start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        for s in (self.tcp, self.unix):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        if self.unix is not None and self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)


def serve_forever(host: str = "127.0.0.1", port: int = 7070, device: str = "auto", token: str | None = None,
                  tenant_memory_limit: str | int = 0, unix_socket: str | None = "auto") -> None:
    """Entry point of ``caserve gpu-server``."""
    server = GPUServer(device, token, tenant_memory_limit)
    listener = Listener(server, host, port, unix_socket).start()
    limit = f", tenant limit {server.memory_limit} bytes" if server.memory_limit else ""
    logger.info("caserve gpu-server listening on %s (device %s: %s%s%s)", listener.address, server.device,
                server.device_name, f", unix {listener.unix_path}" if listener.unix else "", limit)
    print(f"caserve gpu-server listening on {listener.address} (device {server.device})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
