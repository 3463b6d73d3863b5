"""A TCP relay on 127.0.0.1 that adds a fixed one-way delay: a stand-in for a datacenter link.

::

    client ──TCP──> relay (listen 127.0.0.1:P) ──TCP──> GPU server
                    each chunk read at t is written at t + delay, in order, in both directions

Benchmarks run it as a subprocess (``python -m caserve.bench.relay --target HOST:PORT --delay-us D``), so
its threads do not share the client's GIL; it prints ``relay listening on 127.0.0.1:P`` once ready.
Each direction of each connection has a reader thread (``recv`` stamps chunks) and a writer thread
(sleeps until the chunk's due time, then ``sendall``): reads never wait behind a delayed write, so the
delay is added to latency, not to bandwidth. The thread timer slack is set to 1 ns (Linux), otherwise
``time.sleep`` of 25 us oversleeps by the default 50 us slack. Even with ``--delay-us 0`` the relay
adds one hop (two socket copies and a thread wake-up); benchmarks therefore report the relay at 0 us
next to the direct connection, and measure the delay actually added (:func:`measure_rtt`).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import logging
import socket
import statistics
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

CHUNK = 1 << 16
PR_SET_TIMERSLACK = 29


class RelayError(RuntimeError):
    """The relay process did not start or its target is unreachable."""


def _tight_timers() -> None:
    """Linux: 1 ns timer slack for this thread, so short sleeps end on time."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
        except (OSError, AttributeError):
            logger.debug("prctl(PR_SET_TIMERSLACK) unavailable")


class _Pipe:
    """One direction of one connection: chunks leave ``delay_s`` after they arrived, in order."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        self.src, self.dst, self.delay_s = src, dst, delay_s
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                if not data:
                    break
                with self.ready:
                    self.queue.append((time.perf_counter() + self.delay_s, data))
                    self.ready.notify()
        except OSError:
            pass
        with self.ready:
            self.closed = True
            self.ready.notify()

    def _write(self) -> None:
        _tight_timers()
        try:
            while True:
                with self.ready:
                    while not self.queue and not self.closed:
                        self.ready.wait()
                    if not self.queue:
                        break
                    due, data = self.queue.popleft()
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (self.dst, self.src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def serve(target: tuple[str, int], delay_s: float, listen_port: int = 0, announce=print) -> None:
    """Accept on 127.0.0.1 forever; every accepted connection gets its own connection to ``target``."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", listen_port))
    lsock.listen(64)
    announce(f"relay listening on 127.0.0.1:{lsock.getsockname()[1]} delay_us={delay_s * 1e6:.0f}")
    while True:
        client, _ = lsock.accept()
        try:
            upstream = socket.create_connection(target, timeout=10)
        except OSError as exc:
            logger.warning("relay: cannot reach %s:%d: %s", *target, exc)
            client.close()
            continue
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Pipe(client, upstream, delay_s).start()
        _Pipe(upstream, client, delay_s).start()


class RelayProcess:
    """``with RelayProcess("127.0.0.1:7070", 25) as address:`` runs the relay as a subprocess."""

    def __init__(self, target: str, delay_us: float) -> None:
        self.target, self.delay_us = target, delay_us
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        from caserve.bench.compare import subprocess_env

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "caserve.bench.relay", "--target", self.target, "--delay-us", str(self.delay_us)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env())
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "relay listening on" not in line:
            self.__exit__()
            raise RelayError(f"the relay did not start: {line!r}")
        return line.split("listening on ")[1].split()[0]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def measure_rtt(address: str, n: int = 200) -> float:
    """Median round trip (us) of a 1-byte message through ``address`` to a local echo server: the relay's
    own cost plus twice its delay when ``address`` is a relay in front of :func:`echo_server`."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RelayError("echo through the relay returned the wrong byte")
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def echo_server() -> tuple[socket.socket, str]:
    """A 127.0.0.1 echo server on a daemon thread (for :func:`measure_rtt`); returns (socket, address)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(CHUNK):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return lsock, f"127.0.0.1:{lsock.getsockname()[1]}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="host:port to forward to")
    p.add_argument("--delay-us", type=float, default=0.0, help="one-way delay added to every chunk (us)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    a = p.parse_args(argv)
    if a.delay_us < 0:
        p.error("--delay-us must be >= 0")
    host, port = a.target.rsplit(":", 1)
    serve((host, int(port)), a.delay_us * 1e-6, a.port, announce=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
