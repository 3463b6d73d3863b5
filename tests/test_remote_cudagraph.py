"""CUDA graph replay of captured steps, everything but the CUDA calls: keys, static inputs, invalidation,
fallback, limits and accounting, on a CPU server whose graph backend is a fake with a real graph's
semantics (capture executes nothing; a replay rewrites the captured outputs in place)."""

from __future__ import annotations

import gc
import logging

import pytest
import torch
import transformers

import caserve.remote as R
from caserve.remote.client.session import live_sessions, session_of
from caserve.remote.server import GPUServer, cudagraph
from caserve.remote.wire.codec import extent

from test_remote_capture import Accumulate, Box
from test_remote_models import DECODERS


class FakeGraph:
    """Captures by running ``fn`` with every storage of its tenant restored afterwards (a real capture
    launches nothing), poisons the outputs, and replays by running ``fn`` again into them."""

    def __init__(self, fn, tenant) -> None:
        self.fn = fn
        held = {}
        for st in list(tenant.storages.values()):
            held.setdefault(st.tensor.untyped_storage().data_ptr(), st.tensor.untyped_storage())
        saved = [(s, s.clone()) for s in held.values()]
        self.outs = fn()
        for s, copy in saved:
            s.copy_(copy)
        for t in self.outs:
            _flat(t).fill_(float("nan") if t.is_floating_point() else -7)
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for static, new in zip(self.outs, self.fn()):
            _flat(static).copy_(_flat(new))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((extent(tuple(t.shape), t.stride(), t.storage_offset()),), (1,), 0)


class FakeBackend:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.server: GPUServer | None = None
        self.pools = 0
        self.graphs: list[FakeGraph] = []
        self.attempts = 0

    def new_pool(self, device):
        self.pools += 1
        return ("pool", self.pools)

    def capture(self, fn, pool, stream):
        self.attempts += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        (tenant,) = [t for t in list(self.server.tenants.values()) if t.cuda_graphs and t.cuda_graphs.pool is pool]
        self.graphs.append(FakeGraph(fn, tenant))
        return self.graphs[-1]


@pytest.fixture
def fake(monkeypatch):
    backend = FakeBackend()
    monkeypatch.setattr(cudagraph, "BACKEND", [backend])
    return backend


@pytest.fixture
def server(fake):
    fake.server = GPUServer("cpu")
    return fake.server


@pytest.fixture
def dev(server):
    device = R.connect(server=server)
    yield device
    if any(s.device == device for s in live_sessions()):  # a test may have disconnected it
        R.disconnect(device)


def _tenant(server):
    (tenant,) = server.tenants.values()
    return tenant


def _pair(dev):
    torch.manual_seed(0)
    local, remote = Accumulate(), Accumulate()
    remote.load_state_dict(local.state_dict())
    return local, R.graph_mode(remote.to(dev))


