"""OpenAI sampling parameters end to end through the official ``openai`` client: each one changes the
output the way it should (checked against a direct forward of the same model in this process), and what
caserve cannot honour is refused with a 400 naming it. Layout: ``caserve serve`` with one native and one
CPU worker of ``caserve/tiny-gpt2`` (byte-level tokenizer: token id = byte, EOS 256)."""

from __future__ import annotations

import concurrent.futures as cf
import math
import time

import httpx
import openai
import pytest
import torch

from serving_procs import TINY, Cluster, openai_client

EOS = 256
PROMPT = "abc"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("params"))
    try:
        serve = c.router("--native-workers", "1", "--cpu-workers", "1", "--max-batch", "4", "--worker-threads", "1")
        # "ready" comes after serve's own probe request: a test that counts prefilled tokens must not see
        # the probe's arrive later (a shared 2-core machine can be slow)
        c.wait_for("ready", lambda: "ready: 2 worker(s)" in serve.log.read_text(errors="replace"), timeout=300)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster):
    return openai_client(cluster.url)


@pytest.fixture(scope="module")
def lm():
    from caserve.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)  # the same weights as the workers' (seeded random weights)


def forward_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``ids`` [T, vocab], one plain forward."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:, : len(lm.tokenizer)], dim=-1)


def complete(client, **kw):
    kw = {"model": TINY, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **kw}
    kw.setdefault("extra_body", {}).setdefault("ignore_eos", True)
    return client.completions.create(**kw)


def test_completion_logprobs_match_a_direct_forward(client, lm) -> None:
    resp = complete(client, logprobs=3)
    lp = resp.choices[0].logprobs
    ids = list(PROMPT.encode())
    assert len(lp.tokens) == len(lp.token_logprobs) == 12
    for step, (token_lp, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        ref = forward_logprobs(lm, ids)[-1]
        chosen = int(ref.argmax())  # greedy
        assert token_lp == pytest.approx(float(ref[chosen]), abs=1e-4)
        best = ref.topk(3).values.tolist()  # distinct ids may share a string (bytes >= 128 all show as U+FFFD)
        assert max(top.values()) == pytest.approx(best[0], abs=1e-4) and len(top) <= 4
        assert all(min(abs(v - b) for b in best) < 1e-4 for v in top.values())
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-6
        ids.append(chosen)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]


def test_echo_scores_the_prompt_like_a_direct_forward(client, lm) -> None:
    prompt = "The quick brown fox"
    for max_tokens in (0, 2):  # 0: scoring only, as evaluation harnesses ask
        resp = complete(client, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=1)
        choice = choice0 = resp.choices[0]
        assert choice.text.startswith(prompt) and len(choice.text) >= len(prompt) + (max_tokens > 0)
        lp = choice0.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first
        ids = list(prompt.encode())
        ref = forward_logprobs(lm, ids)
        want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert len(lp.tokens) == len(ids) + max_tokens
        assert "".join(lp.tokens) == choice.text
    plain = complete(client, prompt=list(prompt.encode()), max_tokens=3, echo=True)
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None


def test_echo_streams_the_prompt_first(client) -> None:
    """A streamed echo sends each choice's prompt (with its logprobs, the first one null) as that choice's
    first chunk, then its tokens: together the unstreamed answer, for a text prompt, a token-id prompt,
    scoring only (max_tokens 0), no logprobs, and n = 2."""
    for prompt, kw in (("The quick", {"max_tokens": 4, "logprobs": 1}), ([104, 105, 33], {"max_tokens": 3, "logprobs": 0}),
                       ("score me", {"max_tokens": 0, "logprobs": 2}), ("plain", {"max_tokens": 2}),
                       ("two", {"max_tokens": 3, "logprobs": 1, "n": 2, "temperature": 1.0, "seed": 4})):
        ref = complete(client, prompt=prompt, echo=True, **kw)
        chunks = [c.choices[0] for c in complete(client, prompt=prompt, echo=True, stream=True, **kw) if c.choices]
        for want in ref.choices:
            mine = [c for c in chunks if c.index == want.index]
            text = prompt if isinstance(prompt, str) else bytes(prompt).decode()
            assert mine[0].text == text, (prompt, mine[0])  # the prompt first, alone
            assert "".join(c.text for c in mine) == want.text
            if "logprobs" not in kw:
                assert all(c.logprobs is None for c in mine) and want.logprobs is None
                continue
            assert mine[0].logprobs.token_logprobs[0] is None and mine[0].logprobs.tokens == list(text)
            for field in ("tokens", "token_logprobs", "text_offset"):
                assert [x for c in mine if c.logprobs for x in getattr(c.logprobs, field)] == getattr(want.logprobs, field)


def test_chat_logprobs_and_top_logprobs(client) -> None:
    resp = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6)  # greedy took the top
        assert sum(math.exp(t.logprob) for t in item.top_logprobs) <= 1.0 + 1e-6
    assert "".join(i.token for i in content) == resp.choices[0].message.content
    off = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert off.choices[0].logprobs is None


