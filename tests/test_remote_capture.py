"""Captured steps: a repeated forward replayed without its Python gives exactly the eager results, and
anything a replay could get wrong is recorded instead."""

from __future__ import annotations

import pytest
import torch
import transformers
from msgspec.structs import replace

from caserve.serving.messages import Row, SamplingParams

import caserve.remote as R
from caserve.remote.server import GPUServer

from test_remote_models import DECODERS


@pytest.fixture
def dev():
    device = R.connect(server=GPUServer("cpu"))
    yield device
    R.disconnect(device)


class Box:
    """A plain object passed to forward, like a KV cache."""

    def __init__(self, state: torch.Tensor) -> None:
        self.state = state
        self.calls = 0


class Accumulate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor, box: Box, scale: float = 1.0) -> dict:
        y = torch.tanh(x @ self.w) * scale
        box.state.add_(y.sum(0))  # in place, like a static KV cache
        return {"y": y, "box": box, "n": 3}


def _pair(dev, cls=Accumulate, **kw):
    torch.manual_seed(0)
    local = cls(**kw)
    remote = cls(**kw)
    remote.load_state_dict(local.state_dict())
    return local, R.graph_mode(remote.to(dev))


def test_step_replays_match_eager_and_return_inputs_by_identity(dev):
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    for i in range(6):
        x = torch.randn(2, 4)
        with torch.no_grad():
            want = local(x, lbox, 0.5)
            got = remote(x.to(dev), rbox, 0.5)
        assert got["box"] is rbox and got["n"] == 3
        torch.testing.assert_close(got["y"].cpu(), want["y"])
        torch.testing.assert_close(rbox.state.cpu(), lbox.state)
    # The first call plans its ops (and torch holds its first intermediates a while): from the third
    # call at the latest, every call is a replay.
    assert R.stats(dev)["step_replays"] >= 3


def test_a_new_scalar_value_is_a_new_key(dev):
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    x = torch.randn(2, 4)
    with torch.no_grad():
        replays = []
        for scale in (1.0, 1.0, 1.0, 1.0, 2.0):
            want = local(x, lbox, scale)
            got = remote(x.to(dev), rbox, scale)
            torch.testing.assert_close(got["y"].cpu(), want["y"])
            replays.append(R.stats(dev)["step_replays"])
    assert replays[3] > 0 and replays[4] == replays[3]  # scale=2.0 is recorded, not replayed


def test_forward_that_changes_python_state_is_never_captured(dev):
    class Counting(Accumulate):
        def forward(self, x, box, scale=1.0):
            box.calls += 1  # Python state a replay would not update
            return super().forward(x, box, scale)

    local, remote = _pair(dev, Counting)
    rbox = Box(torch.zeros(4).to(dev))
    x = torch.randn(2, 4).to(dev)
    with torch.no_grad():
        for _ in range(5):
            remote(x, rbox)
    assert rbox.calls == 5 and R.stats(dev)["step_replays"] == 0


def test_forward_that_keeps_a_tensor_it_made_is_never_captured(dev):
    class Keeping(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))
            self.last = None

        def forward(self, x):
            y = x @ self.w
            self.last = y * 2  # held in module state, not returned
            return y + 1

    model = R.graph_mode(Keeping().to(dev))
    with torch.no_grad():
        for k in range(5):
            x = torch.full((1, 4), float(k)).to(dev)
            model(x)
            torch.testing.assert_close(model.last.cpu(), (x.cpu() @ model.w.detach().cpu()) * 2)
    assert R.stats(dev)["step_replays"] == 0


def test_forward_that_syncs_is_never_captured(dev):
    class Branching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.eye(2))

        def forward(self, x):
            return x * 2 if x.sum().item() > 0 else x * 3

    model = R.graph_mode(Branching().to(dev))
    with torch.no_grad():
        outs = [model(torch.tensor([s, s]).to(dev)).cpu().tolist() for s in (1.0, 1.0, 1.0, -1.0)]
    assert outs == [[2.0, 2.0]] * 3 + [[-3.0, -3.0]]
    assert R.stats(dev)["step_replays"] == 0


def test_replaced_weights_are_read_again(dev):
    local, remote = _pair(dev)
    rbox = Box(torch.zeros(4).to(dev))
    x = torch.randn(2, 4)
    with torch.no_grad():
        for _ in range(4):
            remote(x.to(dev), rbox)
        assert R.stats(dev)["step_replays"] >= 1
        new = torch.randn(4, 4)
        remote.w = torch.nn.Parameter(new.to(dev))  # a new tensor: the step must not use the old one
        got = remote(x.to(dev), rbox)["y"].cpu()
        torch.testing.assert_close(got, torch.tanh(x @ new))
        remote.w.copy_(torch.ones(4, 4))  # written in place: the same tensor, new values
        for _ in range(3):
            got = remote(x.to(dev), rbox)["y"].cpu()
        torch.testing.assert_close(got, torch.tanh(x @ torch.ones(4, 4)))


