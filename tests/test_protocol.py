"""The wire protocol: pinned schema, framing round trips, and a fuzzed decoder that never crashes."""

from __future__ import annotations

import socket
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import caserve.remote as R
from caserve.remote.wire import protocol as P
from caserve.remote.server.connection import Connection
from caserve.remote.server.gpu_server import GPUServer
from caserve.remote.wire.transport import recv_frame, send_frame

# A change to any struct, tag or kind changes this digest: bump PROTOCOL_VERSION and update both.
PINNED = {4: "8347acde3429294c", 5: "776985b37447219f",  # 5: Welcome carries a Limits struct
          # 6: typed arguments (a tagged union), connection limits in Limits, HELLO's client nonce and
          # WELCOME's proof of the token
          6: "e65c36d0d24afd03",
          7: "2db0a7a58f6ac2bd"}  # 7: UploadPart (uploads larger than a frame) and Limits.max_partial_uploads


def test_schema_change_requires_version_bump():
    assert PINNED.get(P.PROTOCOL_VERSION) == P.schema_digest(), (
        "the wire schema changed: bump PROTOCOL_VERSION and pin the new digest"
    )


def test_frame_round_trip_with_payloads():
    a, b = socket.socketpair()
    data = torch.arange(1000, dtype=torch.float32)
    msg = P.Submit([P.Upload(5, "float32", (1000,), 0, False), P.Run(1, [5], [6])], [4000], P.Barrier(), 3)
    send_frame(a, P.Kind.SUBMIT, msg, [memoryview(data.numpy())])
    kind, header, payloads = recv_frame(b, P.LIMITS.max_frame)
    assert kind == P.Kind.SUBMIT and header == msg
    assert torch.equal(torch.frombuffer(payloads[0], dtype=torch.float32), data)
    a.close()
    b.close()


def test_oversized_frame_refused_before_buffering():
    a, b = socket.socketpair()
    a.sendall(struct.pack("<I", P.MAX_HANDSHAKE_FRAME + 1))
    with pytest.raises(P.ProtocolError, match="exceeds"):
        recv_frame(b, P.MAX_HANDSHAKE_FRAME)
    a.close()
    b.close()


def _authed_connection() -> Connection:
    conn = Connection(GPUServer("cpu"), "fuzz", loopback=True)
    kind, challenge, _ = conn.on_frame(P.Kind.HELLO, P.Hello(P.PROTOCOL_VERSION), [])
    conn.on_frame(P.Kind.AUTH, P.Auth(b""), [])
    assert conn.tenant is not None
    return conn


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzzed_frame_bodies_only_raise_protocol_errors(body):
    """Any byte string as a frame body: a ProtocolError or a harmless decode, never anything else."""
    try:
        kind, hdr, data = P.split_frame(memoryview(body))
        header = P.decode_header(kind, hdr)
        P.split_payloads(data, getattr(header, "payloads", None) or [])
    except P.ProtocolError:
        return


ops = st.one_of(
    st.builds(P.Run, st.integers(-5, 50), st.lists(st.integers(-5, 50), max_size=4), st.lists(st.integers(-5, 50), max_size=3)),
    st.builds(P.Alloc, st.integers(-5, 50), st.sampled_from(["float32", "int64", "nope"]),
              st.lists(st.integers(-3, 64), max_size=3).map(tuple), st.lists(st.integers(-3, 64), max_size=3).map(tuple)),
    st.builds(P.Free, st.lists(st.integers(-5, 50), max_size=4)),
    st.builds(P.Upload, st.integers(0, 50), st.sampled_from(["float32", "bool", "x"]),
              st.lists(st.integers(0, 8), max_size=2).map(tuple), st.integers(-1, 2), st.booleans()),
    st.builds(P.DefineOp, st.integers(0, 50), st.sampled_from(["aten.add.Tensor", "aten.mm.default", "aten.empty.memory_format", "bad", "aten.nope.default"]),
              st.lists(st.one_of(st.integers(-3, 3), st.floats(allow_nan=False), st.just(P.TensorSlot(0, "float32", (2,), (1,), 0)),
                                 st.just(P.DeviceArg(0)), st.just(P.TensorSlot(5, "float32", (2,), (1,), 0)),
                                 st.just(P.ArgList([2, 2])), st.just("meta"), st.just(P.DTypeArg("int64"))), max_size=3),
              st.just({}), st.lists(st.just(("float32", (2,), (1,), 0)), max_size=2)),
    st.builds(P.CopyStorage, st.integers(0, 50), st.integers(-5, 50)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(ops, max_size=8), st.lists(st.binary(max_size=64), max_size=2))
def test_fuzzed_op_streams_are_reported_not_fatal(stream, payloads):
    """Random well-framed op records: the tenant gets an error reply (or none), the server survives."""
    conn = _authed_connection()
    sub = P.Submit(stream, [len(p) for p in payloads], P.Barrier(), 1)
    decoded = P.decode_header(P.Kind.SUBMIT, P.encode_header(sub))
    kind, reply, _ = conn.on_frame(P.Kind.SUBMIT, decoded, [memoryview(bytearray(p)) for p in payloads])
    assert kind == P.Kind.REPLY and reply.seq == 1
    # The same tenant keeps working after whatever it sent.
    ok = P.Submit([P.Alloc(10_000, "float32", (3,), (1,))], [], P.Fetch(10_000, "float32", (3,), (1,), 0), 2)
    kind, reply, out = conn.on_frame(P.Kind.SUBMIT, ok, [])
    assert reply.error is None and len(out[0]) == 12
    conn.close()


@pytest.mark.parametrize("arg", [{"$dev": "meta"}, ["dev", "meta"], ["t", 0, "float32"], ["dtype", "float128"],
                                 ["mf", "sideways"], [1, 2]])
def test_the_decoder_refuses_a_malformed_argument(arg):
    """Typed arguments are a tagged union: a device, dtype or slot that is not well formed never decodes."""
    raw = P.encode_header({"ops": [[1, 1, "aten.add.Tensor", [arg], {}, []]], "payloads": []})
    with pytest.raises(P.ProtocolError):
        P.decode_header(P.Kind.SUBMIT, raw)


def test_garbage_on_the_socket_does_not_disturb_other_tenants(gpu_server):
    dev = R.connect(gpu_server.address, token=gpu_server.token)
    x = torch.ones(16, device=dev)
    for junk in [b"\x00" * 3, b"\xff\xff\xff\xff", struct.pack("<IBI", 20, 5, 100) + b"x" * 16,
                 struct.pack("<IBI", 9, 99, 0) + b"xxxx", b"GET / HTTP/1.1\r\n\r\n"]:
        s = socket.create_connection(("127.0.0.1", gpu_server.port))
        s.settimeout(5)
        try:  # the server may hang up at any point of this (that is the point): only its survival matters
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
        except OSError:
            pass
        s.close()
    # A client speaking another protocol version is refused with a clear reason.
    s = socket.create_connection(("127.0.0.1", gpu_server.port))
    send_frame(s, P.Kind.HELLO, P.Hello(P.PROTOCOL_VERSION + 1))
    kind, err, _ = recv_frame(s, P.MAX_HANDSHAKE_FRAME)
    assert kind == P.Kind.ERROR and err.code == "version"
    s.close()
    assert (x * 3).sum().item() == 48.0
    R.disconnect(dev)