def test_top_k_1_is_greedy_and_seeds_reproduce(client) -> None:
    greedy = complete(client, max_tokens=20).choices[0].text
    assert complete(client, max_tokens=20, temperature=1.5, seed=3, extra_body={"top_k": 1}).choices[0].text == greedy
    sampled = {complete(client, max_tokens=20, temperature=1.5, seed=s).choices[0].text for s in range(3)}
    assert len(sampled) > 1 and greedy not in sampled
    assert complete(client, max_tokens=20, temperature=1.5, seed=1, extra_body={"min_p": 0.5}).choices[0].text \
        != complete(client, max_tokens=20, temperature=1.5, seed=1).choices[0].text


def test_seeded_requests_agree_on_native_and_cpu_workers(client) -> None:
    with cf.ThreadPoolExecutor(4) as pool:
        resps = list(pool.map(lambda _: complete(client, max_tokens=30, temperature=1.0, seed=77, top_p=0.9),
                              range(6)))
    assert {r.model_extra["timings"]["worker_kind"] for r in resps} == {"native", "cpu"}
    assert len({r.choices[0].text for r in resps}) == 1


def test_penalties_change_repetition(client) -> None:
    ascii_only = {str(t): -100 for t in range(128, EOS + 6)}  # one character per token, so text shows ids

    def gen(**kw):
        return complete(client, max_tokens=30, logit_bias=ascii_only, **kw).choices[0].text

    greedy = gen()
    assert len(greedy) == 30 and len(set(greedy)) <= 3  # this random model repeats itself greedily
    assert len(set(gen(presence_penalty=2.0))) == 30  # every token seen is pushed below the unseen ones
    freq = gen(frequency_penalty=0.5)
    assert max(freq.count(c) for c in set(freq)) < max(greedy.count(c) for c in set(greedy))
    rep = gen(extra_body={"repetition_penalty": 2.0, "ignore_eos": True})
    assert max(rep.count(c) for c in set(rep)) < max(greedy.count(c) for c in set(greedy))


def test_logit_bias_forces_a_token_and_stop_token_ids_stop(client) -> None:
    forced = complete(client, max_tokens=8, logit_bias={str(ord("Q")): 100})
    assert forced.choices[0].text == "Q" * 8
    banned = complete(client, max_tokens=20, logit_bias={str(ord("c")): -100}).choices[0].text
    assert "c" not in banned
    stopped = complete(client, max_tokens=8, logit_bias={str(ord("Q")): 100},
                       extra_body={"stop_token_ids": [ord("Q")], "ignore_eos": True})
    assert stopped.choices[0].text == "" and stopped.choices[0].finish_reason == "stop"


def test_min_tokens_holds_eos_back(client) -> None:
    eos = {str(EOS): 100}
    early = complete(client, max_tokens=10, logit_bias=eos, extra_body={"ignore_eos": False})
    assert early.usage.completion_tokens == 0 and early.choices[0].finish_reason == "stop"
    held = complete(client, max_tokens=10, logit_bias=eos, extra_body={"ignore_eos": False, "min_tokens": 4})
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"


def settled_prefill_tokens(cluster: Cluster, at_least: float = 0.0, timeout: float = 20.0) -> float:
    """The router's count of prefilled prompt tokens once it reaches ``at_least`` and stops changing
    (workers report it about twice a second and when they become idle)."""
    deadline = time.monotonic() + timeout
    last = cluster.metric("caserve_prefill_tokens_total")
    while time.monotonic() < deadline:
        time.sleep(0.8)
        now = cluster.metric("caserve_prefill_tokens_total")
        if now == last and now >= at_least:
            return now
        last = now
    return last


def test_n_choices(cluster: Cluster, client) -> None:
    """Seeded choices differ and reproduce; greedy ones agree; the choices of a request are prefilled once."""
    before = settled_prefill_tokens(cluster)
    resp = complete(client, n=3, temperature=1.0, seed=5, max_tokens=10)
    assert [c.index for c in resp.choices] == [0, 1, 2] and len({c.text for c in resp.choices}) > 1
    prompt_tokens = resp.usage.prompt_tokens // 3  # usage counts the prompt once per choice
    assert settled_prefill_tokens(cluster, before + prompt_tokens) - before == prompt_tokens
    again = complete(client, n=3, temperature=1.0, seed=5, max_tokens=10)
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]
    assert resp.usage.completion_tokens == 30
    singles = [complete(client, temperature=1.0, seed=5 + j, max_tokens=10).choices[0].text for j in range(3)]
    assert singles == [c.text for c in resp.choices]  # choice j is the request seeded seed + j
    before = settled_prefill_tokens(cluster)
    chat = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}], n=3,
                                          max_tokens=4, temperature=0)
    assert len(chat.choices) == 3 and len({c.message.content for c in chat.choices}) == 1
    one = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                         temperature=0)
    assert chat.choices[0].message.content == one.choices[0].message.content
    assert settled_prefill_tokens(cluster, before + 2 * one.usage.prompt_tokens) - before == 2 * one.usage.prompt_tokens