def test_inputs_that_alias_differently_are_recorded(dev):
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, a, b):
            a.add_(1)
            return b * self.w  # sees a's write when b is a

    model = R.graph_mode(Two().to(dev))
    with torch.no_grad():
        for _ in range(4):  # captured with a and b the same tensor: one source for both
            same = torch.zeros(3).to(dev)
            assert model(same, same).cpu().tolist() == [1.0, 1.0, 1.0]
        assert R.stats(dev)["step_replays"] >= 1
        out = model(torch.zeros(3).to(dev), torch.zeros(3).to(dev))
    assert out.cpu().tolist() == [0.0, 0.0, 0.0]


def test_capture_off_runs_python_every_call(dev):
    torch.manual_seed(0)
    remote = R.graph_mode(Accumulate().to(dev), capture=False)
    rbox = Box(torch.zeros(4).to(dev))
    with torch.no_grad():
        for _ in range(4):
            remote(torch.randn(2, 4).to(dev), rbox)
    stats = R.stats(dev)
    assert stats["step_replays"] == 0 and stats["graph_replays"] > 0


def test_generate_replays_decode_steps_without_python(dev):
    torch.manual_seed(0)
    local = transformers.GPT2LMHeadModel(DECODERS["gpt2"]()).eval()
    remote = transformers.GPT2LMHeadModel(DECODERS["gpt2"]()).eval()
    remote.load_state_dict(local.state_dict())
    remote = R.graph_mode(remote.to(dev))
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
    with torch.no_grad():
        for _ in range(2):  # a second generate reuses the steps with a new cache object
            want = local.generate(ids, **kw)
            before = R.stats(dev)["step_replays"]
            got = remote.generate(ids.to(dev), **kw)
            assert torch.equal(got.cpu(), want)
            assert R.stats(dev)["step_replays"] - before >= 8


def test_assisted_engine_replays_decode_steps_with_the_same_tokens(dev):
    """The serving engine as an assisted worker runs it: static cache, 4-D mask, graph mode."""
    from caserve.models import DEFAULT_MODEL, load_model
    from caserve.serving.worker.engine import Engine

    from test_serving_engine import rows, run

    want = run(Engine(load_model(DEFAULT_MODEL)), rows())  # dynamic cache, local
    lm = load_model(DEFAULT_MODEL, device=dev)
    R.graph_mode(lm.model)
    engine = Engine(lm)
    assert engine.ahead
    for _ in range(2):
        assert run(engine, rows()) == want
    assert R.stats(dev)["step_replays"] >= 20
    # Greedy rows only: the engine decodes one step ahead of what it has read (decode_ahead).
    greedy = [r for r in rows() if r.params.temperature == 0]
    assert len(greedy) == 2
    ahead = run(engine, greedy)
    assert ahead == {r.dispatch: want[r.dispatch] for r in greedy}
    # Rows that stop early (on a stop string taken from their own output): the step computed ahead for
    # them is dropped, nothing more is emitted.
    text = {d: lm.tokenizer.decode(ids) for d, ids in want.items()}
    stopped = [replace(r, params=replace(r.params, stop=[text[r.dispatch][5]])) for r in greedy]
    local_stopped = run(Engine(load_model(DEFAULT_MODEL)), stopped)
    assert all(len(local_stopped[r.dispatch]) < len(want[r.dispatch]) for r in greedy)
    assert run(engine, stopped) == local_stopped


def test_assisted_engine_shares_one_prefill_among_choices(dev):
    """The n choices of one request on an assisted worker: one prefill whose KV columns are copied on the
    GPU server into the other slots; the tokens are the native engine's, and decode steps of each bucket
    of slots are replayed."""
    from caserve.models import DEFAULT_MODEL, load_model
    from caserve.serving.worker.engine import Engine

    from test_serving_engine import choices, gen, run, tokens_of

    prompt = [(11 * i) % 240 + 3 for i in range(90)]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=4, ignore_eos=True)
    batch = choices("s", prompt, sampled, 3) + [gen("other", [5, 6, 7], 30)]
    want = run(Engine(load_model(DEFAULT_MODEL), chunk=64), batch)
    lm = load_model(DEFAULT_MODEL, device=dev)
    R.graph_mode(lm.model)
    engine = Engine(lm, chunk=64)
    for _ in range(2):
        events: list = []
        stats = engine.run(batch, events.append, lambda d: False)
        assert stats.prefill_tokens == len(prompt) + 3
        assert tokens_of(events, want) == want
    assert R.stats(dev)["step_replays"] >= 20


def test_forward_with_autograd_recording_is_never_captured(dev):
    torch.manual_seed(0)
    remote = R.graph_mode(Accumulate().to(dev))
    rbox = Box(torch.zeros(4).to(dev))
    x = torch.randn(2, 4).to(dev)
    for _ in range(4):  # grad enabled: outputs need their autograd history, which only Python builds
        out = remote(x, rbox)
    assert out["y"].requires_grad and out["y"].grad_fn is not None
    assert R.stats(dev)["step_replays"] == 0


