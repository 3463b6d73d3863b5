"""Graph mode: recorded forwards replayed with one message give exactly the eager results."""

from __future__ import annotations

import pytest
import torch
import transformers

import caserve.remote as R
from caserve.remote.server import GPUServer

from test_remote_models import DECODERS


@pytest.fixture
def dev():
    device = R.connect(server=GPUServer("cpu"))
    yield device
    R.disconnect(device)


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_graph_mode_generate_matches_local(arch, dev):
    torch.manual_seed(0)
    local = transformers.AutoModelForCausalLM.from_config(DECODERS[arch]()).eval()
    remote = transformers.AutoModelForCausalLM.from_config(DECODERS[arch]()).eval()
    remote.load_state_dict(local.state_dict())
    remote = R.graph_mode(remote.to(dev))
    gen = torch.Generator().manual_seed(5)
    # Prompts of two lengths, a batch of one and of three, in one process: graphs must never be mixed up.
    for batch, length in ((1, 6), (3, 9), (1, 6)):
        ids = torch.randint(3, 256, (batch, length), generator=gen)
        kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
        with torch.no_grad():
            want = local.generate(ids, **kw)
            got = remote.generate(ids.to(dev), **kw)
        assert torch.equal(got.cpu(), want), (arch, batch, length)
    stats = R.stats(dev)
    assert stats["graph_replays"] > 0 and stats["graphs"] >= 2  # decode steps were replayed, per shape


def test_graph_mode_falls_back_when_shapes_never_repeat(dev):
    torch.manual_seed(0)
    local = transformers.GPT2LMHeadModel(DECODERS["gpt2"]()).eval()
    remote = R.graph_mode(transformers.GPT2LMHeadModel(DECODERS["gpt2"]()).eval())
    remote.load_state_dict(local.state_dict())
    remote.to(dev)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # a dynamic cache grows every step: every forward is new, all run eagerly
        want = local.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = remote.generate(ids.to(dev), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got.cpu(), want)
    assert R.stats(dev)["graph_replays"] == 0


def test_sync_inside_forward_runs_eagerly(dev):
    class Syncing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            y = x @ self.w
            if y.sum().item() > 1e9:  # a sync point inside forward
                y = y * 0
            return y + 1

    torch.manual_seed(0)
    local = Syncing()
    remote = R.graph_mode(Syncing())
    remote.load_state_dict(local.state_dict())
    remote.to(dev)
    x = torch.randn(2, 4)
    for _ in range(3):
        with torch.no_grad():
            torch.testing.assert_close(remote(x.to(dev)).cpu(), local(x))
    stats = R.stats(dev)
    assert stats["graph_replays"] == 0 and stats["graph_fallbacks"] == 3


def test_replayed_forward_with_inputs_uploaded_inside(dev):
    """Uploads made inside forward travel with each replay (their bytes change between calls)."""

    class Adds(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x, k: float):
            return x * self.w + torch.tensor([k, 2 * k, 3 * k], device=x.device)

    model = R.graph_mode(Adds().to(dev))
    x = torch.arange(3.0).to(dev)
    with torch.no_grad():
        outs = [model(x, float(k)).cpu() for k in range(5)]
    for k, out in enumerate(outs):
        assert out.tolist() == [0 + k, 1 + 2 * k, 2 + 3 * k]
    assert R.stats(dev)["graph_replays"] == 4  # every call after the first
