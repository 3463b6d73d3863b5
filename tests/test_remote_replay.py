"""Graph replays on the server's Tenant, driven in-process with protocol records (no client, no socket)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from caserve.remote.wire import protocol as P
from caserve.remote.server.blobs import BlobStore
from caserve.remote.server.executor import Tenant
from caserve.remote.server.opsurface import OpSurface


def t(slot: int, size: tuple[int, ...], stride: tuple[int, ...] | None = None, offset: int = 0,
      dtype: str = "float32") -> dict:
    """A DefineOp tensor slot (contiguous unless ``stride`` says otherwise)."""
    if stride is None:
        stride = tuple(torch.empty(size, device="meta").stride())
    return P.TensorSlot(slot, dtype, tuple(size), tuple(stride), offset)


def out(size: tuple[int, ...], dtype: str = "float32") -> tuple:
    return (dtype, size, tuple(torch.empty(size, device="meta").stride()), 0)


ADD, MUL_S, ADD_, MM, INDEX, RAND, SUM, LN = range(1, 9)
TEMPLATES = [
    P.DefineOp(ADD, "aten.add.Tensor", [t(0, (4,)), t(1, (4,))], {}, [out((4,))]),
    P.DefineOp(MUL_S, "aten.mul.Tensor", [t(0, (4,)), P.ScalarSlot(0, "float")], {}, [out((4,))]),
    P.DefineOp(ADD_, "aten.add_.Tensor", [t(0, (4,)), t(1, (4,))], {}, []),
    # a transposed view of a 2x2 storage times the storage itself
    P.DefineOp(MM, "aten.mm.default", [t(0, (2, 2), (1, 2)), t(1, (2, 2))], {}, [out((2, 2))]),
    P.DefineOp(INDEX, "aten.index_select.default", [t(0, (4,)), 0, t(1, (2,), dtype="int64")], {}, [out((2,))]),
    P.DefineOp(RAND, "aten.rand.generator", [P.ArgList([4])], {"dtype": P.DTypeArg("float32"), "device": P.DeviceArg(0)},
               [out((4,))]),
    P.DefineOp(SUM, "aten.sum.default", [t(0, (4,))], {}, [out(())]),
    # three fresh outputs and a float constant (ATen's parser imports while checking it)
    P.DefineOp(LN, "aten.native_layer_norm.default", [t(0, (1, 4)), P.ArgList([4]), None, None, 1e-5], {},
               [out((1, 4)), out((1, 1)), out((1, 1))]),
]


class Rig:
    """A tenant with its templates defined, and helpers to upload and read storages."""

    def __init__(self, memory_limit: int = 0) -> None:
        # Replay mechanics on hand-written templates: any ATen op (the allow-list is tested elsewhere).
        self.tenant = Tenant(1, torch.device("cpu"), BlobStore(), memory_limit, OpSurface(allow_any=True))
        self.next = 1000
        self.run(*TEMPLATES)

    def run(self, *ops: Any, payloads: list[memoryview] | None = None) -> P.RemoteFailure | None:
        with torch.inference_mode():
            self.tenant.run_ops(list(ops), payloads or [])
        return self.tenant.take_error()

    def upload(self, values: torch.Tensor, share: bool = False) -> int:
        self.next += 1
        data = memoryview(bytearray(values.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()))
        dtype = str(values.dtype).removeprefix("torch.")
        assert self.run(P.Upload(self.next, dtype, tuple(values.shape), 0, share), payloads=[data]) is None
        return self.next

    def get(self, handle: int) -> torch.Tensor:
        return self.tenant.storages[handle].tensor.clone()


@pytest.fixture
def rig() -> Rig:
    return Rig()


# x -> a = x + y; b = a * k; c = b + x; z += x (a write to an external)
GRAPH = P.DefineGraph(1, [P.Run(ADD, [-1, -2], [0]), P.Run(MUL_S, [0], [1]), P.Run(ADD, [1, -1], [2]),
                          P.Run(ADD_, [-3, -1], [])])


def inputs(rig: Rig) -> tuple[int, int, int]:
    return (rig.upload(torch.tensor([1.0, 2.0, 3.0, 4.0])), rig.upload(torch.tensor([0.5, 0.5, 0.5, 0.5])),
            rig.upload(torch.zeros(4)))


def test_replay_matches_the_same_records_run_eagerly(rig):
    x, y, z = inputs(rig)
    assert rig.run(P.Run(ADD, [x, y], [10]), P.Run(MUL_S, [10], [11], [3.0]), P.Run(ADD, [11, x], [12]),
                   P.Run(ADD_, [z, x], [])) is None
    want = [rig.get(h) for h in (10, 11, 12, z)]
    assert rig.run(GRAPH, P.Replay(1, 100, [x, y, z], 0, [3.0])) is None
    assert [torch.equal(rig.get(h), w) for h, w in zip((100, 101, 102), want)] == [True] * 3
    assert rig.get(z).tolist() == [2.0, 4.0, 6.0, 8.0]  # the eager add_ and the replayed one
    assert {100, 101, 102} <= set(rig.tenant.storages)  # keep=None: every handle the graph makes is bound
    assert rig.tenant.graphs[1].run is not None  # it ran compiled


def test_a_graph_with_a_shared_upload_runs_record_by_record(rig):
    x = rig.upload(torch.ones(4))
    data = memoryview(bytearray(torch.full((4,), 2.0).numpy().tobytes()))
    assert rig.run(P.DefineGraph(6, [P.Upload(0, "float32", (4,), 0, True), P.Run(ADD, [0, -1], [1])])) is None
    assert rig.tenant.graphs[6].run is None
    handles, before = set(rig.tenant.storages), rig.tenant.bytes
    assert rig.run(P.Replay(6, 100, [x], 0, keep=[1]), payloads=[data]) is None
    assert set(rig.tenant.storages) - handles == {101} and rig.get(101).tolist() == [3.0] * 4
    assert rig.tenant.bytes == before + 16 and len(rig.tenant.blobs) == 0  # the shared upload was let go
    assert rig.run(P.Replay(6, 200, [x], 0), payloads=[data]) is None
    assert rig.tenant.storages[200].blob is not None and rig.get(201).tolist() == [3.0] * 4


def test_multi_output_ops_with_float_constants_eagerly_and_replayed(rig):
    x = rig.upload(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    want = torch.ops.aten.native_layer_norm.default(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), [4], None, None, 1e-5)
    assert rig.run(P.Run(LN, [x], [10, 11, 12]), P.DefineGraph(7, [P.Run(LN, [-1], [0, 1, 2])])) is None
    assert rig.run(P.Replay(7, 100, [x], 0, keep=[0, 2])) is None
    for h in (10, 11, 12):
        assert torch.allclose(rig.get(h), want[h - 10])
    assert torch.allclose(rig.get(100), want[0]) and torch.allclose(rig.get(102), want[2])
    assert 101 not in rig.tenant.storages


def test_eager_runs_check_their_records(rig):
    x, y, _ = inputs(rig)
    w = rig.upload(torch.ones(4), share=True)
    cases = [
        (P.Run(ADD, [x], [10]), "aten.add.Tensor: expected 2 inputs and 1 outputs"),
        (P.Run(MUL_S, [x], [10], [2]), "expected scalars of types ['float']"),
        (P.Run(ADD, [x, y], [10], [1.0]), "expected scalars of types []"),
        (P.Run(ADD_, [w, x], []), f"writes to storage {w}, a shared read-only weight"),
        (P.Run(ADD, [x, 12345], [10]), "unknown storage handle 12345"),
        (P.Run(ADD, [x, y], [y]), f"storage handle {y} is invalid or already in use"),
        (P.Run(99, [x, y], [10]), "unknown op template 99"),
    ]
    for run, message in cases:
        err = rig.run(run)
        assert err is not None and message in err.message, (message, err)
        assert 10 not in rig.tenant.storages
    assert rig.get(w).tolist() == [1.0] * 4
    assert rig.run(P.Run(MUL_S, [x], [10], [2.0])) is None and rig.get(10).tolist() == [2.0, 4.0, 6.0, 8.0]


def test_keep_binds_only_the_kept_handles_and_memory_returns(rig):
    x, y, z = inputs(rig)
    assert rig.run(GRAPH) is None
    before, handles = rig.tenant.bytes, set(rig.tenant.storages)
    assert rig.run(P.Replay(1, 100, [x, y, z], 0, [2.0], keep=[2])) is None
    assert set(rig.tenant.storages) - handles == {102}
    assert rig.tenant.bytes == before + 4 * 4  # only the kept output stays charged
    assert rig.get(102).tolist() == [4.0, 7.0, 10.0, 13.0]
    assert rig.run(P.Replay(1, 200, [x, y, z], 0, [2.0], keep=[])) is None
    assert set(rig.tenant.storages) - handles == {102}
    rig.run(P.Free([102]))
    assert rig.tenant.bytes == before


@pytest.mark.parametrize("keep", [[3], [-1], [0, 0], [True]])
def test_keep_refs_must_be_handles_the_graph_makes_once(rig, keep):
    x, y, z = inputs(rig)
    assert rig.run(GRAPH) is None
    before, handles, zval = rig.tenant.bytes, set(rig.tenant.storages), rig.get(z)
    err = rig.run(P.Replay(1, 100, [x, y, z], 0, [2.0], keep=keep))
    assert err is not None and err.op == "Replay" and "keeps reference" in err.message
    assert set(rig.tenant.storages) == handles and rig.tenant.bytes == before
    assert torch.equal(rig.get(z), zval)  # nothing ran


@pytest.mark.parametrize("keep", [None, [2]])
def test_unknown_external_handle_is_reported_with_the_op_name(rig, keep):
    x, y, z = inputs(rig)
    assert rig.run(GRAPH) is None
    handles = set(rig.tenant.storages)
    err = rig.run(P.Replay(1, 100, [x, 999, z], 0, [2.0], keep=keep))
    assert err is not None and err.op == "aten.add.Tensor" and "unknown storage handle 999" in err.message
    if keep is not None:
        assert set(rig.tenant.storages) == handles  # nothing a failed keep-replay made stays bound
    err = rig.run(P.Replay(1, 200, [x, y], 0, [2.0], keep=keep))  # one external short
    assert err is not None and err.op == "aten.add_.Tensor" and "needs external handle 2" in err.message


def test_external_of_another_dtype_or_too_small_is_refused(rig):
    x, y, z = inputs(rig)
    ints, small = rig.upload(torch.arange(4)), rig.upload(torch.ones(2))
    assert rig.run(GRAPH) is None
    handles, before = set(rig.tenant.storages), rig.tenant.bytes
    err = rig.run(P.Replay(1, 100, [x, ints, z], 0, [2.0], keep=[2]))
    assert err is not None and err.op == "aten.add.Tensor" and "holds torch.int64" in err.message
    err = rig.run(P.Replay(1, 100, [x, small, z], 0, [2.0], keep=[2]))
    assert err is not None and err.op == "aten.add.Tensor" and "reaches past" in err.message
    assert set(rig.tenant.storages) == handles and rig.tenant.bytes == before


def test_a_graph_cannot_write_to_a_shared_weight(rig):
    x, y, _ = inputs(rig)
    w = rig.upload(torch.tensor([9.0, 9.0, 9.0, 9.0]), share=True)
    assert rig.tenant.storages[w].blob is not None
    assert rig.run(GRAPH) is None
    err = rig.run(P.Replay(1, 100, [x, y, w], 0, [2.0], keep=[2]))
    assert err is not None and err.op == "aten.add_.Tensor" and "shared read-only weight" in err.message
    assert rig.get(w).tolist() == [9.0] * 4


def test_a_failing_op_inside_a_graph_is_reported_by_name(rig):
    x, _, _ = inputs(rig)
    bad = rig.upload(torch.tensor([0, 7]))  # index 7 of a 4-element tensor
    good = rig.upload(torch.tensor([3, 0]))
    graph = P.DefineGraph(2, [P.Run(INDEX, [-1, -2], [0]), P.Run(ADD, [-1, -1], [1])])
    assert rig.run(graph) is None
    assert rig.run(P.Replay(2, 100, [x, good], 0)) is None
    assert rig.get(100).tolist() == [4.0, 1.0]
    err = rig.run(P.Replay(2, 200, [x, bad], 0))
    assert err is not None and err.op == "aten.index_select.default" and err.code == "op_failed"
    # As record by record: what does not depend on the failed op still ran and is bound.
    assert 200 not in rig.tenant.storages and rig.get(201).tolist() == [2.0, 4.0, 6.0, 8.0]
    handles = set(rig.tenant.storages)
    err = rig.run(P.Replay(2, 300, [x, bad], 0, keep=[1]))
    assert err is not None and err.op == "aten.index_select.default"
    assert set(rig.tenant.storages) - handles == {301}  # the kept output that could be made, nothing else


def test_graph_references_are_checked_when_defined(rig):
    cases = [
        (P.DefineGraph(3, [P.Run(ADD, [0, -1], [1])]), "before a step makes it"),
        (P.DefineGraph(3, [P.Run(ADD, [-1, -1], [0]), P.Run(ADD, [-1, -1], [0])]), "made twice"),
        (P.DefineGraph(3, [P.Run(ADD, [-1, -1], [-2])]), "made values are >= 0"),
        (P.DefineGraph(3, [P.Run(77, [-1, -1], [0])]), "unknown op template 77"),
        (P.DefineGraph(3, [P.Run(ADD, [-1], [0])]), "takes 2 inputs"),
        (P.DefineGraph(3, [P.Run(INDEX, [-1, -2], [0]), P.Run(ADD, [0, 0], [1])]), "past the 2 elements"),
        (P.DefineGraph(3, [P.Run(ADD, [-1, -1], [0]), P.Run(INDEX, [-2, 0], [1])]), "as torch.int64"),
    ]
    for graph, message in cases:
        err = rig.run(graph)
        assert err is not None and err.op == "DefineGraph" and message in err.message, (message, err)
        assert 3 not in rig.tenant.graphs
    err = rig.run(P.Replay(3, 100, [], 0))
    assert err is not None and "unknown graph 3" in err.message


def test_scalars_must_fit_the_graph(rig):
    x, y, z = inputs(rig)
    assert rig.run(GRAPH) is None
    err = rig.run(P.Replay(1, 100, [x, y, z], 0, [2.0, 1.0]))
    assert err is not None and "takes 1 scalars" in err.message
    err = rig.run(P.Replay(1, 200, [x, y, z], 0, [2]))  # an int where the template says float
    assert err is not None and err.op == "aten.mul.Tensor" and "expected scalars" in err.message


def test_views_allocs_uploads_and_copies_inside_a_graph(rig):
    m = rig.upload(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    x = rig.upload(torch.zeros(4))
    payloads = [memoryview(bytearray(torch.tensor([1.0, 1.0, 2.0, 2.0]).numpy().tobytes())),
                memoryview(bytearray(torch.tensor([5.0, 6.0]).numpy().tobytes()))]
    graph = P.DefineGraph(4, [
        P.Run(MM, [-1, -1], [0]),  # m.T @ m
        P.Alloc(1, "float32", (4,), (1,)),
        P.Upload(2, "float32", (4,), 0, False),
        P.CopyIn(1, "float32", (4,), (1,), 0, "float32", (4,), 0),  # the alloc gets the uploaded bytes
        P.CopyIn(-2, "float32", (2,), (2,), 1, "float32", (2,), 1),  # x[1::2] = [5, 6]
        P.Run(ADD, [1, 2], [3]),
        P.Run(ADD, [0, -2], [4]),  # the mm result seen as a flat 4-vector (same storage)
    ])
    assert rig.run(graph) is None
    mm = torch.tensor([[1.0, 3.0], [2.0, 4.0]]) @ torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for base, keep in ((100, None), (200, [3, 4])):
        assert rig.run(P.Replay(4, base, [m, x], 0, keep=keep), payloads=payloads) is None
        assert rig.get(base + 3).tolist() == [2.0, 2.0, 4.0, 4.0]
        assert torch.equal(rig.get(base + 4).view(2, 2), mm + torch.tensor([[0.0, 5.0], [0.0, 6.0]]))
        assert torch.equal(rig.get(base), mm) if keep is None else base not in rig.tenant.storages
    assert rig.get(x).tolist() == [0.0, 5.0, 0.0, 6.0]
    err = rig.run(P.Replay(4, 300, [m, x], 0, keep=[3]), payloads=payloads[:1])
    assert err is not None and err.op == "CopyIn" and "payload segment 1" in err.message


def test_random_ops_in_a_graph_draw_from_the_tenant_generator(rig):
    graph = P.DefineGraph(5, [P.Run(RAND, [], [0]), P.Run(SUM, [0], [1])])
    assert rig.run(graph, P.Seed(3), P.Run(RAND, [], [10]), P.Run(RAND, [], [11])) is None
    assert rig.run(P.Seed(3), P.Replay(5, 100, [], 0), P.Replay(5, 200, [], 0, keep=[0])) is None
    assert torch.equal(rig.get(100), rig.get(10)) and torch.equal(rig.get(200), rig.get(11))
    assert rig.get(101).item() == pytest.approx(rig.get(10).sum().item())


def test_a_keep_replay_needs_room_for_what_it_holds_at_once():
    rig = Rig(memory_limit=10_000)
    x, y, z = inputs(rig)
    assert rig.run(GRAPH) is None
    # Each value is dropped after its last use, so at most two of the three outputs are held at once.
    rig.tenant.memory_limit = rig.tenant.bytes + 2 * 16 - 1
    before, handles = rig.tenant.bytes, set(rig.tenant.storages)
    err = rig.run(P.Replay(1, 100, [x, y, z], 0, [2.0], keep=[2]))
    assert err is not None and err.code == "quota_exceeded"
    assert set(rig.tenant.storages) == handles and rig.tenant.bytes == before
    rig.tenant.memory_limit += 1
    assert rig.run(P.Replay(1, 200, [x, y, z], 0, [2.0], keep=[2])) is None
    assert rig.tenant.bytes == before + 16
    rig.run(P.Free([202]))
    err = rig.run(P.Replay(1, 300, [x, y, z], 0, [2.0]))  # binding everything needs room for all three
    assert err is not None and err.code == "quota_exceeded" and err.op == "aten.add.Tensor"


def test_keep_variants_are_compiled_per_kept_set_and_bounded(rig):
    x, y, z = inputs(rig)
    assert rig.run(GRAPH) is None
    for i, keep in enumerate([[2], [0], [0, 1, 2], [1], [], [2]]):
        assert rig.run(P.Replay(1, 100 * (i + 1), [x, y, z], 0, [2.0], keep=keep)) is None
        assert {100 * (i + 1) + r for r in keep} <= set(rig.tenant.storages)
    prog = rig.tenant.graphs[1]
    assert len(prog.variants) == 4 and len(prog.parts) == 5  # the base program and four variants


def test_a_long_graph_runs_in_parts_and_failures_name_their_step(rig):
    x, y = rig.upload(torch.zeros(4)), rig.upload(torch.ones(4))
    bad, good = rig.upload(torch.tensor([0, 9])), rig.upload(torch.tensor([1, 2]))
    n = 600  # more than one generated part
    recs = [P.Run(ADD, [-1, -2], [0])] + [P.Run(ADD, [i, -2], [i + 1]) for i in range(n - 1)]
    recs += [P.Run(INDEX, [n - 1, -3], [n]), P.Run(ADD, [n - 1, -2], [n + 1])]
    assert rig.run(P.DefineGraph(8, recs)) is None
    assert len(rig.tenant.graphs[8].parts) > 1
    assert rig.run(P.Replay(8, 10_000, [x, y, good], 0, keep=[n, n + 1])) is None
    assert rig.get(10_000 + n).tolist() == [float(n)] * 2 and rig.get(10_000 + n + 1).tolist() == [n + 1.0] * 4
    handles = set(rig.tenant.storages)
    err = rig.run(P.Replay(8, 20_000, [x, y, bad], 0, keep=[n, n + 1]))
    assert err is not None and err.op == "aten.index_select.default"
    assert set(rig.tenant.storages) - handles == {20_000 + n + 1}  # the step after the failure still ran


def test_compiled_and_record_by_record_replays_of_a_model_agree():
    import transformers

    import caserve.remote as R
    from caserve.remote.server import GPUServer

    from test_remote_models import DECODERS

    server = GPUServer("cpu")
    dev = R.connect(server=server)
    try:
        torch.manual_seed(0)
        model = R.graph_mode(transformers.GPT2LMHeadModel(DECODERS["gpt2"]()).eval().to(dev))
        ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1)).to(dev)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
        with torch.no_grad():
            model.generate(ids, **kw)  # every signature seen once
            compiled = model.generate(ids, **kw).cpu()
            (tenant,) = server.tenants.values()
            assert tenant.graphs and all(prog.run is not None for prog in tenant.graphs.values())
            for prog in tenant.graphs.values():
                prog.run = None  # every replay from here on runs record by record
            by_record = model.generate(ids, **kw).cpu()
        assert torch.equal(compiled, by_record)
    finally:
        R.disconnect(dev)


def test_a_tenant_s_graphs_hold_a_bounded_number_of_records(rig, monkeypatch):
    import caserve.remote.server.tenant_graphs as X

    monkeypatch.setattr(X, "MAX_TENANT_GRAPH_OPS", 5)
    three = [P.Run(ADD, [-1, -1], [0]), P.Run(ADD, [0, 0], [1]), P.Run(ADD, [1, 1], [2])]
    assert rig.run(P.DefineGraph(11, three)) is None
    assert rig.run(P.DefineGraph(11, three)) is None  # redefining a graph replaces its records
    err = rig.run(P.DefineGraph(12, three))  # 6 records in all
    assert err is not None and err.code == "limit" and "at most 5 records" in err.message
    assert 12 not in rig.tenant.graphs and rig.tenant.graph_ops == 3
    assert rig.run(P.ResetTemplates()) is None  # the client starts afresh: the count goes with the graphs
    assert rig.tenant.graph_ops == 0
