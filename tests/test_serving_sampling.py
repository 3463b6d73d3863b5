"""SlotSampler against a straightforward CPU reference (one row at a time, plain Python loops), its
seeded draws on the CPU and on an in-process remote ``caserve`` device, and its log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from caserve.serving.worker.sampling import SamplingParams, SlotSampler, row_key, uniform_noise

V = 50
EOS = 3


def reference_logits(logits: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int]) -> torch.Tensor:
    """The processed logits of one row [V] (float64), written as directly as possible."""
    x = logits.double().clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    if len(out) < p.min_tokens:
        for t in [EOS, *p.stop_token_ids]:
            x[t] = -math.inf
    for t in set(prompt) | set(out):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.presence_penalty + p.frequency_penalty * out.count(t)
    if p.greedy:
        return x
    x = x / p.temperature
    if 0 < p.top_k < V:
        kth = sorted(x.tolist(), reverse=True)[p.top_k - 1]
        x[x < kth] = -math.inf
    if p.top_p < 1.0:
        probs = torch.softmax(x, -1)
        order = sorted(range(V), key=lambda t: -probs[t].item())
        mass = 0.0
        for t in order:
            if mass >= p.top_p:
                x[t] = -math.inf
            mass += probs[t].item()
    if p.min_p > 0:
        probs = torch.softmax(x, -1)
        x[probs < p.min_p * probs.max()] = -math.inf
    return x


def reference_draw(x: torch.Tensor, p: SamplingParams, step: int) -> int:
    if p.greedy:
        return int(x.argmax())
    keys = torch.tensor([[row_key(p.seed, step)]], dtype=torch.long)
    u = uniform_noise(keys, torch.arange(V))[0].double()
    return int((x - torch.log(-torch.log(u))).argmax())


CASES = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.3, top_k=5, seed=2),
    SamplingParams(temperature=1.0, top_p=0.6, seed=3),
    SamplingParams(temperature=0.7, min_p=0.2, seed=4),
    SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.7, seed=5),
    SamplingParams(temperature=0.0, frequency_penalty=1.5),
    SamplingParams(temperature=1.0, logit_bias={7: 8.0, 9: -100.0}, seed=6),
    SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[11], seed=7),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.8, min_p=0.05, frequency_penalty=0.3, seed=8),
]


def run_sampler(device, steps: int, cases=CASES) -> list[list[int]]:
    """Every case in its own slot of one sampler, all slots sampled together at every step; logits come
    from a fixed generator and favour EOS and token 11, so bans and penalties show."""
    gen = torch.Generator().manual_seed(0)
    sampler = SlotSampler(len(cases), V, device, [EOS])
    prompts = [[(5 * i + j) % V for j in range(6)] for i in range(len(cases))]
    for slot, p in enumerate(cases):
        sampler.start(slot, p, prompts[slot])
    outs: list[list[int]] = [[] for _ in cases]
    for _ in range(steps):
        logits = torch.randn(len(cases), V, generator=gen) * 2
        logits[:, EOS] += 3
        logits[:, 11] += 3
        ids = sampler.sample(logits.to(device), range(len(cases))).ids.tolist()
        for slot, t in enumerate(ids):
            outs[slot].append(t)
    return outs


def reference_outputs(steps: int, cases=CASES) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    prompts = [[(5 * i + j) % V for j in range(6)] for i in range(len(cases))]
    outs: list[list[int]] = [[] for _ in cases]
    for _ in range(steps):
        logits = torch.randn(len(cases), V, generator=gen) * 2
        logits[:, EOS] += 3
        logits[:, 11] += 3
        for slot, p in enumerate(cases):
            x = reference_logits(logits[slot], p, prompts[slot], outs[slot])
            outs[slot].append(reference_draw(x, p, len(outs[slot])))
    return outs


def test_every_processor_matches_the_reference() -> None:
    got, want = run_sampler("cpu", 12), reference_outputs(12)
    assert got == want
    assert EOS not in got[8][:4] and 11 not in got[8][:4]  # min_tokens bans EOS and stop ids
    assert got[7].count(7) >= 6 and 9 not in got[7]  # the bias shows
    assert len(set(got[6])) > len(set(got[0]))  # the frequency penalty spreads greedy output


def test_greedy_rows_are_argmax_and_top_k_1_is_greedy() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    sampler = SlotSampler(4, V, "cpu", [EOS])
    sampler.start(0, SamplingParams(temperature=0.0), [1])
    sampler.start(2, SamplingParams(temperature=1.5, top_k=1, seed=9), [1])
    sampler.start(3, SamplingParams(temperature=1.5, seed=9), [1])
    ids = sampler.sample(logits, [0, 2, 3]).ids
    assert ids[:2].tolist() == logits[:2].argmax(-1).tolist()


def test_seeded_draws_follow_the_distribution() -> None:
    """Over many seeds the draws of one row have the frequencies of its (top-p cut) distribution."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = SamplingParams(temperature=1.0, top_p=0.9)
    x = reference_logits(torch.nn.functional.pad(logits, (0, V - 6), value=-30.0), p, [], [])
    probs = torch.softmax(x, -1)[:6]
    n = 3000
    sampler = SlotSampler(1, V, "cpu", [])
    counts = torch.zeros(6)
    for seed in range(n):
        sampler.start(0, SamplingParams(temperature=1.0, top_p=0.9, seed=seed), [])
        counts[int(sampler.sample(torch.nn.functional.pad(logits, (0, V - 6), value=-30.0)[None], [0]).ids)] += 1
    assert counts[-1] == 0 and counts[-2] == 0  # cut by top_p
    assert (counts / n - probs).abs().max() < 0.03