def test_a_weight_copied_on_write_is_read_from_its_new_storage(dev):
    class Big(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(128, 128))  # 64 KiB: uploaded as a shared weight

        def forward(self, x):
            return x @ self.w

    torch.manual_seed(0)
    local = Big()
    remote = Big()
    remote.load_state_dict(local.state_dict())
    remote = R.graph_mode(remote.to(dev))
    x = torch.randn(2, 128)
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(remote(x.to(dev)).cpu(), x @ local.w)
        assert R.stats(dev)["step_replays"] >= 1
        remote.w.mul_(2.0)  # a write to a shared weight: this tenant gets a private copy, a new handle
        local.w.mul_(2.0)
        for _ in range(2):
            torch.testing.assert_close(remote(x.to(dev)).cpu(), x @ local.w)


def test_assisted_engine_replays_prefills_of_one_bucket(dev):
    """Prompt widths are padded to a multiple of 16 and static caches are reused, so prefills of similar
    lengths repeat exactly and are replayed too; tokens stay those of the local engine."""
    from caserve.models import DEFAULT_MODEL, load_model
    from caserve.serving.worker.engine import Engine

    from test_serving_engine import GREEDY, run

    local = Engine(load_model(DEFAULT_MODEL))
    lm = load_model(DEFAULT_MODEL, device=dev)
    R.graph_mode(lm.model)
    engine = Engine(lm)
    params = replace(GREEDY, max_tokens=8)
    deltas = []
    for i, n in enumerate((5, 9, 12, 7, 11, 6)):
        row = [Row(dispatch=f"r{i}", job=f"r{i}", task="generate", prompt_ids=list(range(40, 40 + n)), params=params)]
        before = R.stats(dev)["step_replays"]
        assert run(engine, row) == run(local, row)
        deltas.append(R.stats(dev)["step_replays"] - before)
    assert all(d >= 8 for d in deltas[3:]), deltas  # 7 decode steps and the prefill


def test_a_session_starts_afresh_before_the_graph_limits_the_server_sent(monkeypatch):
    import msgspec

    import caserve.remote.server.tenant_graphs as X
    from caserve.remote.client.session import session_of
    from caserve.remote.wire import protocol as P

    # A server that holds 8 graph records per tenant (a step of Accumulate is a few: room for 1-2), and
    # says so in Welcome: the client must reset before the server refuses a graph.
    monkeypatch.setattr(P, "LIMITS", msgspec.structs.replace(P.LIMITS, max_tenant_graph_records=8))
    monkeypatch.setattr(X, "MAX_TENANT_GRAPH_OPS", 8)
    dev = R.connect(server=GPUServer("cpu"))
    assert session_of(dev).limits.max_tenant_graph_records == 8
    local, remote = _pair(dev)
    lbox, rbox = Box(torch.zeros(4)), Box(torch.zeros(4).to(dev))
    session = session_of(dev)
    with torch.no_grad():
        for scale in [1.0, 2.0, 3.0, 4.0] * 4:  # four keys, each captured in turn
            want = local(torch.ones(2, 4), lbox, scale)
            got = remote(torch.ones(2, 4).to(dev), rbox, scale)
            torch.testing.assert_close(got["y"].cpu(), want["y"])
        torch.testing.assert_close(rbox.state.cpu(), lbox.state)
    assert session.epoch >= 1  # templates and graphs were reset at least once, and no error came back
    assert session.graph_cache.defined_records <= 8
    R.disconnect(dev)


@pytest.mark.parametrize("name", ["facebook/opt-125m", "EleutherAI/pythia-160m", "Qwen/Qwen2.5-0.5B",
                                  "TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
def test_assisted_engine_matches_native_across_architectures(name, dev):
    """Zoo decoders (shrunk, random weights): the assisted path (static cache, padded prefill with a 4-D
    mask, reused caches, graph mode, greedy decode ahead) gives the native engine's tokens."""
    from caserve.models import load_model
    from caserve.serving.worker.engine import Engine

    from test_serving_engine import GREEDY, run

    native = Engine(load_model(name, shrink=True))
    lm = load_model(name, device=dev, shrink=True)
    R.graph_mode(lm.model)
    assisted = Engine(lm)
    batches = [[list(range(30, 37)), list(range(50, 53))], [list(range(60, 71))], [list(range(80, 86))]]
    for i, prompts in enumerate(batches * 2):  # the second round reuses caches and replays prefills
        rows = [Row(dispatch=f"{i}-{j}", job=f"{i}-{j}", task="generate", prompt_ids=p, params=replace(GREEDY, max_tokens=10))
                for j, p in enumerate(prompts)]
        assert run(assisted, rows) == run(native, rows), (name, prompts)
    assert R.stats(dev)["step_replays"] > 0
