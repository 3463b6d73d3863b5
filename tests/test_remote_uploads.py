"""Uploads larger than a frame travel in parts (UploadPart): values, sharing, quotas, and a tenant that
sends the parts wrong."""

from __future__ import annotations

import pytest
import torch

import caserve.remote as R
from caserve.models import load_model
from caserve.remote.server import GPUServer, Listener
from remote_attacker import RawTenant, Refused
from caserve.remote.wire import protocol as P

MiB = 1 << 20


@pytest.fixture
def small_frames():
    """A server over TCP whose frames are at most 1 MiB: anything above 512 KiB goes in parts."""
    server = GPUServer("cpu", max_frame=MiB)
    listener = Listener(server, "127.0.0.1", 0, unix_socket=None).start()
    yield server, listener.address
    listener.stop()


def test_tensors_larger_than_a_frame_arrive_whole_and_weights_are_stored_once(small_frames):
    server, address = small_frames
    a = R.connect(address, transport="tcp")
    b = R.connect(address, transport="tcp")
    try:
        x = torch.randn(700_000)  # 2.8 MB: six parts
        frames = R.stats(a)["frames"]
        y = x.to(a)
        assert torch.equal(y.cpu(), x)
        assert R.stats(a)["frames"] - frames >= 6
        w = torch.nn.Parameter(torch.randn(600, 1000))  # a 2.4 MB weight, shared between the two tenants
        wa, wb = w.data.to(a), w.detach().to(b)
        wa = torch.nn.Parameter(w).to(a)
        wb = torch.nn.Parameter(w).to(b)
        assert torch.equal(wa.cpu(), w.detach()) and torch.equal(wb.cpu(), w.detach())
        assert R.server_stats(a)["shared_blobs"] == 1  # b found a's copy: stored once
        assert torch.equal((wb * 2).cpu(), w.detach() * 2)
    finally:
        R.disconnect(a)
        R.disconnect(b)


def test_a_model_whose_embedding_is_larger_than_a_frame_generates_as_natively(small_frames):
    _, address = small_frames
    lm = load_model("gpt2", shrink=True)  # vocab 50257 x 64 fp32: 12.9 MB of embedding
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.inference_mode():
        want = lm.model.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    dev = R.connect(address, transport="tcp")
    try:
        model = lm.model.to(dev)
        with torch.inference_mode():
            got = model.generate(ids.to(dev), max_new_tokens=5, do_sample=False,
                                 attention_mask=torch.ones_like(ids).to(dev))
        assert torch.equal(got.cpu(), want)
    finally:
        R.disconnect(dev)


def _part(h: int, start: int, size=(1000,), dtype="float32", share=False, payload=0) -> P.UploadPart:
    return P.UploadPart(h, dtype, size, start, payload, share)


def test_parts_sent_wrong_are_refused_and_leave_nothing_behind():
    server = GPUServer("cpu", tenant_memory_limit="1MiB")
    t = RawTenant.local(server)
    other = RawTenant.local(server)
    kept = other.upload(torch.arange(10, dtype=torch.float32))
    chunk = bytes(400)  # 100 float32 of a 1000-element (4000-byte) tensor
    cases = [
        ([_part(1, 400)], [chunk]),  # no first part
        ([_part(2, 0), _part(2, 800)], [chunk]),  # a gap
        ([_part(3, 0), _part(3, 400, dtype="int32")], [chunk]),  # another dtype than the first part
        ([_part(4, 0), _part(4, 400, share=True)], [chunk]),  # another share flag
        ([_part(5, 0, size=(10,))], [chunk]),  # more bytes than the tensor holds
        ([_part(6, 0, size=(1 << 20,))], [chunk]),  # 4 MiB: past the 1 MiB quota, refused at the first part
        ([_part(7, 0, size=(-1,))], [chunk]),  # a bad geometry
        ([_part(8, 0), _part(8, 0)], [chunk]),  # the same upload begun twice
    ]
    for ops, payloads in cases:
        with pytest.raises(Refused):
            t.send(ops, payloads, sync=P.Barrier())
    # A part sent wrong ends its upload: nothing is left charged or bound.
    assert t.stats()["tenant_bytes"] == 0 and t.stats()["tenant_storages"] == 0
    t.send([_part(9, 0)], [chunk], sync=P.Barrier())
    assert t.stats()["tenant_bytes"] == 4000  # charged in full from the first part
    t.send([P.Free([9])], sync=P.Barrier())  # Free abandons an incomplete upload
    assert t.stats()["tenant_bytes"] == 0
    # Too many incomplete at once.
    t.send([_part(100 + i, 0) for i in range(P.LIMITS.max_partial_uploads)], [chunk], sync=P.Barrier())
    with pytest.raises(Refused) as err:
        t.send([_part(200, 0)], [chunk], sync=P.Barrier())
    assert err.value.failure.code == "limit"
    assert t.stats()["tenant_bytes"] == P.LIMITS.max_partial_uploads * 4000  # charged while incomplete
    t.close()
    assert other.stats()["tenant_bytes"] == 40
    # The other tenant is untouched and the server serves on.
    assert other.fetch(kept, torch.float32, [10]).tolist() == list(map(float, range(10)))


def test_an_upload_in_parts_completes_in_order_and_is_charged_once():
    server = GPUServer("cpu", tenant_memory_limit="1MiB")
    t = RawTenant.local(server)
    data = torch.arange(1000, dtype=torch.float32)
    raw = data.numpy().tobytes()
    t.send([_part(1, 0), _part(1, 1600, payload=1)], [raw[:1600], raw[1600:3200]], sync=P.Barrier())
    assert t.stats()["tenant_bytes"] == 4000 and t.stats()["tenant_storages"] == 0  # not usable yet
    t.send([_part(1, 3200)], [raw[3200:]], sync=P.Barrier())
    assert t.stats()["tenant_bytes"] == 4000 and t.stats()["tenant_storages"] == 1
    assert torch.equal(t.fetch(1, torch.float32, [1000]), data)
    with pytest.raises(Refused):  # complete: no further part
        t.send([_part(1, 4000)], [raw[:4]], sync=P.Barrier())