def test_best_of_returns_the_candidates_with_the_highest_logprob_per_token(client) -> None:
    """best_of = 4, n = 2: the candidates are the requests seeded seed + j; the two with the highest mean
    logprob per token come back, best first, without logprobs unless asked; usage counts all four."""
    kw = {"temperature": 1.0, "max_tokens": 6}
    candidates = [complete(client, seed=11 + j, logprobs=0, **kw).choices[0] for j in range(4)]
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates]
    assert len(set(means)) == 4  # distinct, so the ranking is well defined
    ranked = sorted(range(4), key=lambda j: -means[j])
    resp = complete(client, seed=11, best_of=4, n=2, **kw)
    assert [c.text for c in resp.choices] == [candidates[j].text for j in ranked[:2]]
    assert [c.index for c in resp.choices] == [0, 1] and all(c.logprobs is None for c in resp.choices)
    assert resp.usage.completion_tokens == 4 * 6
    with_logprobs = complete(client, seed=11, best_of=4, logprobs=1, **kw).choices
    assert len(with_logprobs) == 1 and with_logprobs[0].text == candidates[ranked[0]].text
    assert with_logprobs[0].logprobs.token_logprobs == pytest.approx(candidates[ranked[0]].logprobs.token_logprobs)


def test_stream_carries_logprobs(client) -> None:
    ref = complete(client, logprobs=2, max_tokens=8)
    chunks = list(complete(client, logprobs=2, max_tokens=8, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == ref.choices[0].logprobs.tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.choices[0].text


def test_streamed_choices_equal_the_unstreamed_ones(client) -> None:
    """n > 1 and several prompts stream: each chunk names its choice (prompt * n + choice, as OpenAI
    numbers them), and each choice's text, logprobs and finish reason equal the request unstreamed."""
    kw = {"prompt": ["abc", "xyz"], "n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 6, "logprobs": 1}
    ref = complete(client, **kw)
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}, **kw))
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.logprobs.tokens if c.logprobs else [])
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1, 2, 3]
    assert [texts[i] for i in range(4)] == [c.text for c in ref.choices]
    assert len({texts[0], texts[1]}) == 2  # the choices of one prompt are sampled apart (seeds 7 and 8)
    assert [tokens[i] for i in range(4)] == [c.logprobs.tokens for c in ref.choices]
    assert [finish[i] for i in range(4)] == [c.finish_reason for c in ref.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens

    messages = [{"role": "user", "content": "x"}]
    ref = client.chat.completions.create(model=TINY, messages=messages, n=3, max_tokens=5, temperature=1.0, seed=3)
    content: dict[int, str] = {}
    roles = set()
    for chunk in client.chat.completions.create(model=TINY, messages=messages, n=3, max_tokens=5, temperature=1.0,
                                                seed=3, stream=True):
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
    assert roles == {0, 1, 2}
    assert [content[i] for i in range(3)] == [c.message.content for c in ref.choices]


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"best_of": 17}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"logprobs": True}, "logprobs"),  # True is not a count (True == 1 in Python)
    ({"echo": 1}, "echo"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"999999": 5}}, "vocabulary"),
    ({"stop_token_ids": [1 << 40]}, "vocabulary"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"top_k": -2}, "top_k"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
])
def test_unsupported_or_bad_parameters_are_400(cluster: Cluster, body: dict, param: str) -> None:
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60,
                   json={"model": TINY, "prompt": "x", "max_tokens": 3, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in (err["param"] or "") + err["message"]


def test_chat_refusals_and_ignored_unknown_fields(cluster: Cluster, client) -> None:
    base = {"model": TINY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    for body, param in [({"logprobs": 1}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"max_completion_tokens": 4096}, "max_tokens"), ({"echo": True}, "echo"),
                        ({"add_generation_prompt": False}, "add_generation_prompt"),
                        ({"continue_final_message": True}, "continue_final_message"),
                        ({"chat_template": "{{ messages }}"}, "chat_template")]:
        r = httpx.post(f"{cluster.url}/v1/chat/completions", json={**base, **body}, timeout=60)
        assert r.status_code == 400 and param in r.json()["error"]["param"] + r.json()["error"]["message"], r.text
    r = httpx.post(f"{cluster.url}/v1/chat/completions", json={**base, "some_future_field": {"a": 1},
                                                                "response_format": {"type": "text"}, "echo": False,
                                                                "add_generation_prompt": True}, timeout=60)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.BadRequestError) as info:  # prompt + max_tokens beyond the context
        client.completions.create(model=TINY, prompt="y" * 1000, max_tokens=100)
    assert info.value.body["code"] == "context_length_exceeded"
    assert complete(client, max_tokens=2).usage.completion_tokens == 2  # workers unharmed
