"""The caserve remote wire protocol: every message a CPU node and a GPU server exchange.

Read this module top to bottom to know the whole protocol. Nothing else in caserve encodes or decodes
bytes on the wire.

Framing
-------
Every message is one frame::

    0        4      5          9                     9+H                          len+4
    +--------+------+----------+---------------------+------------------------------+
    | len    | kind | H        | header              | payload segments             |
    | u32 LE | u8   | u32 LE   | msgpack, H bytes    | raw bytes, sizes in header   |
    +--------+------+----------+---------------------+------------------------------+

``len`` counts every byte after itself. The header is a msgspec-encoded struct chosen by ``kind``.
Tensor bytes never go through msgpack: they follow the header as raw payload segments (sent from the
tensor's memory with ``sendmsg``, received into one buffer that the server wraps without a copy), and
the header names them by index.

Session
-------
::

    client                                  server
      | HELLO {version, client nonce c}       |
      |-------------------------------------->|   version mismatch -> ERROR, close
      |         CHALLENGE {version, nonce s}  |
      |<--------------------------------------|
      | AUTH {mac = HMAC-SHA256(token, s)}    |
      |-------------------------------------->|   bad mac -> ERROR, close
      | WELCOME {tenant, device, ...,         |
      |   proof = HMAC-SHA256(token, c + s)}  |   a client holding a token checks the proof
      |<--------------------------------------|
      | SUBMIT {ops..., sync: None}           |   streamed, never answered
      |-------------------------------------->|
      | SUBMIT {ops..., sync: Fetch(...)}     |   a sync point: one round trip
      |-------------------------------------->|
      |                 REPLY {seq, error, ..}|
      |<--------------------------------------|

With no token configured the server accepts only loopback peers and the MAC is empty.

Ops
---
The client mints every handle, so ops stream without waiting. A *storage handle* names one device
allocation of the tenant; a tensor argument is a view of one: ``(handle, dtype, size, stride, offset)``.
Each distinct op signature is sent once as a :class:`DefineOp` template (op name, argument skeleton,
expected output geometry); later calls are a :class:`Run` naming the template and the storage
handles to plug into its tensor slots.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from typing import Any, Literal, Union

import msgspec

# Bump on any change to the structs or framing below; tests/test_protocol.py pins a digest of the
# schema so that a change without a bump fails.
PROTOCOL_VERSION = 7

FRAME_PREFIX = struct.Struct("<IBI")  # len, kind, header length

# Limits of a GPU server (defaults; each is configurable on ``caserve gpu-server`` and sent in WELCOME).
MAX_HANDSHAKE_FRAME = 64 * 1024  # before authentication a peer may not make us buffer more


class Limits(msgspec.Struct, frozen=True):
    """What one tenant may send and keep on the server, and how long a connection may take. The server
    enforces these and sends them in :class:`Welcome`; the client obeys what it was sent and keeps no
    copies. A new limit is a new field with a default (and a protocol version bump)."""

    # After the handshake one frame carries at most this much (the zoo's largest weight, Qwen2.5-0.5B's
    # fp32 embedding, is 544 MB); memory for a frame is taken as its bytes arrive, never on the word of
    # its length prefix.
    max_frame: int = 768 * 1024**2
    max_templates: int = 65536  # op templates (DefineOp) held at once
    max_graphs: int = 1024  # graphs (DefineGraph) held at once
    max_graph_records: int = 100_000  # records in one graph
    max_tenant_graph_records: int = 1 << 18  # records in all of a tenant's graphs together
    max_pins: int = 4096  # shared weights asked for (HasBlobs) and not yet bound
    max_partial_uploads: int = 8  # uploads in parts (UploadPart) begun and not yet complete
    max_dims: int = 64  # dimensions of one tensor
    max_connections: int = 256  # open connections to the server in all (authenticated or not)
    max_peer_connections: int = 64  # open connections from one peer address
    handshake_timeout: float = 10.0  # seconds from accept to WELCOME
    idle_timeout: float = 0.0  # seconds an authenticated connection may stay silent (0: no limit)


LIMITS = Limits()  # what this build's server enforces unless it is configured otherwise
DEFAULT_TENANT_SHARE = 0.25  # the default per-tenant memory quota (Welcome.memory_limit): this share of the device


class Kind(enum.IntEnum):
    """Message kinds. The numbers are part of the protocol: never reuse or renumber one."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    SUBMIT = 5
    REPLY = 6
    ERROR = 7


