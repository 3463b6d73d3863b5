"""The GPU server: owns one device and executes the op streams of many CPU-node clients on it.

One thread per connection reads that tenant's frames and executes them in order on the tenant's own
CUDA stream; tenants share only the read-only weight store. A connection that breaks the protocol is
answered with an ERROR frame and closed, its memory freed; every other tenant keeps running.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import signal
import socket
import ssl
import threading
import time
from typing import Any, Sequence

import msgspec
import torch

from caserve.remote.wire import protocol as P
from caserve.remote.wire.errors import ConnectionLost
from caserve.remote.server.blobs import BlobStore
from caserve.remote.server.executor import Executor, Tenant
from caserve.remote.server.errors import TenantError
from caserve.remote.server.opsurface import OpSurface
from caserve.remote.wire.transport import (
    as_bytes,
    default_unix_path,
    is_loopback,
    make_unix_dir,
    recv_frame,
    send_frame,
    server_tls_context,
)
from caserve.units import parse_size

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


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has (the host's physical memory for a CPU device)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tenant_quota(setting: str | int | None, device: torch.device) -> int:
    """``"auto"`` (the default): a fair share of the device (P.DEFAULT_TENANT_SHARE of its memory);
    ``0``: unlimited; else a size such as ``8GiB``."""
    if setting is None or setting == "auto":
        return int(device_memory(device) * P.DEFAULT_TENANT_SHARE)
    return parse_size(setting)


class GPUServer:
    """The server's state: device, tenants and shared weights. Transport-independent.

    ``token``: one token, or several; tenants presenting the same token form a trust group, and shared
    weights are deduplicated only within a group (``HasBlobs`` answers nothing across groups).
    ``admin_token``: a tenant presenting it sees every tenant in ``Stats``. ``allow_any_op``: accept ATen
    ops off the allow-list (trusted single-user deployments; the deny list still holds).
    """

    def __init__(self, device: str = "auto", token: str | Sequence[str] | None = None,
                 tenant_memory_limit: str | int | None = "auto", max_frame: int = P.LIMITS.max_frame,
                 allow_any_op: bool = False, admin_token: str | None = None,
                 max_connections: int = P.LIMITS.max_connections,
                 max_peer_connections: int = P.LIMITS.max_peer_connections,
                 handshake_timeout: float = P.LIMITS.handshake_timeout,
                 idle_timeout: float = P.LIMITS.idle_timeout) -> None:
        self.device = pick_device(device)
        tokens = [token] if isinstance(token, str) else list(token or [])
        self.tokens = [t for t in tokens if t]
        self.token = self.tokens[0] if self.tokens else None  # auth is required when set
        self.admin_token = admin_token or None
        self.memory_limit = tenant_quota(tenant_memory_limit, self.device)
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.max_peer_connections = max_peer_connections
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.limits = msgspec.structs.replace(  # what Welcome tells each tenant
            P.LIMITS, max_frame=max_frame, max_connections=max_connections,
            max_peer_connections=max_peer_connections, handshake_timeout=handshake_timeout, idle_timeout=idle_timeout)
        self.allow_any_op = allow_any_op
        self.surface = OpSurface(allow_any=allow_any_op)
        if allow_any_op:
            logger.warning("*** --allow-any-op: tenants may run any ATen op outside the deny list, not only the "
                           "allow-list. Use only for a trusted, single-user deployment. ***")
        self.groups: dict[Any, BlobStore] = {}  # trust group -> its shared weights
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

    def authenticate(self, nonce: bytes, mac: bytes) -> tuple[Any, bool] | None:
        """The trust group and admin flag of the token ``mac`` proves, or None for none of them. A server
        without client tokens (loopback peers only) puts every tenant but an admin in one group."""
        if self.admin_token is not None and P.check_mac(self.admin_token, nonce, mac):
            return "admin", True
        if not self.tokens:
            return 0, False
        found = None
        for i, token in enumerate(self.tokens):  # every token is tried, so timing tells nothing
            if P.check_mac(token, nonce, mac):
                found = i
        return None if found is None else (found, False)

    def token_of(self, group: Any, admin: bool) -> str | None:
        """The token a tenant of ``group`` proved (for the server's own proof in WELCOME)."""
        if admin:
            return self.admin_token
        return self.tokens[group] if self.tokens else None

    def new_tenant(self, group: Any = 0, admin: bool = False) -> Executor:
        with self._lock:
            tid = self._next_tenant
            self._next_tenant += 1
            blobs = self.groups.get(group)
            if blobs is None:
                blobs = self.groups[group] = BlobStore()
            tenant = Tenant(tid, self.device, blobs, self.memory_limit, self.surface)
            tenant.admin = admin
            self.tenants[tid] = tenant
        return tenant

    @property
    def blobs_nbytes(self) -> int:
        return sum(b.nbytes for b in list(self.groups.values()))

    def drop_tenant(self, tenant: Executor) -> None:
        tenant.close()
        with self._lock:
            self.tenants.pop(tenant.id, None)
            self.total_ops += tenant.stats.ops

    def stats_for(self, tenant: Tenant) -> dict[str, Any]:
        """What ``Stats`` tells ``tenant``: the device and itself; everything only to an admin."""
        if getattr(tenant, "admin", False):
            return self.stats()
        return {"device": str(self.device), "device_name": self.device_name, "memory_limit": self.memory_limit}

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
            "stored_bytes": sum(t.private_bytes for t in tenants) + self.blobs_nbytes,
            "shared_blobs": sum(len(b) for b in list(self.groups.values())),
            "shared_bytes": self.blobs_nbytes,
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
                raise _Refused("version", f"server speaks protocol {P.PROTOCOL_VERSION}, client {header.version}")
            if self.server.token is None and not self.loopback:
                raise _Refused("auth", "this server has no token configured and accepts loopback clients only")
            self.client_nonce = header.nonce
            self.nonce = secrets.token_bytes(32)
            return P.Kind.CHALLENGE, P.Challenge(P.PROTOCOL_VERSION, self.nonce, self.server.token is not None), ()
        if kind == P.Kind.AUTH and self.nonce:
            group = self.server.authenticate(self.nonce, header.mac)
            if group is None:
                raise _Refused("auth", "authentication failed: wrong token")
            self.tenant = self.server.new_tenant(*group)
            logger.info("tenant %d connected from %s", self.tenant.id, self.peer)
            token = self.server.token_of(*group)
            proof = P.server_proof(token, self.client_nonce, self.nonce) if token and self.client_nonce else b""
            welcome = P.Welcome(self.tenant.id, str(self.server.device), self.server.device_name,
                                self.server.memory_limit, self.server.limits, proof)
            return P.Kind.WELCOME, welcome, ()
        raise _Refused("protocol", f"unexpected message kind {kind} during the handshake")

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


class _Refused(Exception):
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
                 unix_socket: str | None = "auto", tls_cert: str | None = None, tls_key: str | None = None) -> None:
        if server.token is None and not is_loopback(host):
            raise ValueError(
                f"refusing to listen on {host} without a token: give --token-file, or listen on 127.0.0.1"
            )
        self.server = server
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        self.tls = server_tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
        if self.tls is None and not is_loopback(host):
            logger.warning("listening on %s without TLS: weights, token ids and outputs travel in clear "
                           "(give --tls-cert/--tls-key)", host)
        self.tcp = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        reuse_port=False)
        self.host, self.port = host, self.tcp.getsockname()[1]
        self.unix_path = default_unix_path(self.port) if unix_socket == "auto" else unix_socket
        self.unix: socket.socket | None = None
        if self.unix_path:
            try:
                make_unix_dir(self.unix_path)
                if os.path.lexists(self.unix_path):
                    os.unlink(self.unix_path)
                self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.unix.bind(self.unix_path)
                os.chmod(self.unix_path, 0o600)
                self.unix.listen(64)
            except OSError as exc:
                logger.warning("no Unix socket at %s: %s", self.unix_path, exc)
                self.unix = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._open: dict[Connection, socket.socket] = {}
        self._per_peer: dict[str, int] = {}
        self._last_limit_log = 0.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept_loop(self, lsock: socket.socket, is_unix: bool) -> None:
        """Accept until stopped. Running out of file descriptors (EMFILE) or over a connection limit closes
        or delays new peers, logged, and never ends the loop."""
        while not self._stopped.is_set():
            try:
                sock, addr = lsock.accept()
            except OSError as exc:
                if self._stopped.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._log_limit(f"accept failed: {exc.strerror} (too many open files); "
                                    f"{len(self._open)} connections open; retrying")
                    time.sleep(0.05)
                continue
            peer_host = "unix" if is_unix else addr[0]
            peer = "unix" if is_unix else f"{addr[0]}:{addr[1]}"
            with self._lock:
                total = len(self._open)
                mine = self._per_peer.get(peer_host, 0)
                if total >= self.server.max_connections or mine >= self.server.max_peer_connections:
                    refused = f"{total} connections open ({mine} from {peer_host})"
                else:
                    refused = ""
                    self._per_peer[peer_host] = mine + 1
            if refused:
                self._log_limit(f"refusing a connection from {peer}: {refused}; limits "
                                f"{self.server.max_connections} in all, {self.server.max_peer_connections} per peer")
                sock.close()
                continue
            loopback = is_unix or is_loopback(addr[0])
            conn = Connection(self.server, peer, loopback)
            with self._lock:
                self._open[conn] = sock
            try:
                threading.Thread(target=self._serve, args=(conn, sock, peer_host), name=f"tenant-{peer}",
                                 daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: let this peer go
                self._log_limit(f"no thread for {peer}: {exc}")
                self._forget(conn, peer_host)
                sock.close()

    def _serve(self, conn: Connection, sock: socket.socket, peer_host: str) -> None:
        try:
            if self.tls is not None and sock.family != socket.AF_UNIX:
                try:  # in this thread, under the handshake deadline, never in the accept loop
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    logger.info("TLS handshake with %s failed: %s", conn.peer, exc)
                    sock.close()
                    return
                with self._lock:
                    self._open[conn] = sock
            serve_connection(self.server, sock, conn.peer, conn.loopback, conn)
        finally:
            self._forget(conn, peer_host)

    def _forget(self, conn: Connection, peer_host: str) -> None:
        with self._lock:
            self._open.pop(conn, None)
            left = self._per_peer.get(peer_host, 1) - 1
            if left > 0:
                self._per_peer[peer_host] = left
            else:
                self._per_peer.pop(peer_host, None)

    def _log_limit(self, message: str) -> None:
        """Limit refusals are logged at most once a second (a flood must not flood the log too)."""
        now = time.monotonic()
        if now - self._last_limit_log >= 1.0:
            self._last_limit_log = now
            logger.warning("%s", message)

    def _watch(self) -> None:
        """Closes connections past their handshake deadline, and authenticated ones idle too long."""
        hs, idle = self.server.handshake_timeout, self.server.idle_timeout
        while not self._stopped.wait(min(0.25, hs / 4 if hs > 0 else 0.25)):
            now = time.monotonic()
            with self._lock:
                expired = [(c, s) for c, s in self._open.items()
                           if (c.tenant is None and hs > 0 and now - c.opened > hs)
                           or (c.tenant is not None and idle > 0 and now - c.last_frame > idle)]
            for conn, sock in expired:
                why = "no handshake within its deadline" if conn.tenant is None else "idle past its timeout"
                logger.info("closing connection from %s: %s", conn.peer, why)
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # its thread sees the end of the stream and cleans up
                except OSError:
                    pass

    def start(self) -> "Listener":
        threading.Thread(target=self._accept_loop, args=(self.tcp, False), daemon=True, name="accept-tcp").start()
        if self.unix is not None:
            threading.Thread(target=self._accept_loop, args=(self.unix, True), daemon=True, name="accept-unix").start()
        threading.Thread(target=self._watch, daemon=True, name="connection-deadlines").start()
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


def serve_forever(host: str = "127.0.0.1", port: int = 7070, unix_socket: str | None = "auto",
                  tls_cert: str | None = None, tls_key: str | None = None, **server_options: Any) -> None:
    """Entry point of ``caserve gpu-server``; ``server_options`` are :class:`GPUServer`'s. SIGTERM stops it
    after removing its Unix socket."""
    server = GPUServer(**server_options)
    listener = Listener(server, host, port, unix_socket, tls_cert, tls_key).start()

    def on_term(signum: int, frame: Any) -> None:
        listener.stop()  # removes the Unix socket; then exit at once, as SIGTERM always did
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
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
