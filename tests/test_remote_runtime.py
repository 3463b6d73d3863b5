"""Remote runtime behaviour: sync points, errors, tenants, shared weights, quotas, authentication."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import transformers

import caserve.remote as R
from caserve.remote.wire import protocol as P
from caserve.remote.server import GPUServer
from caserve.remote.client.session import session_of


@pytest.fixture
def local_dev():
    """A device on an in-process server: same frames, no socket."""
    server = GPUServer("cpu")
    dev = R.connect(server=server)
    yield dev, server
    R.disconnect(dev)


def test_views_never_cross_the_wire(local_dev):
    dev, _ = local_dev
    x = torch.arange(24.0).reshape(4, 6).to(dev)
    session = session_of(dev)
    session.flush()
    before = session.stats.records
    y = x.view(6, 4).transpose(0, 1)[1:3].unsqueeze(0).expand(2, 2, 6)
    session.flush()
    assert session.stats.records == before  # no record sent for five view ops
    torch.testing.assert_close(y.cpu(), torch.arange(24.0).reshape(4, 6).view(6, 4).transpose(0, 1)[1:3].unsqueeze(0).expand(2, 2, 6))


def test_ops_stream_until_a_sync_point(local_dev):
    dev, _ = local_dev
    session = session_of(dev)
    x = torch.ones(8, device=dev)
    syncs = session.stats.syncs
    for _ in range(10):
        x = x * 2 + 1
    assert session.stats.syncs == syncs  # nothing waited
    assert x.sum().item() == 8 * (2**10 * 2 - 1)
    assert session.stats.syncs == syncs + 1  # .item() is one round trip


def test_inplace_views_and_factories(local_dev):
    dev, _ = local_dev
    a = torch.zeros(3, 4, device=dev)
    a[1].fill_(5)
    a[:, 2] += torch.tensor([1.0, 2.0, 3.0], device=dev)
    want = torch.zeros(3, 4)
    want[1].fill_(5)
    want[:, 2] += torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(a.cpu(), want)
    assert torch.equal(torch.tril_indices(3, 3, device=dev).cpu(), torch.tril_indices(3, 3))
    assert torch.equal(torch.arange(2, 11, 3, device=dev).cpu(), torch.arange(2, 11, 3))
    assert torch.full((2,), 7, device=dev).tolist() == [7, 7]
    assert bool((a > 4).any())


def test_data_dependent_shapes(local_dev):
    dev, _ = local_dev
    x = torch.tensor([0, 3, 0, 5, 1]).to(dev)
    assert torch.nonzero(x).flatten().tolist() == [1, 3, 4]
    assert x[x > 2].tolist() == [3, 5]
    assert torch.unique(x).tolist() == [0, 1, 3, 5]


def test_failing_op_raises_at_sync_with_op_name_and_client_stays_usable(local_dev):
    dev, _ = local_dev
    session = session_of(dev)
    a = torch.ones(2, 3, device=dev)
    # Forge a template the server cannot run: the client raises nothing yet (ops stream) ...
    session.emit(P.DefineOp(999_999, "aten.mm.default", [P.TensorSlot(0, "float32", (2, 3,), (3, 1,), 0),
                                                          P.TensorSlot(1, "float32", (2, 3,), (3, 1,), 0)], {},
                            [("float32", (2, 3), (3, 1), 0)]))
    session.emit(P.Run(999_999, [a._st.handle, a._st.handle], [session.new_handle()]))
    with pytest.raises(R.RemoteOpError, match="aten.mm.default"):
        a.sum().item()
    assert (a * 3).sum().item() == 18.0  # ... and the next sync works


def test_fetch_later_answers_in_order_while_later_ops_stream(local_dev):
    dev, _ = local_dev
    session = session_of(dev)
    x = torch.arange(4.0).to(dev)
    waits = []
    for k in range(3):
        x = x + 1
        waits.append(R.fetch_later(x))  # sent now; nothing waited for
    assert len(session.pending) == 3
    assert (x * 10).sum().item() == 10 * (3 + 4 + 5 + 6)  # a sync reads the earlier replies first
    assert not session.pending
    assert [w().tolist() for w in reversed(waits)] == [[3.0, 4.0, 5.0, 6.0], [2.0, 3.0, 4.0, 5.0],
                                                       [1.0, 2.0, 3.0, 4.0]]


def test_fetch_later_raises_a_failure_before_it_and_the_session_goes_on(local_dev):
    dev, _ = local_dev
    session = session_of(dev)
    a = torch.ones(2, 3, device=dev)
    first = R.fetch_later(a)
    session.emit(P.DefineOp(999_998, "aten.mm.default", [P.TensorSlot(0, "float32", (2, 3,), (3, 1,), 0),
                                                          P.TensorSlot(1, "float32", (2, 3,), (3, 1,), 0)], {},
                            [("float32", (2, 3), (3, 1), 0)]))
    session.emit(P.Run(999_998, [a._st.handle, a._st.handle], [session.new_handle()]))
    second = R.fetch_later(a * 2)
    assert first().tolist() == [[1.0] * 3] * 2  # its reply came before the failing op ran
    with pytest.raises(R.RemoteOpError, match="aten.mm.default"):
        second()
    assert (a * 3).sum().item() == 18.0


@pytest.mark.parametrize("bad", [
    P.DefineOp(77, "aten.from_file.default", ["/etc/passwd"], {}, []),
    P.DefineOp(76, "aten.resize_.default", [P.TensorSlot(0, "float32", (4,), (1,), 0), P.ArgList([1 << 40])], {}, []),
    P.DefineOp(78, "os.system.default", ["true"], {}, []),
    P.DefineOp(79, "aten.add.Tensor", [P.TensorSlot(0, "float32", (1000,), (1,), 0), 1], {}, [("float32", (1000,), (1,), 0)]),
    P.Run(123456, [1], [2]),
    P.Free([10**12]),
    P.Alloc(1, "float32", (4,), (1,)),  # handle 1 already exists
])
def test_server_rejects_bad_records(local_dev, bad):
    dev, _ = local_dev
    session = session_of(dev)
    x = torch.ones(4, device=dev) + 1
    session.emit(bad)
    if isinstance(bad, P.DefineOp) and bad.tid == 79:
        session.emit(P.Run(79, [x._st.handle], [session.new_handle()]))  # view past its storage
    if isinstance(bad, P.Free):
        assert x.sum().item() == 8.0  # freeing an unknown handle is a no-op
        return
    with pytest.raises(R.RemoteOpError):
        x.sum().item()
    assert x.sum().item() == 8.0


def test_shared_weights_stored_once_and_copy_on_write(gpu_server):
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1024)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    devs = [R.connect(gpu_server.address, token=gpu_server.token) for _ in range(4)]
    admin = R.connect(gpu_server.address, token=gpu_server.admin_token)  # server-wide figures
    try:
        replicas = []
        for i, dev in enumerate(devs):
            torch.manual_seed(0)
            replicas.append(transformers.GPT2LMHeadModel(config).eval().to(dev))
            stats = R.server_stats(admin)
            if i == 0:
                one = stats["stored_bytes"]
        four = R.server_stats(admin)["stored_bytes"]
        assert one > 1_000_000
        assert four <= 1.1 * one, (one, four)
        # An in-place write to a shared weight gives that tenant a private copy; the others keep theirs.
        with torch.no_grad():
            replicas[0].transformer.wte.weight.mul_(0)
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            want = model(ids).logits
            assert torch.allclose(replicas[1](ids.to(devs[1])).logits.cpu(), want, atol=1e-5)
            assert replicas[0].transformer.wte.weight.abs().sum().item() == 0
    finally:
        for dev in [*devs, admin]:
            R.disconnect(dev)


def test_four_concurrent_tenants(gpu_server):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256)
    torch.manual_seed(0)
    local = transformers.GPT2LMHeadModel(config).eval()
    ids = [torch.randint(0, 256, (1, 5 + i), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        want = [local.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0) for x in ids]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def tenant(i: int) -> None:
        try:
            dev = R.connect(gpu_server.address, token=gpu_server.token)
            model = copy.deepcopy(local).to(dev)  # the global RNG is no place for threads to build models
            with torch.no_grad():
                got[i] = model.generate(ids[i].to(dev), max_new_tokens=10, do_sample=False, pad_token_id=0).cpu()
            R.disconnect(dev)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=tenant, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(4):
        assert torch.equal(got[i], want[i])


def test_quota_exceeded_is_clear_and_other_tenants_unaffected(make_gpu_server):
    server = make_gpu_server(limit="1MiB")
    small = R.connect(server.address)
    big = R.connect(server.address)
    x = torch.ones(1000, device=small) * 2
    y = torch.zeros(300_000, device=big) + 1  # 1.2 MB > 1 MiB
    with pytest.raises(R.QuotaExceeded, match="limit"):
        y.sum().item()
    assert x.sum().item() == 2000.0  # the other tenant runs on
    assert (torch.ones(1000, device=big) + 1).sum().item() == 2000.0  # and the offender recovers
    R.disconnect(small)
    R.disconnect(big)


def test_authentication(make_gpu_server):
    server = make_gpu_server(token="s3cret-token")
    with pytest.raises(R.HandshakeError, match="wrong token"):
        R.connect(server.address, token="not-the-token")
    with pytest.raises(R.HandshakeError, match="requires a token"):
        R.connect(server.address, token="")
    dev = R.connect(server.address, token="s3cret-token", transport="tcp")
    assert (torch.ones(3, device=dev) * 2).tolist() == [2.0, 2.0, 2.0]
    R.disconnect(dev)


def test_server_without_token_refuses_non_loopback():
    from caserve.remote.server.connection import Connection

    server = GPUServer("cpu")
    conn = Connection(server, "10.0.0.5:4444", loopback=False)
    with pytest.raises(Exception, match="loopback"):
        conn.on_frame(P.Kind.HELLO, P.Hello(P.PROTOCOL_VERSION), [])
    from caserve.remote.server import Listener

    with pytest.raises(ValueError, match="without a token"):
        Listener(server, host="0.0.0.0", port=0)


def test_connection_lost_is_fatal_and_typed(make_gpu_server):
    server = make_gpu_server()
    dev = R.connect(server.address)
    x = torch.ones(4, device=dev)
    assert x.sum().item() == 4.0
    server.stop()
    with pytest.raises(R.ConnectionLost):
        (x + 1).sum().item()
    with pytest.raises(R.ConnectionLost):
        (x + 1).sum().item()


def test_200_cycles_leave_server_memory_at_baseline(make_gpu_server):
    server = make_gpu_server()
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[1, 2, 3, 4]])

    def cycle() -> None:
        dev = R.connect(server.address)
        m = model.to(dev)
        with torch.no_grad():
            m.generate(ids.to(dev), max_new_tokens=2, do_sample=False, pad_token_id=0)
        m.to("cpu")
        R.disconnect(dev)

    for _ in range(20):
        cycle()
    probe = R.connect(server.address)
    baseline_rss = server.rss_bytes()
    R.disconnect(probe)
    for _ in range(200):
        cycle()
    probe = R.connect(server.address, token=server.admin_token)
    deadline = time.monotonic() + 30
    while True:  # the server ends a tenant when its thread sees the connection close: on a busy machine,
        stats = R.server_stats(probe)  # the last cycle's may still be going when the probe asks
        if [t["id"] for t in stats["tenants"]] == [stats["tenant"]] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    R.disconnect(probe)
    assert stats["shared_blobs"] == 0 and stats["shared_bytes"] == 0
    assert [t["id"] for t in stats["tenants"]] == [stats["tenant"]]  # only the probe is left
    assert stats["tenant_bytes"] == 0
    assert server.rss_bytes() - baseline_rss < 32 * 1024**2


def test_upload_snapshots_the_callers_tensor(local_dev):
    dev, _ = local_dev
    host = torch.arange(6.0)
    remote = host.to(dev)
    strided = torch.arange(12.0).reshape(3, 4).t().to(dev)  # non-contiguous source
    host.fill_(-1)  # after .to() returned, before any flush: the device copy must not change
    assert remote.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert torch.equal(strided.cpu(), torch.arange(12.0).reshape(3, 4).t())
    half = torch.ones(2, 3, device=dev, dtype=torch.float16)
    half.copy_(torch.full((3,), 2.5))  # broadcast and dtype conversion on upload
    assert half.cpu().tolist() == [[2.5] * 3] * 2


def test_scalar_values_travel_with_the_call_not_the_template(local_dev):
    """Ops that differ only in a shape-neutral number share one template; their results stay exact."""
    dev, _ = local_dev
    session = session_of(dev)
    x = torch.arange(4.0).to(dev)
    outs = [(x * float(k) + k).tolist() for k in range(6)]
    assert outs == [[i * k + k for i in range(4)] for k in range(6)]
    misses = session.stats.meta_misses
    assert [(x * float(k) + k).tolist()[1] for k in range(6, 12)] == [2.0 * k for k in range(6, 12)]
    assert session.stats.meta_misses == misses  # no new plan for new values
    y = torch.zeros(3, dtype=torch.int64, device=dev)
    y.fill_(7)
    assert y.tolist() == [7, 7, 7] and (y + True).dtype == torch.int64 and (y * 0.5).dtype == torch.float32
    assert torch.arange(3, device=dev).tolist() == [0, 1, 2] and torch.arange(5, device=dev).tolist() == list(range(5))