def test_continuation_draws_what_an_uninterrupted_request_draws() -> None:
    p = SamplingParams(temperature=1.0, frequency_penalty=0.8, seed=42)
    full = run_sampler("cpu", 10, [p])[0]
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(1, V, generator=gen) * 2 for _ in range(10)]
    for x in logits:
        x[:, EOS] += 3
        x[:, 11] += 3
    sampler = SlotSampler(1, V, "cpu", [EOS])
    sampler.start(0, p, [j % V for j in range(6)], output_ids=full[:4])  # an earlier attempt made 4
    rest = [int(sampler.sample(x, [0]).ids) for x in logits[4:]]
    assert rest == full[4:]


def test_logprobs_are_the_model_distribution() -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    sampler = SlotSampler(2, V, "cpu", [EOS])
    sampler.start(0, SamplingParams(temperature=0.0, logprobs=3), [1])
    sampler.start(1, SamplingParams(temperature=1.0, seed=1, logprobs=0), [1])
    r = sampler.sample(logits, [0, 1])
    lp = torch.log_softmax(logits, -1)
    assert r.logprobs.tolist() == pytest.approx(lp.gather(1, r.ids[:, None])[:, 0].tolist(), abs=1e-6)
    assert r.top_ids[0].tolist() == lp[0].topk(3).indices.tolist()
    assert r.top_logprobs.exp().sum(-1).max() <= 1.0 + 1e-6
    prompt = [4, 8, 15, 16, 23]
    pl = sampler.prompt_logprobs(logits.repeat(3, 1)[:5], prompt, k=2)
    want = torch.log_softmax(logits.repeat(3, 1)[:4], -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert pl.logprobs.tolist() == pytest.approx(want.tolist(), abs=1e-6) and pl.top_ids.shape == (4, 2)


def test_bad_token_ids_are_refused() -> None:
    sampler = SlotSampler(1, V, "cpu", [EOS])
    with pytest.raises(ValueError, match="vocabulary"):
        sampler.start(0, SamplingParams(logit_bias={V: 1.0}), [1])


def test_seeded_draws_are_the_same_on_a_remote_device() -> None:
    """The remote runtime runs ATen ops only: every op of the sampler works there, and gives the CPU's ids."""
    import caserve.remote as R
    from caserve.remote.server import GPUServer

    dev = R.connect(server=GPUServer(device="cpu"))
    try:
        assert run_sampler(dev, 8) == run_sampler("cpu", 8)
        sampler = SlotSampler(1, V, dev, [EOS])
        sampler.start(0, SamplingParams(temperature=0.0, logprobs=2), [1, 2])
        logits = torch.randn(1, V)
        r = sampler.sample(logits.to(dev), [0])
        assert r.ids.device.type == "caserve" and r.ids.cpu().tolist() == logits.argmax(-1).tolist()
        assert r.top_ids.cpu().tolist() == [logits[0].topk(2).indices.tolist()]
    finally:
        R.disconnect(dev)
