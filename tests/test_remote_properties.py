"""Property-based attacks (hypothesis): a hostile tenant A against tenant B on one GPU server.

A and B upload the same weights (stored once, shared). A then sends random DefineOp / Run / Execute /
Upload / UploadPart / Free records over a broad op list (views, aliases, as_strided, _reshape_alias, view.dtype,
in-place and out= ops, factories), with geometries that are sometimes honest and sometimes not, and
declared outputs that are sometimes lies. After every example: B's weights and private data are
unchanged, A holds no more than its quota (by the server's books and by the memory its tensors really
use), and the server still serves B.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caserve.remote.server import GPUServer
from caserve.remote.wire import protocol as P
from remote_attacker import RawTenant, Refused, device, dtype, tensor

QUOTA = 256 * 1024
W = 512  # elements of each shared weight
DTYPES = {"float32": torch.float32, "int32": torch.int32, "float16": torch.float16}

# op name -> how many tensor slots it takes, and a function (slots, draw) -> (args, kwargs)
OPS: dict[str, tuple[int, Any]] = {
    "aten.view.default": (1, lambda s, d: ([s[0], d(_size)], {})),
    "aten.alias.default": (1, lambda s, d: ([s[0]], {})),
    "aten.detach.default": (1, lambda s, d: ([s[0]], {})),
    "aten._unsafe_view.default": (1, lambda s, d: ([s[0], d(_size)], {})),
    "aten.as_strided.default": (1, lambda s, d: ([s[0], d(_size), d(_stride), d(_offset)], {})),
    "aten._reshape_alias.default": (1, lambda s, d: ([s[0], d(_size), d(_stride)], {})),
    "aten.view.dtype": (1, lambda s, d: ([s[0], dtype(d(st.sampled_from(sorted(DTYPES))))], {})),
    "aten.t.default": (1, lambda s, d: ([s[0]], {})),
    "aten.expand.default": (1, lambda s, d: ([s[0], d(_size)], {})),
    "aten.fill_.Scalar": (1, lambda s, d: ([s[0], 3], {})),
    "aten.zero_.default": (1, lambda s, d: ([s[0]], {})),
    "aten.mul_.Scalar": (1, lambda s, d: ([s[0], 2], {})),
    "aten.add_.Tensor": (2, lambda s, d: ([s[0], s[1]], {})),
    "aten.copy_.default": (2, lambda s, d: ([s[0], s[1]], {})),
    "aten.add.out": (3, lambda s, d: ([s[0], s[1]], {"out": s[2]})),
    "aten.mul.out": (3, lambda s, d: ([s[0], s[1]], {"out": s[2]})),
    "aten.add.Tensor": (2, lambda s, d: ([s[0], s[1]], {})),
    "aten.clone.default": (1, lambda s, d: ([s[0]], {})),
    "aten.cat.default": (2, lambda s, d: ([[s[0], s[1]]], {})),
    "aten.ones.default": (0, lambda s, d: ([d(_size)], {"dtype": dtype("float32"), "device": device()})),
    "aten.empty.memory_format": (0, lambda s, d: ([d(_size)], {"dtype": dtype("float32"), "device": device()})),
    "aten.resize_.default": (1, lambda s, d: ([s[0], d(_size)], {})),
    "aten.set_.source_Tensor": (2, lambda s, d: ([s[0], s[1]], {})),
}

_dim = st.one_of(st.integers(0, 64), st.sampled_from([W, 2 * W, 1 << 16, 1 << 20, 1 << 28]))
_size = st.lists(_dim, min_size=1, max_size=2)
_stride = st.lists(st.integers(0, 1 << 10), min_size=1, max_size=2)
_offset = st.one_of(st.integers(0, 16), st.sampled_from([W - 1, W, 1 << 20]))


def _meta_outs(name: str, args: list, kwargs: dict, slots: list[tuple]) -> list[tuple] | None:
    """The honest declaration of what the op makes, from the local meta kernel (None: it has none)."""
    from caserve.remote.wire.codec import DTYPES as NAMES, flatten_fresh

    metas = [torch.empty((max(1, sum((s - 1) * t for s, t in zip(sz, sd)) + off + 1),), dtype=NAMES[dt],
                         device="meta").as_strided(sz, sd, off) for dt, sz, sd, off in slots]

    def conv(v: Any) -> Any:
        if isinstance(v, P.TensorSlot):
            return metas[v.slot]
        if isinstance(v, P.DTypeArg):
            return NAMES[v.name]
        if isinstance(v, P.DeviceArg):
            return torch.device("meta")
        if isinstance(v, list):
            return [conv(e) for e in v]
        return v

    op = getattr(getattr(torch.ops.aten, name.split(".")[1]), name.split(".")[2])
    try:
        out = op(*conv(args), **{k: conv(v) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001 - the op refuses: any declaration will do
        return None
    return [(str(t.dtype).removeprefix("torch."), tuple(t.shape), tuple(t.stride()), t.storage_offset())
            for t in flatten_fresh(op, out)]


def _distinct_private_bytes(server: GPUServer, tid: int) -> int:
    """Bytes of memory tenant ``tid``'s private tensors really use (each storage counted once)."""
    seen: dict[int, int] = {}
    tenant = server.tenants[tid]
    for stg in tenant.storages.values():
        if stg.blob is None:
            u = stg.tensor.untyped_storage()
            seen[u.data_ptr()] = u.nbytes()
    for part in tenant.uploads.partial.values():  # uploads in parts, not yet complete
        u = part.tensor.untyped_storage()
        seen[u.data_ptr()] = u.nbytes()
    return sum(seen.values())


