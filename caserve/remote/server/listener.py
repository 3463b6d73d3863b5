"""The GPU server's sockets: it owns one device and executes the op streams of many CPU-node clients on it.

One thread per connection reads that tenant's frames and executes them in order on the tenant's own
CUDA stream (:mod:`caserve.remote.server.connection`). Tenants share the read-only weights of their trust
group, and the process and its CUDA context (see the executor's docstring). A connection that breaks the
protocol is answered with an ERROR frame and closed, its memory freed; every other tenant keeps running.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import ssl
import threading
import time
from typing import Any

from caserve.remote.server.connection import Connection, serve_connection
from caserve.remote.server.gpu_server import GPUServer
from caserve.remote.wire.transport import default_unix_path, is_loopback, make_unix_dir, server_tls_context

logger = logging.getLogger(__name__)


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
