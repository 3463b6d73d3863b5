"""CUDA graph replay on a real GPU (skipped without one): a captured decode step replayed as one CUDA graph
gives exactly the tokens of eager forwarding, for GPT-2, Llama and Qwen2 with a static KV cache, and the
graph replay is really what ran.

Run it on a GPU machine with ``python -m pytest tests/test_gpu_cuda.py`` (no network, random weights).
The server runs in this process on ``cuda``; the client side is the usual caserve device.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import transformers

import caserve.remote as R
from caserve.remote.server import GPUServer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIGS = {  # the shapes of tests/test_remote_models.py, spelled out so that this file runs on its own
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128),
    "llama": lambda: transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}
NEW_TOKENS = 20
# disable_compile: Transformers compiles a static-cache decode on a native CUDA model by itself (Inductor
# kernels, other numerics); native CUDA here means eager.
KW = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
          cache_implementation="static", disable_compile=True)


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def _prompt(batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # left padding on the last row
    return ids, mask


def _decode(server: GPUServer, dev: torch.device, model: torch.nn.Module, graph: bool, ids: torch.Tensor,
            mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Greedy tokens of ``model`` on caserve device ``dev`` and its tenant's CUDA graph figures."""
    tenant = server.tenants[R.server_stats(dev)["tenant"]]
    remote = copy.deepcopy(model).to(dev)
    if graph:
        remote = R.graph_mode(remote)
    with torch.no_grad():
        out = remote.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **KW).cpu()
    graphs = tenant.cuda_graphs
    figures = {"captures": graphs.stats.captures, "replays": graphs.stats.replays, "failures": graphs.stats.failures,
               "graph_bytes": graphs.nbytes, "step_replays": R.stats(dev)["step_replays"]}
    return out, figures


def _remote_generate(server: GPUServer, model: torch.nn.Module, graph: bool, ids: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    dev = R.connect(server=server)
    try:
        return _decode(server, dev, model, graph, ids, mask)
    finally:
        R.disconnect(dev)


@pytest.fixture(scope="module")
def server():
    return GPUServer("cuda")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_cuda_graph_replay_gives_eager_tokens(arch, server):
    model = _model(arch)
    ids, mask = _prompt()
    eager, eager_figures = _remote_generate(server, model, False, ids, mask)
    graphed, figures = _remote_generate(server, model, True, ids, mask)
    assert eager_figures["replays"] == 0  # eager forwarding never replays anything
    assert figures["failures"] == 0, figures
    assert figures["captures"] >= 1, figures
    # The client records the first decode steps, then replays them as a step; the server runs the first
    # two replays compiled (learning which handles change) and captures on the third: the rest, about
    # NEW_TOKENS - 7 of them (13 on the CPU with a fake backend), are CUDA graph replays.
    assert figures["replays"] >= NEW_TOKENS // 2, figures
    assert torch.equal(graphed, eager), (arch, graphed, eager)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_cuda_graph_tokens_match_native_cuda(arch, server):
    model = _model(arch)
    ids, mask = _prompt(batch=1, length=5)
    mask[:] = 1
    with torch.no_grad():
        native = copy.deepcopy(model).cuda().generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), **KW).cpu()
    graphed, figures = _remote_generate(server, model, True, ids, mask)
    assert figures["replays"] >= 1, figures
    assert torch.equal(graphed, native), (arch, graphed, native)


def test_tenants_capture_and_replay_side_by_side(server):
    """Two tenants decoding at once, each on its own stream and memory pool, each gets its own tokens."""
    model = _model("llama")
    ids, mask = _prompt()
    want, _ = _remote_generate(server, model, False, ids, mask)
    devs = [R.connect(server=server) for _ in range(2)]
    results: dict[int, tuple] = {}

    def decode(i: int) -> None:
        try:
            results[i] = _decode(server, devs[i], model, True, ids, mask)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = (exc, None)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        for dev in devs:
            R.disconnect(dev)
    for i in range(2):
        got, figures = results[i]
        assert isinstance(got, torch.Tensor), got
        assert torch.equal(got, want)
        assert figures["replays"] >= 1 and figures["failures"] == 0, figures


def test_graphs_are_freed_with_their_tenant(server):
    model = _model("gpt2")
    ids, mask = _prompt()
    dev = R.connect(server=server)
    try:
        tenant = server.tenants[R.server_stats(dev)["tenant"]]
        _, figures = _decode(server, dev, model, True, ids, mask)
        assert figures["captures"] >= 1, figures
    finally:
        R.disconnect(dev)
    graphs = tenant.cuda_graphs
    assert not graphs.lru and graphs.nbytes == 0 and graphs.pool is None and tenant.bytes == 0
    assert tenant.id not in server.tenants
    torch.cuda.synchronize()


def test_native_engine_on_cuda_attends_one_window_per_step_and_rows_keep_their_tokens():
    """The serving engine on a CUDA model: per-run windows are off (their cost model is the CPU's), and a
    short row decoding beside a long one gets the tokens it gets alone."""
    from caserve.models import DEFAULT_MODEL, load_model
    from caserve.serving.messages import Row, SamplingParams, Tokens
    from caserve.serving.worker.engine import Engine

    lm = load_model(DEFAULT_MODEL, device="cuda")

    def row(name: str, prompt_len: int, max_tokens: int) -> Row:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return Row(dispatch=name, job=name, task="generate", prompt_ids=[1 + i % 200 for i in range(prompt_len)],
                   params=params)

    def tokens(engine: Engine, rows: list[Row]) -> dict[str, list[int]]:
        events: list = []
        engine.run(rows, events.append, lambda d: False)
        out: dict[str, list[int]] = {r.dispatch: [] for r in rows}
        for e in events:
            if isinstance(e, Tokens):
                out[e.dispatch] += e.ids
        return out

    engine = Engine(lm, max_batch=4)
    assert engine.device.type == "cuda" and not engine.runs
    together = tokens(engine, [row("long", 300, 16), row("short", 4, 16)])
    alone = tokens(Engine(lm, max_batch=4), [row("short", 4, 16)])
    assert len(together["long"]) == 16 and together["short"] == alone["short"]