def _settle(t: RawTenant) -> None:
    """Take the failure A's last records earned, if any (a refusal is what an attack should get)."""
    try:
        t.check()
    except Refused:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_hostile_tenant_cannot_touch_another_or_pass_its_quota(data):
    server = GPUServer("cpu", tenant_memory_limit=QUOTA, allow_any_op=True)
    a, b = RawTenant.local(server), RawTenant.local(server)
    weight = torch.linspace(-1, 1, W)
    private = torch.arange(W, dtype=torch.float32)
    wb = b.upload(weight, share=True)
    pb = b.upload(private)
    handles = {a.upload(weight, share=True): ("float32", W), a.upload(torch.ones(W)): ("float32", W)}

    for _ in range(data.draw(st.integers(1, 10), label="records")):
        kind = data.draw(st.sampled_from(["op", "op", "op", "execute", "upload", "parts", "free"]), label="kind")
        if kind == "parts":  # an upload in parts, its parts drawn in any order and size (often wrong)
            h = a.handle()
            n = data.draw(st.sampled_from([W, QUOTA // 8, QUOTA // 4, 2 * QUOTA]), label="part upload")
            share = data.draw(st.booleans(), label="part share")
            raw = (weight if n == W else torch.ones(n)).numpy().tobytes()  # n == W: B's weight's bytes
            if data.draw(st.booleans(), label="honest parts"):  # three parts in order: it completes
                cuts = [0, len(raw) // 3, 2 * len(raw) // 3, len(raw)]
                spans = list(zip(cuts, cuts[1:]))
            else:
                starts = [0, *data.draw(st.lists(st.integers(0, len(raw)), max_size=4), label="starts")]
                spans = [(x, data.draw(st.integers(x, len(raw)), label="end")) for x in starts]
            ops, payloads = [], []
            for start, end in spans:
                ops.append(P.UploadPart(h, "float32", (n,), start, len(payloads), share))
                payloads.append(raw[start:end])
            try:
                a.send(ops, payloads, sync=P.Barrier())
            except Refused:
                pass
            handles[h] = ("float32", n)  # bound only if its parts were right; using it otherwise is refused
            continue
        if kind == "upload":
            n = data.draw(st.sampled_from([1, W, QUOTA // 4, QUOTA]), label="upload")
            handles[a.upload(torch.ones(n), share=data.draw(st.booleans()))] = ("float32", n)
            _settle(a)
            continue
        if kind == "free":
            if handles:
                h = data.draw(st.sampled_from(sorted(handles)), label="free")
                a.send([P.Free([h])])
                handles.pop(h)
                _settle(a)
            continue
        name = data.draw(st.sampled_from(sorted(OPS)), label="op")
        nslots, build = OPS[name]
        chosen, specs = [], []
        for i in range(nslots):
            h = data.draw(st.sampled_from(sorted(handles)), label="slot") if handles else 1
            dt, numel = handles.get(h, ("float32", W))
            if data.draw(st.booleans(), label="honest geometry"):
                geom = ([numel], [1], 0)
            else:
                geom = (data.draw(_size), None, data.draw(_offset))
                geom = (geom[0], data.draw(st.lists(st.integers(0, 1 << 10), min_size=len(geom[0]),
                                                    max_size=len(geom[0]))), geom[2])
            chosen.append(h)
            specs.append((dt, *geom))
        args, kwargs = build([tensor(i, *s) for i, s in enumerate(specs)], data.draw)
        honest = _meta_outs(name, args, kwargs, specs)
        if honest is None or data.draw(st.booleans(), label="lie about outputs"):
            outs = data.draw(st.lists(st.tuples(st.just("float32"), st.tuples(_dim), st.just((1,)), st.just(0)),
                                      max_size=2), label="declared")
        else:
            outs = honest
        tid = a.define(name, args, kwargs, outs if kind == "op" else [])
        _settle(a)
        try:
            if kind == "execute":
                a.execute(tid, chosen)
            else:
                made = a.run(tid, chosen, len(outs))
                for h, o in zip(made, outs):
                    n = 1
                    for s in o[1]:
                        n *= s
                    handles[h] = (o[0], max(n, 1))
                a.check()
        except Refused:
            pass

    # B's data is untouched, by any path.
    assert torch.equal(b.fetch(wb, torch.float32, [W]), weight)
    assert torch.equal(b.fetch(pb, torch.float32, [W]), private)
    # A is within its quota by the books, and by the memory its tensors really hold.
    assert a.stats()["tenant_bytes"] <= QUOTA
    assert _distinct_private_bytes(server, a.welcome.tenant) <= QUOTA
    # The server still serves B.
    add = b.define("aten.add.Tensor", [tensor(0, "float32", [W]), tensor(1, "float32", [W])], {},
                   [("float32", (W,), (1,), 0)])
    (s,) = b.run(add, [wb, pb])
    assert torch.equal(b.fetch(s, torch.float32, [W]), weight + private)
    a.close()
    b.close()
