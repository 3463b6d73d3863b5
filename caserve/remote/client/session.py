"""The client side of one connection: op buffer, handle minting, flushes and sync round trips.

Ops are appended to a buffer and sent in frames without waiting; only :meth:`Session.sync` waits for
the server, once. The first remote failure since the last sync is raised there.
"""

from __future__ import annotations

import collections
import hmac
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from caserve.remote.client.records import CallLog, Region
from caserve.remote.wire import protocol as P
from caserve.remote.wire.errors import ConnectionLost, HandshakeError, QuotaExceeded, RemoteOpError
from caserve.remote.wire.transport import Channel, as_bytes

logger = logging.getLogger(__name__)

FLUSH_OPS = 32  # ops per frame when no sync point comes first
GRAPH_CHUNK = 64  # graph mode: records per recorded segment of a forward
FLUSH_BYTES = 1 << 20  # payload bytes per frame (uploads are sent soon, from the caller's memory)
_GRAPH_RECORDS = (P.Run, P.Alloc, P.Upload, P.CopyIn)


@dataclass
class SessionStats:
    """Counters for benchmarks: what crossed the wire."""

    ops: int = 0  # ATen ops intercepted (including view ops that never leave the client)
    records: int = 0  # op records sent
    frames: int = 0
    bytes_sent: int = 0  # whole frames: prefix, header and payloads
    syncs: int = 0
    meta_misses: int = 0
    sync_wait_s: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Session:
    """One tenant connection to a GPU server, behind one ``torch.device("caserve", index)``."""

    def __init__(self, channel: Channel, welcome: P.Welcome, index: int) -> None:
        self.channel = channel
        self.welcome = welcome
        self.limits = welcome.limits  # the server's: obeyed, never assumed
        self.index = index
        self.device = torch.device("caserve", index)
        self.lock = threading.RLock()
        self.next_handle = 1
        self.template_ids = itertools.count(1)
        self.ops: list[Any] = []
        self.payloads: list[memoryview | bytes] = []
        self._keepalive: list[Any] = []  # tensors whose memory the pending payloads point into
        self.payload_bytes = 0
        self.freed: collections.deque[int] = collections.deque()
        self.seq = 0
        self.closed: str | None = None
        self.stats = SessionStats()
        self.cache: dict[Any, Any] = {}  # op signature -> dispatch plan (caserve.remote.client.dispatch)
        self.region: Region | None = None  # graph mode: the forward being recorded
        self.region_depth = 0
        # Graph mode (caserve.remote.client.graph) installs these on the first forward it records: its
        # per-session graphs, and the hook that sends a finished region (called under the lock).
        self.graph_cache: Any = None
        self.region_end: Callable[[Session, Region], None] | None = None
        self.call_log: CallLog | None = None  # graph mode: the forward being watched for capture
        self.epoch = 0  # bumped whenever the server forgets this session's templates and graphs
        self.pending: collections.deque[Pending] = collections.deque()  # requests awaiting their replies

    # -- handshake ------------------------------------------------------------------------------

    @classmethod
    def open(cls, channel: Channel, token: str | None, index: int) -> "Session":
        mine = secrets.token_bytes(32)
        channel.send(P.Kind.HELLO, P.Hello(P.PROTOCOL_VERSION, "caserve-client", mine))
        kind, msg, _ = channel.recv()
        if kind == P.Kind.ERROR:
            raise HandshakeError(msg.code, msg.message)
        if kind != P.Kind.CHALLENGE:
            raise HandshakeError("protocol", f"expected CHALLENGE, got kind {kind}")
        if msg.auth_required and not token:
            channel.close()
            raise HandshakeError("auth", "the GPU server requires a token (token= or CASERVE_TOKEN)")
        # A token is proved even where none is required: an admin token on a loopback-only server.
        theirs = msg.nonce
        channel.send(P.Kind.AUTH, P.Auth(P.auth_mac(token, theirs) if token else b""))
        kind, msg, _ = channel.recv()
        if kind == P.Kind.ERROR:
            channel.close()
            raise HandshakeError(msg.code, msg.message)
        if kind != P.Kind.WELCOME:
            raise HandshakeError("protocol", f"expected WELCOME, got kind {kind}")
        if token and not hmac.compare_digest(msg.proof, P.server_proof(token, mine, theirs)):
            channel.close()
            raise HandshakeError("auth", "the GPU server could not prove that it knows the token: not talking to it")
        if hasattr(channel, "max_frame"):
            channel.max_frame = msg.limits.max_frame
        return cls(channel, msg, index)

    # -- the op stream --------------------------------------------------------------------------

    def new_handle(self) -> int:
        h = self.next_handle
        self.next_handle = h + 1
        return h

    def emit(self, op: Any) -> None:
        region = self.region
        if region is not None:
            t = type(op)
            if t in _GRAPH_RECORDS:
                log = self.call_log
                if log is not None:
                    log.records.append(op)
                if t is not P.Run and t is not P.Alloc:  # move its payload from the frame to the region
                    if log is not None:
                        log.bad = "forward uploads host data"
                    region.payloads.append(self.payloads.pop())
                    region.owners.append(self._keepalive.pop())
                    self.payload_bytes -= len(region.payloads[-1])
                    op.payload = len(region.payloads) - 1
                region.records.append(op)
                if len(region.records) >= GRAPH_CHUNK:
                    # Chunks keep the server busy while the client is still in forward; each chunk is
                    # matched and replayed on its own, and repeats as long as the forward does.
                    self._cut_region()
                    self.flush()
                return
            if t is not P.DefineOp:  # definitions go ahead of the region; anything else ends it
                self._abort_region(f"{t.__name__} inside forward")
        self.ops.append(op)
        if len(self.ops) >= FLUSH_OPS:
            self.flush()

    # -- graph mode (caserve.remote.client.graph) -------------------------------------------------------

    def begin_region(self, watch: bool = False) -> None:
        """A forward call begins; ``watch`` keeps a log of it for capture (caserve.remote.client.capture)."""
        with self.lock:
            self.region_depth += 1
            if self.region_depth == 1:
                self.region = Region(self.next_handle)
                self.call_log = CallLog(self.next_handle, epoch=self.epoch) if watch else None

    def end_region(self) -> CallLog | None:
        """The forward call ended; returns its log if it was watched."""
        with self.lock:
            self.region_depth = max(0, self.region_depth - 1)
            if self.region_depth != 0:
                return None
            log, self.call_log = self.call_log, None
            if self.region is not None:
                region, self.region = self.region, None
                self.region_end(self, region)
                if len(self.ops) >= FLUSH_OPS:
                    self.flush()
            if log is not None and log.epoch != self.epoch:
                log.bad = "the server's templates were reset during forward"
            return log

    def reset_templates(self) -> None:
        """Forget every plan and graph, here and on the server (a template was refused, or too many)."""
        self.cache.clear()
        if self.graph_cache is not None:
            self.graph_cache.clear()
        self.epoch += 1
        self.emit(P.ResetTemplates())

    def _cut_region(self) -> None:
        """A sync point inside forward: what was recorded so far goes out as a graph segment of its own
        (replayed when seen before), and recording goes on after the sync."""
        region = self.region
        self.region = Region(self.next_handle)
        if region is not None:
            self.region_end(self, region)

    def _abort_region(self, reason: str) -> None:
        """Send what the region holds as eager records; the rest of this forward runs eagerly."""
        region, self.region = self.region, None
        if self.call_log is not None:
            self.call_log.bad = reason
        if region is not None:
            region.aborted = reason
            self.region_end(self, region)

    def add_payload(self, data: memoryview, owner: Any) -> int:
        """Queue bytes to travel with the next frame; ``owner`` keeps their memory alive until then."""
        data = as_bytes(data)
        self.payloads.append(data)
        self._keepalive.append(owner)
        self.payload_bytes += len(data)
        return len(self.payloads) - 1

    def free(self, handle: int) -> None:
        """Called from RemoteStorage finalizers, on any thread: freed with the next frame."""
        self.freed.append(handle)
        log = self.call_log
        if log is not None:
            log.freed.add(handle)

    def check_open(self) -> None:
        if self.closed is not None:
            raise ConnectionLost(f"the GPU server connection of {self.device} is closed: {self.closed}")

    def flush(self, sync: P.SyncRequest | None = None) -> None:
        with self.lock:
            self.check_open()
            if sync is not None and self.region is not None:
                if self.call_log is not None:
                    self.call_log.bad = "forward waits for data (a sync point)"
                self._cut_region()
            if self.freed and (self.region is None or not self.region.records):  # held records may use them
                handles = []
                while self.freed:
                    handles.append(self.freed.popleft())
                self.ops.append(P.Free(handles))
            if not self.ops and sync is None:
                return
            self.seq += 1
            msg = P.Submit(self.ops, [len(p) for p in self.payloads], sync, self.seq)
            payloads = self.payloads
            self.stats.records += len(self.ops)
            self.stats.frames += 1
            self.ops, self.payloads, self._keepalive, self.payload_bytes = [], [], [], 0
            try:
                self.stats.bytes_sent += self.channel.send(P.Kind.SUBMIT, msg, payloads)
            except ConnectionLost as exc:
                self._lost(exc)

    def sync(self, request: P.SyncRequest) -> tuple[Any, list[memoryview]]:
        """Flush, send ``request`` and wait for its reply; raises the first remote failure."""
        with self.lock:
            start = time.perf_counter()
            self.flush(request)
            seq = self.seq
            self._drain(None)  # replies to earlier requests come first
            value, payloads, error = self._receive(seq)
            self.stats.syncs += 1
            self.stats.sync_wait_s += time.perf_counter() - start
            if error is not None:
                raise error
            return value, payloads

    def request(self, request: P.SyncRequest) -> "Pending":
        """Send ``request`` now and read its reply later (:meth:`Pending.result`): the server works on
        what follows while the client does something else. Replies arrive in order."""
        with self.lock:
            self.flush(request)
            pending = Pending(self, self.seq)
            self.pending.append(pending)
            return pending

    def _drain(self, upto: "Pending | None") -> None:
        """Read the replies of outstanding requests, in order, until ``upto`` has its own (all if None)."""
        while self.pending and (upto is None or not upto.done):
            p = self.pending.popleft()
            p.value, p.payloads, p.error = self._receive(p.seq)
            p.done = True

    def _receive(self, seq: int) -> tuple[Any, list[memoryview], Exception | None]:
        try:
            kind, reply, payloads = self.channel.recv()
        except (ConnectionLost, P.ProtocolError) as exc:
            self._lost(exc)
        if kind == P.Kind.ERROR:
            self._lost(ConnectionLost(f"server closed the connection ({reply.code}): {reply.message}"))
        if kind != P.Kind.REPLY or reply.seq != seq:
            self._lost(ConnectionLost(f"out-of-order reply (kind {kind}) from the server"))
        if reply.error is None:
            return reply.value, payloads, None
        err = reply.error
        if err.op == "DefineOp":
            # The server refused a template this client cached: forget every plan, so that no later op
            # names the missing template.
            self.reset_templates()
        cls = QuotaExceeded if err.code == "quota_exceeded" else RemoteOpError
        return None, [], cls(err.op, err.message, err.code)

    def _lost(self, exc: Exception) -> None:
        self.closed = str(exc)
        try:
            self.channel.close()
        except Exception:  # noqa: BLE001 - already failing; the original error matters
            pass
        raise ConnectionLost(f"lost the GPU server connection of {self.device}: {exc}") from exc

    def close(self) -> None:
        """End the session and give its device index back (tensors of it raise ConnectionLost)."""
        with self.lock:
            if self.closed is None:
                try:
                    self.flush()
                except ConnectionLost:
                    pass
                self.closed = "closed by the client"
                self.channel.close()
        with _REGISTRY_LOCK:
            if self.index < len(SESSIONS) and SESSIONS[self.index] is self:
                SESSIONS[self.index] = None