# ---------------------------------------------------------------------------------------------
# Handshake


class Hello(msgspec.Struct, frozen=True):
    version: int
    client: str = ""
    nonce: bytes = b""  # the client's challenge: WELCOME proves the server knows the token too


class Challenge(msgspec.Struct, frozen=True):
    version: int
    nonce: bytes
    auth_required: bool


class Auth(msgspec.Struct, frozen=True):
    mac: bytes


class Welcome(msgspec.Struct, frozen=True):
    tenant: int
    device: str  # the server device, e.g. "cuda:0" or "cpu"
    device_name: str
    memory_limit: int  # bytes, 0 = unlimited
    limits: Limits
    proof: bytes = b""  # server_proof(token, client nonce, server nonce); empty when no token matched


class Error(msgspec.Struct, frozen=True):
    """Sent before the server closes a connection it refuses (version, auth, malformed frames)."""

    code: str
    message: str


def auth_mac(token: str, nonce: bytes) -> bytes:
    """The challenge response: HMAC-SHA256 of the server's nonce under the shared token."""
    return hmac.new(token.encode(), b"caserve-auth-v1:" + nonce, hashlib.sha256).digest()


def check_mac(token: str, nonce: bytes, mac: bytes) -> bool:
    return hmac.compare_digest(auth_mac(token, nonce), mac)