def _steps(local, remote, lbox, rbox, n, scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(2, 4, generator=gen)
        with torch.no_grad():
            want = local(x, lbox, scale)
            got = remote(x.to(dev_of(rbox)), rbox, scale)
        torch.testing.assert_close(got["y"].cpu(), want["y"])
        torch.testing.assert_close(rbox.state.cpu(), lbox.state)


def dev_of(box):
    return box.state.device


def test_steps_replay_as_one_graph_with_eager_results(server, dev, fake):
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    _steps(local, remote, lbox, rbox, 10)
    graphs = _tenant(server).cuda_graphs
    assert graphs.stats.captures == 1 and graphs.stats.failures == 0
    # The capture poisoned its outputs, and the in-place update ran once per step: results match eager
    # only because each replay recomputed them from the step's own inputs.
    assert graphs.stats.replays >= 4 and fake.graphs[0].replays == graphs.stats.replays
    (cg,) = graphs.lru.values()
    # x is an input with a static buffer; w and the box's state (written) are read where they are.
    assert len(cg.inputs) == 1 and cg.inputs[0][1].numel() == 8
    assert len(cg.fixed) == 2 and fake.pools == 1


def test_a_graph_is_charged_to_its_tenant_and_freed_with_it(server, dev):
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    _steps(local, remote, lbox, rbox, 2)
    tenant = _tenant(server)
    before = tenant.bytes
    _steps(local, remote, lbox, rbox, 4, seed=1)
    graphs = tenant.cuda_graphs
    assert graphs.stats.captures == 1
    (cg,) = graphs.lru.values()
    assert cg.nbytes >= 8 * 4 and graphs.nbytes == cg.nbytes
    assert tenant.bytes == before + cg.nbytes  # step outputs come and go; the graph stays charged
    R.disconnect(dev)
    assert tenant.bytes == 0 and not graphs.lru and graphs.nbytes == 0 and graphs.pool is None


def test_a_failed_capture_logs_once_and_runs_as_a_compiled_replay(server, dev, fake, caplog):
    fake.fail = True
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    with caplog.at_level(logging.WARNING, logger=cudagraph.__name__):
        _steps(local, remote, lbox, rbox, 10)
    graphs = _tenant(server).cuda_graphs
    assert fake.attempts == 1 and graphs.stats.failures == 1 and graphs.stats.replays == 0
    lines = [r for r in caplog.records if r.name == cudagraph.__name__]
    assert len(lines) == 1 and "compiled replay" in lines[0].getMessage()
    assert R.stats(dev)["step_replays"] >= 6  # still replayed, compiled
    assert _tenant(server).error is None


def test_a_new_scalar_is_a_new_graph(server, dev):
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    _steps(local, remote, lbox, rbox, 6, scale=0.5)
    _steps(local, remote, lbox, rbox, 8, scale=2.0, seed=1)
    graphs = _tenant(server).cuda_graphs
    assert graphs.stats.captures == 2 and len(graphs.lru) == 2


def test_a_new_cache_storage_drops_the_graph_and_an_in_place_reset_keeps_it(server, dev):
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    _steps(local, remote, lbox, rbox, 6)
    graphs = _tenant(server).cuda_graphs
    assert graphs.stats.captures == 1
    # An in-place reset writes the same storage: the graph still reads and writes it correctly.
    lbox.state.zero_()
    rbox.state.zero_()
    _steps(local, remote, lbox, rbox, 3, seed=2)
    assert graphs.stats.captures == 1 and graphs.stats.dropped == 0
    # A new state tensor: the old one is freed, and the graph that wrote it goes with it.
    lbox, rbox = Box(torch.ones(4)), Box(torch.ones(4).to(dev))
    gc.collect()  # the old box is let go of, and the client frees its state
    R.server_stats(dev)  # one round trip: everything sent has run
    assert graphs.stats.dropped == 1 and len(graphs.lru) == 0
    _steps(local, remote, lbox, rbox, 6, seed=4)
    assert graphs.stats.captures == 2 and len(graphs.lru) == 1


def test_a_replaced_weight_drops_the_graph(server, dev):
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    _steps(local, remote, lbox, rbox, 6)
    graphs = _tenant(server).cuda_graphs
    w = torch.randn(4, 4)
    local.w = torch.nn.Parameter(w)
    remote.w = torch.nn.Parameter(w.clone().to(dev))
    _steps(local, remote, lbox, rbox, 8, seed=5)
    R.server_stats(dev)  # one round trip: everything sent has run
    assert graphs.stats.dropped == 1 and graphs.stats.captures == 2 and len(graphs.lru) == 1


def test_reset_templates_drops_every_graph(server, dev):
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    _steps(local, remote, lbox, rbox, 6)
    tenant = _tenant(server)
    session = session_of(dev)
    with session.lock:
        session.reset_templates()
    R.server_stats(dev)  # one round trip: everything sent has run
    assert not tenant.cuda_graphs.lru and tenant.cuda_graphs.stats.dropped == 1
    _steps(local, remote, lbox, rbox, 8, seed=6)  # recorded and captured again
    assert tenant.cuda_graphs.stats.captures == 2


def test_limits_evict_the_oldest_graph(server, dev, monkeypatch):
    monkeypatch.setattr(cudagraph, "MAX_GRAPHS", 1)
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    _steps(local, remote, lbox, rbox, 6, scale=0.5)
    _steps(local, remote, lbox, rbox, 6, scale=2.0, seed=1)
    graphs = _tenant(server).cuda_graphs
    assert graphs.stats.captures == 2 and graphs.stats.dropped == 1 and len(graphs.lru) == 1
    assert _tenant(server).bytes >= graphs.nbytes == next(iter(graphs.lru.values())).nbytes


def test_inputs_past_the_limit_are_not_captured(server, dev, monkeypatch, fake):
    monkeypatch.setattr(cudagraph, "MAX_INPUT_BYTES", 16)  # x takes 32 bytes
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    _steps(local, remote, lbox, rbox, 8)
    graphs = _tenant(server).cuda_graphs
    assert fake.attempts == 0 and graphs.stats.captures == 0 and graphs.stats.replays == 0


def test_a_graph_that_would_pass_the_memory_limit_is_not_captured(fake):
    server = fake.server = GPUServer("cpu", tenant_memory_limit=1 << 20)
    dev = R.connect(server=server)
    try:
        local, remote = _pair(dev)
        lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
        _steps(local, remote, lbox, rbox, 3)
        gc.collect()  # what the steps let go of is freed now, not at some later collection
        R.server_stats(dev)
        tenant = _tenant(server)
        step = max(prog.out_nbytes for prog in tenant.graphs.values())
        # Room for a step (its program, and the last step's output until the client frees it), not for a
        # step and a graph (its inputs and its program's peak once more).
        tenant.memory_limit = tenant.bytes + step + 32
        _steps(local, remote, lbox, rbox, 6, seed=1)
        assert fake.attempts == 0 and tenant.cuda_graphs.stats.captures == 0
        assert tenant.error is None and tenant.bytes <= tenant.memory_limit
    finally:
        R.disconnect(dev)


def test_static_cache_decode_matches_eager_for_gpt2(server, dev, fake):
    torch.manual_seed(0)
    config = DECODERS["gpt2"]()
    local = transformers.AutoModelForCausalLM.from_config(config).eval()
    remote = transformers.AutoModelForCausalLM.from_config(config).eval()
    remote.load_state_dict(local.state_dict())
    remote = R.graph_mode(remote.to(dev))
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
    with torch.no_grad():
        want = local.generate(input_ids=ids, **kw)
        got = remote.generate(input_ids=ids.to(dev), **kw)
    assert torch.equal(got.cpu(), want)
    graphs = _tenant(server).cuda_graphs
    # 11 decode steps: the client records three, the server runs two replays compiled and captures on the third.
    assert graphs.stats.captures == 1 and graphs.stats.replays >= 3 and graphs.stats.failures == 0


def test_off_by_environment_and_on_cpu_without_a_fake(monkeypatch):
    monkeypatch.setattr(cudagraph, "BACKEND", [FakeBackend()])
    monkeypatch.setenv("CASERVE_CUDA_GRAPHS", "0")
    server = GPUServer("cpu")
    assert server.new_tenant().cuda_graphs is None
    monkeypatch.setenv("CASERVE_CUDA_GRAPHS", "1")
    assert server.new_tenant().cuda_graphs is not None
    monkeypatch.setattr(cudagraph, "BACKEND", [None])
    assert server.new_tenant().cuda_graphs is None  # a CPU device has no CUDA graphs