class Pending:
    """The reply to a request sent with :meth:`Session.request`. A remote failure of the ops before the
    request is raised by :meth:`result` (the first failure since the previous reply, as with a sync)."""

    __slots__ = ("session", "seq", "done", "value", "payloads", "error")

    def __init__(self, session: Session, seq: int) -> None:
        self.session, self.seq, self.done = session, seq, False
        self.value: Any = None
        self.payloads: list[memoryview] = []
        self.error: Exception | None = None

    def result(self) -> tuple[Any, list[memoryview]]:
        if not self.done:
            with self.session.lock:
                start = time.perf_counter()
                self.session._drain(self)
                self.session.stats.syncs += 1
                self.session.stats.sync_wait_s += time.perf_counter() - start
        if self.error is not None:
            raise self.error
        return self.value, self.payloads


# One session per device index; indices of closed sessions are reused (torch keeps them in an int8).
SESSIONS: list[Session | None] = []
MAX_SESSIONS = 127
_REGISTRY_LOCK = threading.Lock()


def register(make: Any) -> Session:
    with _REGISTRY_LOCK:
        free = [i for i, s in enumerate(SESSIONS) if s is None]
        index = free[0] if free else len(SESSIONS)
        if index >= MAX_SESSIONS:
            raise RuntimeError(f"at most {MAX_SESSIONS} caserve devices can be open in one process")
        session = make(index)
        if index == len(SESSIONS):
            SESSIONS.append(session)
        else:
            SESSIONS[index] = session
        return session


def session_of(device: torch.device | int | str) -> Session:
    index = torch.device(device).index if not isinstance(device, int) else device
    if index is None:
        index = 0
    if not 0 <= index < len(SESSIONS) or SESSIONS[index] is None:
        raise ValueError(f"caserve device {index} is not connected; call caserve.remote.connect() first")
    return SESSIONS[index]  # type: ignore[return-value]


def live_sessions() -> Sequence[Session]:
    return [s for s in SESSIONS if s is not None and s.closed is None]
