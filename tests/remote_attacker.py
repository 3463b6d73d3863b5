"""A tenant that speaks the GPU server's wire protocol directly, as an attacker would.

The caserve client only sends what its dispatcher plans; these helpers send any record, so tests can
try what a hostile client could. Argument skeletons are built with :func:`tensor`, :func:`device` and
:func:`dtype`, so a change of the skeleton's encoding is made here once.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any, Sequence

import torch

from caserve.remote.local import LocalChannel
from caserve.remote.server import GPUServer
from caserve.remote.wire import protocol as P
from caserve.remote.wire.transport import SocketChannel


def tensor(slot: int, dtype: str, size: Sequence[int], stride: Sequence[int] | None = None, offset: int = 0) -> Any:
    """A tensor slot of a DefineOp skeleton."""
    if stride is None:
        stride = torch.empty(tuple(size), device="meta").stride()
    return P.TensorSlot(slot, dtype, tuple(size), tuple(stride), offset)


def device(index: int = 0) -> Any:
    return P.DeviceArg(index)


def dtype(name: str) -> Any:
    return P.DTypeArg(name)


def scalar(index: int, kind: str) -> Any:
    return P.ScalarSlot(index, kind)


def skeleton(value: Any) -> Any:
    """Plain lists in a test's argument list become the wire's ArgList."""
    if isinstance(value, (list, tuple)):
        return P.ArgList([skeleton(v) for v in value])
    return value


class Refused(Exception):
    """The server answered a sync with a failure."""

    def __init__(self, failure: P.RemoteFailure) -> None:
        super().__init__(f"{failure.op}: {failure.message} ({failure.code})")
        self.failure = failure


class RawTenant:
    """One connection; every method sends exactly the records it names."""

    def __init__(self, channel: Any, token: str | None = None) -> None:
        self.channel = channel
        channel.send(P.Kind.HELLO, P.Hello(P.PROTOCOL_VERSION, "attacker"))
        kind, msg, _ = channel.recv()
        assert kind == P.Kind.CHALLENGE, msg
        mac = P.auth_mac(token, msg.nonce) if msg.auth_required else b""
        channel.send(P.Kind.AUTH, P.Auth(mac))
        kind, msg, _ = channel.recv()
        if kind != P.Kind.WELCOME:
            raise ConnectionRefusedError(f"{msg}")
        self.welcome = msg
        if hasattr(channel, "max_frame"):
            channel.max_frame = msg.limits.max_frame
        self.seq = itertools.count(1)
        self.handles = itertools.count(1000)
        self.tids = itertools.count(1)

    @classmethod
    def local(cls, server: GPUServer) -> "RawTenant":
        return cls(LocalChannel(server))

    @classmethod
    def tcp(cls, address: str, token: str | None = None) -> "RawTenant":
        return cls(SocketChannel.connect(address, transport="tcp"), token)

    def handle(self) -> int:
        return next(self.handles)

    def send(self, ops: list[Any], payloads: Sequence[bytes] = (), sync: Any = None) -> tuple[Any, list[memoryview]]:
        seq = next(self.seq)
        self.channel.send(P.Kind.SUBMIT, P.Submit(list(ops), [len(p) for p in payloads], sync, seq),
                          [memoryview(p) for p in payloads])
        if sync is None:
            return None, []
        kind, reply, data = self.channel.recv()
        assert kind == P.Kind.REPLY, reply
        if reply.error is not None:
            raise Refused(reply.error)
        return reply.value, data

    def check(self) -> None:
        """Raise the first failure since the last sync."""
        self.send([], sync=P.Barrier())

    # -- records ------------------------------------------------------------------------------

    def upload(self, t: torch.Tensor, share: bool = False) -> int:
        h = self.handle()
        data = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        name = str(t.dtype).removeprefix("torch.")
        self.send([P.Upload(h, name, tuple(t.shape), 0, share)], [data])
        return h

    def define(self, name: str, args: list[Any], kwargs: dict[str, Any] | None = None,
               outs: Sequence[tuple[str, tuple, tuple, int]] = ()) -> int:
        tid = next(self.tids)
        self.send([P.DefineOp(tid, name, [skeleton(a) for a in args],
                              {k: skeleton(v) for k, v in (kwargs or {}).items()}, list(outs))])
        return tid

    def run(self, tid: int, slots: list[int], nouts: int = 1, scalars: Sequence[Any] = ()) -> list[int]:
        outs = [self.handle() for _ in range(nouts)]
        self.send([P.Run(tid, slots, outs, list(scalars))])
        return outs

    def execute(self, tid: int, slots: list[int], scalars: Sequence[Any] = ()) -> Any:
        value, _ = self.send([], sync=P.Execute(tid, slots, self.handle() + 10_000, list(scalars)))
        return value

    def fetch(self, handle: int, dt: torch.dtype, size: Sequence[int], stride: Sequence[int] | None = None,
              offset: int = 0) -> torch.Tensor:
        if stride is None:
            stride = torch.empty(tuple(size), device="meta").stride()
        name = str(dt).removeprefix("torch.")
        _, data = self.send([], sync=P.Fetch(handle, name, tuple(size), tuple(stride), offset))
        raw = bytes(data[0]) if data else b""
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(tuple(size)).clone() \
            if raw else torch.empty(tuple(size), dtype=dt)

    def stats(self) -> dict[str, Any]:
        value, _ = self.send([], sync=P.Stats())
        return value

    def close(self) -> None:
        self.channel.close()


def idle_connections(address: tuple[str, int], n: int) -> list[socket.socket]:
    """``n`` TCP connections that never say a word (a pre-authentication flood)."""
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection(address, timeout=5))
        except OSError:
            break
    return socks


class ServerProcess:
    """``caserve gpu-server`` in a subprocess with extra flags and, optionally, a low open-file limit."""

    def __init__(self, tmp: Any, *flags: str, token: str | None = None, nofile: int | None = None) -> None:
        import resource
        import subprocess
        import sys

        from serving_procs import child_env, free_port

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "caserve.cli", "gpu-server", "--port", str(self.port), "--device", "cpu",
                "--no-unix-socket", *flags]
        if token:
            tf = tmp / f"token-{self.port}"
            tf.write_text(token)
            args += ["--token-file", str(tf)]

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.log_path = tmp / f"gpu-server-{self.port}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=child_env(),
                                     preexec_fn=limit)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"gpu-server did not start: {line!r} {self.log_path.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001 - a server that does not stop is killed
                self.proc.kill()
                self.proc.wait()
        self.log.close()
