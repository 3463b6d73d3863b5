"""Attacks on the GPU server by a tenant that speaks the wire protocol directly (issue 11).

Each test first tries what a hostile client could send, then checks the invariants: the server refuses
it with a typed error to that tenant, other tenants' data is unchanged, quotas hold, the server serves on.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch

from caserve.remote.server import GPUServer
from caserve.remote.server.blobs import BlobStore
from remote_attacker import RawTenant, Refused, ServerProcess, device, dtype, idle_connections, scalar, tensor

N = 64  # elements of the attacked tensors


@pytest.fixture(params=[False, True], ids=["allow-list", "allow-any-op"])
def server(request):
    """Both op surfaces: the checks below must hold without the allow-list too."""
    return GPUServer("cpu", allow_any_op=request.param)


def _weight() -> torch.Tensor:
    return torch.arange(N, dtype=torch.float32) / 7


# -- reading and writing past a tensor ------------------------------------------------------------


def test_reshape_alias_past_the_end_reads_no_heap(server):
    t = RawTenant.local(server)
    x = t.upload(torch.ones(4))
    big = 1 << 16
    tid = t.define("aten._reshape_alias.default", [tensor(0, "float32", [4]), [big], [1]], {},
                   [("float32", (big,), (1,), 0)])
    (out,) = t.run(tid, [x])
    with pytest.raises(Refused):
        t.check()
    with pytest.raises(Refused):
        t.fetch(out, torch.float32, [big])
    assert t.fetch(x, torch.float32, [4]).tolist() == [1.0] * 4  # the tenant goes on


@pytest.mark.parametrize("name,args", [
    ("aten._reshape_alias.default", lambda: [tensor(0, "float32", [4]), [1 << 27], [1]]),
    ("aten.as_strided.default", lambda: [tensor(0, "float32", [4]), [1 << 27], [1], 0]),
    ("aten.view.default", lambda: [tensor(0, "float32", [4], [1 << 26], 0), [1 << 27]]),
])
def test_inplace_fill_through_an_oversized_view_does_not_crash_the_server(tmp_path, name, args):
    proc = ServerProcess(tmp_path, "--allow-any-op")
    try:
        victim = RawTenant.tcp(proc.address)
        w = victim.upload(_weight())
        t = RawTenant.tcp(proc.address)
        x = t.upload(torch.ones(4))
        tid = t.define(name, args(), {}, [("float32", (1 << 27,), (1,), 0)])
        (big,) = t.run(tid, [x])
        fill = t.define("aten.fill_.Scalar", [tensor(0, "float32", [1 << 27]), scalar(0, "float")], {}, [])
        t.run(fill, [big], 0, [3.0])
        with pytest.raises(Refused):
            t.check()
        assert proc.alive()
        assert torch.equal(victim.fetch(w, torch.float32, [N]), _weight())
        assert t.fetch(x, torch.float32, [4]).tolist() == [1.0] * 4
    finally:
        proc.stop()


# -- writing another tenant's shared weight --------------------------------------------------------


ALIASING = {
    "alias": ("aten.alias.default", lambda s: [s], "float32"),
    "detach": ("aten.detach.default", lambda s: [s], "float32"),
    "view": ("aten.view.default", lambda s: [s, [N]], "float32"),
    "as_strided": ("aten.as_strided.default", lambda s: [s, [N], [1], 0], "float32"),
    "view.dtype": ("aten.view.dtype", lambda s: [s, dtype("int32")], "int32"),
    "_reshape_alias": ("aten._reshape_alias.default", lambda s: [s, [N], [1]], "float32"),
    "_unsafe_view": ("aten._unsafe_view.default", lambda s: [s, [N]], "float32"),
}


@pytest.mark.parametrize("how", sorted(ALIASING))
def test_an_alias_of_a_shared_weight_cannot_be_written(server, how):
    a, b = RawTenant.local(server), RawTenant.local(server)
    wa = a.upload(_weight(), share=True)
    wb = b.upload(_weight(), share=True)
    assert server.stats()["shared_blobs"] == 1  # stored once
    name, args, out_dtype = ALIASING[how]
    alias_tid = b.define(name, args(tensor(0, "float32", [N])), {}, [(out_dtype, (N,), (1,), 0)])
    fill = b.define("aten.fill_.Scalar", [tensor(0, out_dtype, [N]), 5], {}, [])
    add = b.define("aten.add_.Tensor", [tensor(0, out_dtype, [N]), tensor(1, out_dtype, [N])], {}, [])
    (alias,) = b.run(alias_tid, [wb])
    b.run(fill, [alias], 0)
    b.run(add, [alias, alias], 0)
    with pytest.raises(Refused):
        b.check()
    assert torch.equal(a.fetch(wa, torch.float32, [N]), _weight())
    assert torch.equal(b.fetch(wb, torch.float32, [N]), _weight())


def test_an_alias_counts_no_new_bytes_and_keeps_its_base_alive(server):
    # aten.view.dtype is on the allow-list, so both servers (allow-list and allow-any-op) run this.
    t = RawTenant.local(server)
    x = t.upload(torch.arange(8.0))
    before = t.stats()["tenant_bytes"]
    tid = t.define("aten.view.dtype", [tensor(0, "float32", [8]), dtype("int32")], {}, [("int32", (8,), (1,), 0)])
    (alias,) = t.run(tid, [x])
    assert t.stats()["tenant_bytes"] == before
    t.send([__import__("caserve.remote.wire.protocol", fromlist=["Free"]).Free([x])])
    assert t.stats()["tenant_bytes"] == before  # the base's memory lives on through the alias
    assert torch.equal(t.fetch(alias, torch.int32, [8]), torch.arange(8.0).view(torch.int32))


def test_aten_alias_runs_only_with_allow_any_op(server):
    t = RawTenant.local(server)
    tid = t.define("aten.alias.default", [tensor(0, "float32", [8])], {}, [("float32", (8,), (1,), 0)])
    (alias,) = t.run(tid, [t.upload(torch.arange(8.0))])
    if server.allow_any_op:
        assert t.fetch(alias, torch.float32, [8]).tolist() == list(range(8))
    else:
        with pytest.raises(Refused, match="alias"):
            t.check()


# -- the server decides what an op does -------------------------------------------------------------


@pytest.mark.parametrize("dev", ["meta", "cpu", "cuda:3"])
def test_a_device_given_as_a_plain_string_is_refused(server, dev):
    t = RawTenant.local(server)
    tid = t.define("aten.ones.default", [[4]], {"dtype": dtype("float32"), "device": dev},
                   [("float32", (4,), (1,), 0)])
    t.run(tid, [])
    with pytest.raises(Refused, match="device"):
        t.check()


def test_declared_outputs_that_differ_from_the_op_are_refused_naming_it(server):
    t = RawTenant.local(server)
    x = t.upload(torch.ones(8))
    t.define("aten.add.Tensor", [tensor(0, "float32", [8]), tensor(1, "float32", [8])], {}, [("float32", (2,), (1,), 0)])
    with pytest.raises(Refused, match="aten.add.Tensor"):
        t.check()
    # Honest templates of the same op still work.
    tid = t.define("aten.add.Tensor", [tensor(0, "float32", [8]), tensor(1, "float32", [8])], {},
                   [("float32", (8,), (1,), 0)])
    (y,) = t.run(tid, [x, x])
    assert t.fetch(y, torch.float32, [8]).tolist() == [2.0] * 8


def test_quota_holds_for_execute_before_the_op_runs():
    server = GPUServer("cpu", tenant_memory_limit="1MiB")
    t = RawTenant.local(server)
    tid = t.define("aten.ones.default", [[1 << 40]], {"dtype": dtype("float32"), "device": device()}, [])
    with pytest.raises(Refused) as err:
        t.execute(tid, [])
    assert err.value.failure.code == "quota_exceeded"  # refused before allocating 4 TiB
    assert t.stats()["tenant_bytes"] == 0


def test_quota_holds_for_data_dependent_outputs_before_the_op_runs():
    """nonzero/masked_select/unique have no meta kernel: the tenant is charged their bound from the input
    sizes before the op runs, so even an input whose true result is empty cannot take it past its quota."""
    server = GPUServer("cpu", tenant_memory_limit="1MiB")
    t = RawTenant.local(server)
    zeros = t.upload(torch.zeros(200_000))  # 800 KB held; nonzero's bound: 200k indices x 8 bytes = 1.6 MB
    held = t.stats()["tenant_bytes"]
    tid = t.define("aten.nonzero.default", [tensor(0, "float32", [200_000])])
    with pytest.raises(Refused) as err:
        t.execute(tid, [zeros])
    assert err.value.failure.code == "quota_exceeded"
    assert t.stats()["tenant_bytes"] == held
    # Within the bound it runs, and what it returns is charged at its true size.
    x = t.upload(torch.tensor([0.0, 2.0, 0.0, 3.0]))
    tid = t.define("aten.nonzero.default", [tensor(0, "float32", [4])])
    value = t.execute(tid, [x])
    h, dt, size, _, _ = value["$t"]
    assert (dt, size) == ("int64", [2, 1])
    assert t.fetch(h, torch.int64, size).flatten().tolist() == [1, 3]
    # x[mask] on the 200k zeros: its bound (every element, 800 KB) would pass the limit; refused unrun.
    mask = t.upload(torch.zeros(200_000, dtype=torch.bool))
    held = t.stats()["tenant_bytes"]
    tid = t.define("aten.index.Tensor", [tensor(0, "float32", [200_000]), [tensor(1, "bool", [200_000])]])
    with pytest.raises(Refused) as err:
        t.execute(tid, [zeros, mask])
    assert err.value.failure.code == "quota_exceeded"
    assert t.stats()["tenant_bytes"] == held
    # The other bounded ops run (RawTenant numbers Execute outputs from its next handle: run them last).
    for name, args in [("aten.masked_select.default", [tensor(0, "float32", [4]), tensor(1, "bool", [4])]),
                       ("aten.index.Tensor", [tensor(0, "float32", [4]), [tensor(1, "bool", [4])]]),
                       ("aten._unique2.default", [tensor(0, "float32", [4]), True, True, True])]:
        tid = t.define(name, args)
        t.execute(tid, [x] if "unique" in name else [x, t.upload(torch.tensor([True, False, True, True]))])
    t.check()


def test_an_op_the_server_can_neither_meta_check_nor_bound_runs_only_with_allow_any_op():
    """With --allow-any-op the server accepts ops off the allow-list; one whose output sizes it can neither
    compute nor bound is charged after the call, before its outputs are bound (the documented trade-off)."""
    server = GPUServer("cpu", tenant_memory_limit="1MiB", allow_any_op=True)
    t = RawTenant.local(server)
    x = t.upload(torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0]))
    tid = t.define("aten.unique_consecutive.default", [tensor(0, "float32", [5])])
    value = t.execute(tid, [x])
    h = value[0]["$t"][0]
    assert t.fetch(h, torch.float32, [2]).tolist() == [1.0, 2.0]
    big = t.upload(torch.arange(100_000, dtype=torch.float32))  # unique values: 400 KB more, past the limit
    tid = t.define("aten.unique_consecutive.default", [tensor(0, "float32", [100_000]), False, True])
    held = t.stats()["tenant_bytes"]
    with pytest.raises(Refused) as err:
        t.execute(tid, [big])
    assert err.value.failure.code == "quota_exceeded"
    assert t.stats()["tenant_bytes"] == held
    # The same op on a server without --allow-any-op is refused when defined.
    t2 = RawTenant.local(GPUServer("cpu", tenant_memory_limit="1MiB"))
    t2.define("aten.unique_consecutive.default", [tensor(0, "float32", [5])])
    with pytest.raises(Refused) as err:
        t2.check()
    assert err.value.failure.code in ("denied_op", "bad_template")


def test_quota_holds_for_run_with_understated_or_missing_outputs():
    server = GPUServer("cpu", tenant_memory_limit="1MiB")
    t = RawTenant.local(server)
    # An honest declaration is charged before the op runs.
    tid = t.define("aten.ones.default", [[1 << 40]], {"dtype": dtype("float32"), "device": device()},
                   [("float32", (1 << 40,), (1,), 0)])
    t.run(tid, [])
    with pytest.raises(Refused) as err:
        t.check()
    assert err.value.failure.code == "quota_exceeded"
    # A template that declares no output (its result would be dropped) is charged just the same.
    tid = t.define("aten.ones.default", [[1 << 40]], {"dtype": dtype("float32"), "device": device()}, [])
    t.run(tid, [], 0)
    with pytest.raises(Refused) as err:
        t.check()
    assert err.value.failure.code in ("quota_exceeded", "bad_template")
    assert t.stats()["tenant_bytes"] == 0


def test_a_default_quota_is_a_share_of_the_device():
    assert GPUServer("cpu").memory_limit > 0
    assert GPUServer("cpu", tenant_memory_limit=0).memory_limit == 0  # explicitly unlimited


def test_an_out_argument_is_never_resized():
    server = GPUServer("cpu", allow_any_op=True)
    t = RawTenant.local(server)
    x = t.upload(torch.ones(1 << 10))
    small = t.upload(torch.zeros(1))
    t.define("aten.mul.out", [tensor(0, "float32", [1 << 10]), tensor(1, "float32", [1 << 10])],
             {"out": tensor(2, "float32", [1])}, [])
    with pytest.raises(Refused):
        t.check()
    assert t.fetch(small, torch.float32, [1]).tolist() == [0.0]


# -- side effects ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,args", [
    ("aten._print.default", lambda: ["INFO forged log line"]),
    ("aten._assert_async.msg", lambda: [tensor(0, "bool", []), "boom"]),
    ("aten._assert_async.default", lambda: [tensor(0, "bool", [])]),
    ("aten._assert_scalar.default", lambda: [0, "boom"]),
])
def test_side_effect_ops_are_refused_even_with_allow_any_op(name, args):
    for allow_any in (False, True):
        t = RawTenant.local(GPUServer("cpu", allow_any_op=allow_any))
        t.define(name, args(), {}, [])
        with pytest.raises(Refused) as err:
            t.check()
        assert err.value.failure.code == "denied_op"


def test_ops_off_the_allow_list_are_refused():
    t = RawTenant.local(GPUServer("cpu"))
    x = t.upload(torch.ones(4))
    t.define("aten.alias.default", [tensor(0, "float32", [4])], {}, [("float32", (4,), (1,), 0)])
    with pytest.raises(Refused) as err:
        t.check()
    assert err.value.failure.code == "denied_op"
    tid = t.define("aten.add.Tensor", [tensor(0, "float32", [4]), tensor(1, "float32", [4])], {},
                   [("float32", (4,), (1,), 0)])
    (y,) = t.run(tid, [x, x])
    assert t.fetch(y, torch.float32, [4]).tolist() == [2.0] * 4


# -- privacy between tenants ------------------------------------------------------------------------


def test_stats_describe_the_caller_only():
    server = GPUServer("cpu")
    a, b = RawTenant.local(server), RawTenant.local(server)
    b.upload(torch.ones(1000))
    stats = a.stats()
    assert stats["tenant"] == a.welcome.tenant
    assert "tenants" not in stats
    assert stats["tenant_bytes"] == 0


def test_an_admin_token_sees_every_tenant():
    server = GPUServer("cpu", token="user-token", admin_token="admin-token")
    a = RawTenant(__import__("caserve.remote.local", fromlist=["LocalChannel"]).LocalChannel(server), "user-token")
    admin = RawTenant(__import__("caserve.remote.local", fromlist=["LocalChannel"]).LocalChannel(server),
                      "admin-token")
    a.upload(torch.ones(1000))
    ids = {t["id"] for t in admin.stats()["tenants"]}
    assert a.welcome.tenant in ids
    assert "tenants" not in a.stats()


def test_weights_are_shared_only_within_a_trust_group():
    from caserve.remote.local import LocalChannel
    from caserve.remote.wire import protocol as P

    server = GPUServer("cpu", token=["group-one", "group-two"])
    a1 = RawTenant(LocalChannel(server), "group-one")
    a2 = RawTenant(LocalChannel(server), "group-one")
    b = RawTenant(LocalChannel(server), "group-two")
    w = _weight()
    digest = BlobStore.digest(memoryview(w.numpy().tobytes()))
    a1.upload(w, share=True)
    assert b.send([], sync=P.HasBlobs([digest]))[0] == [False]
    h = b.handle()
    b.send([P.BindBlob(h, digest)])
    with pytest.raises(Refused):
        b.check()
    assert a2.send([], sync=P.HasBlobs([digest]))[0] == [True]
    hb = b.upload(w, share=True)  # group two stores its own copy
    assert server.stats()["shared_blobs"] == 2
    assert torch.equal(b.fetch(hb, torch.float32, [N]), w)


# -- connections before authentication ---------------------------------------------------------------


def test_a_pre_auth_flood_does_not_deafen_the_listener(tmp_path):
    proc = ServerProcess(tmp_path, "--handshake-timeout", "1", nofile=128)
    host, port = proc.address.split(":")
    try:
        flood = idle_connections((host, int(port)), 300)
        assert len(flood) > 100
        time.sleep(2.5)  # past the handshake deadline: the server lets go of them
        deadline = time.monotonic() + 20
        while True:
            try:
                t = RawTenant.tcp(proc.address)
                t.channel.sock.settimeout(10)
                x = t.upload(torch.ones(4))
                assert t.fetch(x, torch.float32, [4]).tolist() == [1.0] * 4
                break
            except (OSError, ConnectionRefusedError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        for s in flood:
            s.close()
        assert proc.alive()
        assert "open files" in proc.log_text() or "connections" in proc.log_text()
    finally:
        proc.stop()


def test_a_stalled_handshake_is_closed_after_its_deadline(tmp_path):
    proc = ServerProcess(tmp_path, "--handshake-timeout", "0.5")
    host, port = proc.address.split(":")
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"\x10\x00")  # half a frame prefix, then nothing
        s.settimeout(5)
        start = time.monotonic()
        assert s.recv(1 << 16) is not None  # an ERROR frame, or the end of the stream
        while s.recv(1 << 16):
            pass
        assert time.monotonic() - start < 4
        s.close()
    finally:
        proc.stop()