def server_proof(token: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The server's answer to the client's challenge: it knows the token as well (under its own label, so
    that it can never be replayed as a client's AUTH)."""
    return hmac.new(token.encode(), b"caserve-server-v1:" + client_nonce + server_nonce, hashlib.sha256).digest()


# ---------------------------------------------------------------------------------------------
# Ops (inside SUBMIT). Array-like tagged structs keep the hot records a few bytes each.

Geometry = tuple[tuple[int, ...], tuple[int, ...], int]  # size, stride, storage offset (elements)
Number = Union[bool, int, float]

# Every dtype that may cross the wire (caserve.remote.wire.codec maps the names to torch dtypes).
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
               "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
DType = Literal["float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
                "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]


# The argument skeleton of a DefineOp: a tagged union, so that the decoder itself refuses a malformed
# argument (a device or dtype given as a free string, a slot without its geometry).


class TensorSlot(msgspec.Struct, array_like=True, tag="t", frozen=True):
    """Tensor slot ``slot`` (numbered in order) viewed as ``dtype``/``size``/``stride``/``offset``."""

    slot: int
    dtype: DType
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class ScalarSlot(msgspec.Struct, array_like=True, tag="s", frozen=True):
    """A number that cannot change the output's shape; each Run carries its value (``scalars[index]``)."""

    index: int
    kind: Literal["bool", "int", "float"]


class DeviceArg(msgspec.Struct, array_like=True, tag="dev", frozen=True):
    """The tenant's device; the server maps it to its own (the index is the client's device index)."""

    index: int


class DTypeArg(msgspec.Struct, array_like=True, tag="dtype", frozen=True):
    name: DType


class LayoutArg(msgspec.Struct, array_like=True, tag="layout", frozen=True):
    name: Literal["strided"]


class MemoryFormatArg(msgspec.Struct, array_like=True, tag="mf", frozen=True):
    name: Literal["contiguous_format", "preserve_format", "channels_last", "channels_last_3d"]


class CpuScalar(msgspec.Struct, array_like=True, tag="cpu", frozen=True):
    """A 0-dim CPU tensor constant."""

    dtype: DType
    value: Number


class ArgList(msgspec.Struct, array_like=True, tag="list", frozen=True):
    items: list[Arg]


Arg = Union[None, bool, int, float, str, TensorSlot, ScalarSlot, DeviceArg, DTypeArg, LayoutArg, MemoryFormatArg,
            CpuScalar, ArgList]
ARG_TYPES = (TensorSlot, ScalarSlot, DeviceArg, DTypeArg, LayoutArg, MemoryFormatArg, CpuScalar, ArgList)


class DefineOp(msgspec.Struct, array_like=True, tag=1):
    """Template ``tid``: the ATen op ``name`` called with ``args``/``kwargs`` (see :data:`Arg`).

    ``outs`` is the expected ``[dtype, size, stride, offset]`` of each fresh output, in order; the server
    checks it against what the op makes (its meta kernel) and refuses a template that differs.
    """

    tid: int
    name: str
    args: list[Arg]
    kwargs: dict[str, Arg]
    outs: list[tuple[str, tuple[int, ...], tuple[int, ...], int]]


class Run(msgspec.Struct, array_like=True, tag=2):
    """Call template ``tid`` with the storages ``slots`` and the values of its scalar slots ``scalars``,
    and bind its fresh outputs to ``outs``."""

    tid: int
    slots: list[int]
    outs: list[int]
    scalars: list[Number] = []


class Alloc(msgspec.Struct, array_like=True, tag=3):
    """New uninitialized storage ``handle`` laid out as ``size``/``stride``."""

    handle: int
    dtype: str
    size: tuple[int, ...]
    stride: tuple[int, ...]


class Upload(msgspec.Struct, array_like=True, tag=4):
    """New storage ``handle``: contiguous ``size`` of ``dtype`` from payload segment ``payload``.

    ``share``: the bytes are a weight; the server stores identical contents once for all tenants
    (by its own hash of the bytes) and the handle becomes read-only.
    """

    handle: int
    dtype: str
    size: tuple[int, ...]
    payload: int
    share: bool


class UploadPart(msgspec.Struct, array_like=True, tag=13):
    """Bytes ``[start, start + len(payload))`` of an :class:`Upload` too large for one frame (the client
    splits whatever exceeds half of ``Limits.max_frame``). Every part names the same ``handle``, ``dtype``,
    ``size`` and ``share``; the part at ``start`` 0 creates the storage and charges the tenant for all of
    it, the others follow in order, and ``handle`` exists once the last byte has arrived (a shared weight is
    hashed by the server as its parts arrive, then stored once as with Upload). ``Free`` of the handle
    abandons an incomplete upload."""

    handle: int
    dtype: str
    size: tuple[int, ...]
    start: int
    payload: int
    share: bool


class CopyIn(msgspec.Struct, array_like=True, tag=5):
    """Copy payload segment ``payload`` (contiguous ``size`` of ``src_dtype``) into a view."""

    handle: int
    dtype: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    src_dtype: str
    src_size: tuple[int, ...]
    payload: int


class BindBlob(msgspec.Struct, array_like=True, tag=6):
    """New read-only storage ``handle`` bound to the shared blob with this digest (see HasBlobs)."""

    handle: int
    digest: bytes


class CopyStorage(msgspec.Struct, array_like=True, tag=7):
    """New private storage ``handle``, a copy of storage ``src`` (copy-on-write of a shared weight)."""

    handle: int
    src: int


class Free(msgspec.Struct, array_like=True, tag=8):
    handles: list[int]


class Seed(msgspec.Struct, array_like=True, tag=9):
    """Seed the tenant's own device generator (``torch.manual_seed`` on the client)."""

    seed: int


class ResetTemplates(msgspec.Struct, array_like=True, tag=10):
    """Forget every template and graph of the tenant (the client's caches were cleared)."""


GraphOp = Union[Run, Alloc, Upload, CopyIn]


class DefineGraph(msgspec.Struct, array_like=True, tag=11):
    """Graph ``gid``: a recorded sequence of records to replay as one (graph mode).

    Every handle field of ``ops`` is a *reference*: ``r >= 0`` means handle ``base + r`` of the replay,
    ``r < 0`` means ``ext[-r - 1]``; payload indices count from the replay's ``payload_base``.
    """

    gid: int
    ops: list[GraphOp]


class Replay(msgspec.Struct, array_like=True, tag=12):
    """Run graph ``gid`` with handles counted from ``base``, external handles ``ext``, and the values of
    every scalar slot of its Run records, in order.

    ``keep`` is ``None`` when the client recorded the call itself (it holds every handle the graph
    mints and frees them as usual). A captured step sends the references it keeps (its outputs): the
    server names only those; everything else the graph makes is dropped when the replay ends.
    """

    gid: int
    base: int
    ext: list[int]
    payload_base: int
    scalars: list[Number] = []
    keep: list[int] | None = None


Op = Union[DefineOp, Run, Alloc, Upload, CopyIn, BindBlob, CopyStorage, Free, Seed, ResetTemplates, DefineGraph,
           Replay, UploadPart]


# ---------------------------------------------------------------------------------------------
# Sync requests (at most one per SUBMIT, answered by one REPLY)


class Fetch(msgspec.Struct, tag="fetch"):
    """Reply with the bytes of a view, contiguous, as payload segment 0."""

    handle: int
    dtype: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class Execute(msgspec.Struct, tag="exec"):
    """Run template ``tid`` now and describe its outputs (data-dependent shapes, missing meta kernels).

    Fresh output tensors are bound to handles ``first_handle``, ``first_handle + 1``, ...; the reply's
    ``value`` mirrors the op's return with each tensor as ``{"$t": [handle, dtype, size, stride, offset]}``.
    """

    tid: int
    slots: list[int]
    first_handle: int
    scalars: list[Number] = []


class HasBlobs(msgspec.Struct, tag="has_blobs"):
    digests: list[bytes]


class Barrier(msgspec.Struct, tag="barrier"):
    """Wait until every op so far has run (and, on a GPU, finished)."""


class Stats(msgspec.Struct, tag="stats"):
    """Server-wide and tenant figures: memory, tenants, ops executed, CPU time."""


SyncRequest = Union[Fetch, Execute, HasBlobs, Barrier, Stats]


class Submit(msgspec.Struct):
    ops: list[Op]
    payloads: list[int]  # byte length of each payload segment after the header
    sync: SyncRequest | None = None
    seq: int = 0


class RemoteFailure(msgspec.Struct, frozen=True):
    """The first op that failed since the last reply: its name and the server's message."""

    op: str
    message: str
    code: str = "op_failed"


class Reply(msgspec.Struct):
    seq: int
    error: RemoteFailure | None = None
    value: Any = None
    payloads: list[int] = []


HEADERS: dict[Kind, type] = {
    Kind.HELLO: Hello,
    Kind.CHALLENGE: Challenge,
    Kind.AUTH: Auth,
    Kind.WELCOME: Welcome,
    Kind.SUBMIT: Submit,
    Kind.REPLY: Reply,
    Kind.ERROR: Error,
}

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in HEADERS.items()}


class ProtocolError(Exception):
    """A frame that does not follow this protocol."""


def encode_header(msg: Any) -> bytes:
    return _ENCODER.encode(msg)


def decode_header(kind: int, data: bytes | memoryview) -> Any:
    try:
        decoder = _DECODERS[Kind(kind)]
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed {Kind(kind).name} header: {exc}") from None


def frame_prefix(kind: Kind, header_len: int, payload_len: int) -> bytes:
    return FRAME_PREFIX.pack(1 + 4 + header_len + payload_len, kind, header_len)


def split_frame(body: memoryview) -> tuple[int, memoryview, memoryview]:
    """Split a frame body (everything after ``len``) into kind, header bytes and payload bytes."""
    if len(body) < 5:
        raise ProtocolError(f"frame of {len(body)} bytes is shorter than its prefix")
    kind = body[0]
    (hlen,) = struct.unpack_from("<I", body, 1)
    if hlen > len(body) - 5:
        raise ProtocolError(f"header length {hlen} exceeds frame of {len(body)} bytes")
    return kind, body[5 : 5 + hlen], body[5 + hlen :]


def split_payloads(data: memoryview, sizes: list[int]) -> list[memoryview]:
    """Cut the payload area into the segments the header declares; they must add up exactly."""
    if any(s < 0 for s in sizes) or sum(sizes) != len(data):
        raise ProtocolError(f"payload sizes {sum(sizes)} do not match the {len(data)} payload bytes")
    out, pos = [], 0
    for s in sizes:
        out.append(data[pos : pos + s])
        pos += s
    return out


def _type_name(tp: Any) -> str:
    return str(tp).replace(f"{__name__}.", "")


def schema_digest() -> str:
    """A digest of every struct's fields and tags, pinned by a test against PROTOCOL_VERSION."""
    parts = [f"{k.name}={k.value}" for k in Kind]
    for cls in (*HEADERS.values(), Limits, *Op.__args__, *SyncRequest.__args__, RemoteFailure, *ARG_TYPES):  # type: ignore[attr-defined]
        info = msgspec.structs.fields(cls)
        tag = getattr(cls, "__struct_config__").tag
        # Types are written without this module's path, so moving the module does not change the digest.
        parts.append(f"{cls.__name__}[{tag}]:" + ",".join(f"{f.name}:{_type_name(f.type)}" for f in info))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
