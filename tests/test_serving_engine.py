"""The slot engine in-process on CPU: rows joining and leaving under load give the tokens they give alone
(and those of Transformers' own greedy ``generate``), static batching gives the same tokens, long prompts
are prefilled in chunks while other slots keep decoding, a short row sent while a long one runs finishes
in a few steps, cancellation frees the slot at the next step, and an echo row's prompt logprobs
equal a plain forward's."""

from __future__ import annotations

import pytest
import torch
from msgspec.structs import replace

from caserve.models import DEFAULT_MODEL, load_model
from caserve.serving.messages import Done, Error, Progress, Row, SamplingParams, Tokens
from caserve.serving.worker.engine import Engine

GREEDY = SamplingParams(max_tokens=24, temperature=0, top_p=1, stop=[], seed=None, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=17, temperature=0.9, top_p=0.9, stop=[], seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def lm():
    return load_model(DEFAULT_MODEL)


def rows() -> list[Row]:
    return [
        Row(dispatch="a", job="a", task="generate", prompt="Hello", params=GREEDY),
        Row(dispatch="b", job="b", task="generate", prompt="A longer prompt here", params=SAMPLED),
        Row(dispatch="c", job="c", task="generate", prompt="Hi", params=GREEDY, prefix_ids=[70, 71, 72]),
    ]


def gen(name: str, prompt_ids: list[int], max_tokens: int) -> Row:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return Row(dispatch=name, job=name, task="generate", prompt_ids=prompt_ids, params=params)


def done(events: list) -> list[str]:
    return [e.dispatch for e in events if isinstance(e, Done)]


def tokens_of(events: list, names) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {n: [] for n in names}
    for e in events:
        if isinstance(e, Tokens):
            out[e.dispatch] += e.ids
    return out


def run(engine: Engine, batch: list[Row], cancelled=lambda d: False) -> dict[str, list[int]]:
    events: list = []
    engine.run(batch, events.append, cancelled)
    out = tokens_of(events, [r.dispatch for r in batch])
    assert sorted(done(events)) == sorted(out)  # one done per row
    return out


def test_rows_together_equal_rows_alone_static_batching_and_generate(lm) -> None:
    together = run(Engine(lm, max_batch=2), rows())  # 3 rows on 2 slots: c waits for a free slot
    assert [len(v) for v in together.values()] == [24, 17, 21]  # c continues: 24 - 3 already generated
    for row in rows():
        assert run(Engine(lm), [row])[row.dispatch] == together[row.dispatch]
    assert run(Engine(lm, batching="static"), rows()) == together
    ids = lm.tokenizer("Hello", return_tensors="pt")["input_ids"]
    vocab, width = len(lm.tokenizer), lm.model.config.vocab_size  # ids past the tokenizer's are never sampled
    with torch.inference_mode():
        want = lm.model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0,
                                 suppress_tokens=list(range(vocab, width)))
    assert together["a"] == want[0, ids.shape[1]:].tolist()


def test_join_and_leave_under_load_with_chunked_prefill(lm) -> None:
    """Rows arrive while others decode; a 300-token prompt is prefilled in 64-token chunks, one per
    step, while the running row keeps streaming; every row gets its tokens alone."""
    engine = Engine(lm, max_batch=3, chunk=64, step_tokens=64)
    arrivals = {0: [gen("r0", list(range(3, 40)), 30)], 3: [gen("long", [5 + i % 200 for i in range(300)], 8)],
                5: [gen("r1", list(range(60, 70)), 6), gen("r2", list(range(80, 85)), 12)],
                9: [gen("r3", list(range(90, 99)), 10)]}
    events: list = []
    step_of: dict[int, int] = {}  # event index -> step
    for step in range(200):
        engine.submit(arrivals.get(step, []))
        if not engine.busy:
            break
        engine.step(events.append, lambda d: False)
        for i in range(len(step_of), len(events)):
            step_of[i] = step
    names = [r.dispatch for batch in arrivals.values() for r in batch]
    got = tokens_of(events, names)
    for batch in arrivals.values():
        for row in batch:
            alone = Engine(lm, max_batch=3, chunk=64, step_tokens=64)
            assert run(alone, [row])[row.dispatch] == got[row.dispatch]
    # r0 kept streaming during the long prompt's 5 chunk steps (steps 3-7)
    r0_steps = {step_of[i] for i, e in enumerate(events) if isinstance(e, Tokens) and e.dispatch == "r0"}
    assert {3, 4, 5, 6, 7} <= r0_steps
    long_first = min(step_of[i] for i, e in enumerate(events) if isinstance(e, Tokens) and e.dispatch == "long")
    assert long_first >= 7  # 300 tokens at 64 per step: 5 chunks


def test_short_row_sent_while_a_long_one_runs_finishes_in_a_few_steps(lm) -> None:
    engine = Engine(lm, max_batch=2)
    events: list = []
    engine.submit([gen("long", list(range(3, 20)), 200)])
    for _ in range(10):
        engine.step(events.append, lambda d: False)
    engine.submit([gen("short", list(range(30, 34)), 4)])
    steps = 0
    while "short" not in done(events):
        engine.step(events.append, lambda d: False)
        steps += 1
    assert steps <= 5
    assert "long" not in done(events)


def test_cancelled_row_frees_its_slot_at_the_next_step_and_gets_no_done(lm) -> None:
    engine = Engine(lm, max_batch=1)
    events: list = []
    gone: set[str] = set()
    engine.submit([gen("x", list(range(3, 10)), 100), gen("y", list(range(3, 10)), 3)])
    for _ in range(3):
        engine.step(events.append, gone.__contains__)
    assert engine.occupied == 1 and len(engine.pending) == 1  # y waits for x's slot
    gone.add("x")
    engine.step(events.append, gone.__contains__)  # x's slot is freed and y takes it in this step
    assert [s.row.dispatch for s in engine.active if s is not None] == ["y"]
    while engine.busy:
        engine.step(events.append, gone.__contains__)
    assert done(events) == ["y"]
    got = tokens_of(events, ["x", "y"])
    assert len(got["x"]) < 10 and len(got["y"]) == 3


def test_bad_rows_are_refused_and_the_others_served(lm) -> None:
    events: list = []
    Engine(lm).run([gen("bad", [10**6], 4), gen("ok", [5, 6], 4), gen("long", [5] * 5000, 4)],
                   events.append, lambda d: False)
    errors = {e.dispatch: e.error_type for e in events if isinstance(e, Error)}
    assert errors == {"bad": "bad_request", "long": "context_length_exceeded"}
    assert done(events) == ["ok"]
    with pytest.raises(ValueError):
        Engine(lm, batching="dynamic")


def echoed(events: list, dispatch: str) -> list:
    """An echo row's prompt logprobs: sent once, with its first event (``Tokens``, or ``Done`` when it
    generated nothing), together with the prompt's text."""
    carrying = [e for e in events if isinstance(e, (Tokens, Done)) and e.dispatch == dispatch
                and e.prompt_logprobs is not None]
    first = next(e for e in events if isinstance(e, (Tokens, Done)) and e.dispatch == dispatch)
    assert carrying == [first] and first.prompt_text is not None
    return first.prompt_logprobs


def test_echo_prompt_logprobs_across_prefill_chunks_equal_a_plain_forward(lm) -> None:
    """A prompt longer than a chunk is scored chunk by chunk; the logprobs are those of one forward."""
    prompt = [(7 * i) % 250 + 3 for i in range(150)]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    events: list = []
    engine = Engine(lm, max_batch=2, chunk=64)
    score_only = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0)  # echo, max_tokens 0
    engine.run([Row(dispatch="e", job="e", task="generate", prompt_ids=prompt, params=params),
                gen("other", [5, 6, 7], 6),
                Row(dispatch="z", job="z", task="generate", prompt_ids=prompt[:70], params=score_only)],
               events.append, lambda d: False)
    (scored,) = [e for e in events if isinstance(e, Done) and e.dispatch == "z"]
    assert scored.finish_reason == "length" and len(echoed(events, "z")) == 70
    assert not [e for e in events if isinstance(e, Tokens) and e.dispatch == "z"]
    entries = echoed(events, "e")
    assert [e.id for e in entries] == prompt and entries[0].logprob is None
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(torch.tensor([prompt])).logits[0, :, : engine.vocab].float(), -1)
    want = [float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    assert [e.logprob for e in entries[1:]] == pytest.approx(want, abs=1e-4)
    assert all(len(e.top) == 2 for e in entries[1:])
    generated = [lp for e in events if isinstance(e, Tokens) and e.dispatch == "e" for lp in (e.logprobs or [])]
    assert len(generated) == 2 and generated[0].logprob == pytest.approx(float(ref[-1].max()), abs=1e-4)


def choices(name: str, prompt_ids: list[int], params: SamplingParams, n: int, group: str | None = "g") -> list[Row]:
    """The n choices of one request as the router sends them (choice j seeded seed + j when seeded)."""
    seeded = [replace(params, seed=params.seed + j) if params.seed is not None else params for j in range(n)]
    return [Row(dispatch=f"{name}{j}", job=f"{name}{j}", task="generate", prompt_ids=prompt_ids, params=p,
                prompt_group=group) for j, p in enumerate(seeded)]


def test_n_choices_share_one_prefill_and_give_the_tokens_of_separate_prefills(lm) -> None:
    """The choices of one request (``prompt_group``) are prefilled once (a 150-token prompt in 64-token
    chunks) and copied into the other slots; greedy choices equal one choice alone, and seeded ones
    give exactly the tokens of separate prefills (rows without a group, as before sharing existed)."""
    prompt = [(11 * i) % 240 + 3 for i in range(150)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = Engine(lm, max_batch=4, chunk=64)
    events: list = []
    stats = engine.run(choices("g", prompt, greedy, 3), events.append, lambda d: False)
    got = tokens_of(events, ["g0", "g1", "g2"])
    assert stats.prefill_tokens == len(prompt)  # one prefill, not three
    alone = run(Engine(lm, max_batch=4, chunk=64), [gen("one", prompt, 12)])["one"]
    assert got == {"g0": alone, "g1": alone, "g2": alone}
    sampled = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=21, ignore_eos=True)
    events = []
    shared_stats = engine.run(choices("s", prompt, sampled, 2), events.append, lambda d: False)
    shared = tokens_of(events, ["s0", "s1"])
    assert shared_stats.prefill_tokens == len(prompt) and shared["s0"] != shared["s1"]
    sep: list = []
    separate_stats = Engine(lm, max_batch=4, chunk=64).run(choices("s", prompt, sampled, 2, group=None), sep.append,
                                                          lambda d: False)
    assert separate_stats.prefill_tokens == 2 * len(prompt)
    assert tokens_of(sep, ["s0", "s1"]) == shared
    # with other rows decoding meanwhile, and in a static batch: the same tokens
    mixed = run(Engine(lm, max_batch=4, chunk=64), [gen("other", [5, 6, 7], 20)] + choices("s", prompt, sampled, 2))
    assert {k: mixed[k] for k in ("s0", "s1")} == shared
    assert run(Engine(lm, max_batch=4, chunk=64, batching="static"), choices("s", prompt, sampled, 2)) == shared


def test_a_cancelled_first_choice_hands_the_prefill_to_the_next(lm) -> None:
    """The choice doing the shared prefill is cancelled half-way: the next one prefills for the rest, whose
    tokens stay those of a choice alone; an echo request's choices all get the prompt's logprobs."""
    prompt = [(13 * i) % 240 + 3 for i in range(150)]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = Engine(lm, max_batch=4, chunk=64, step_tokens=64)
    events: list = []
    gone: set[str] = set()
    engine.submit(choices("c", prompt, greedy, 3))
    engine.step(events.append, gone.__contains__)  # the first 64-token chunk of c0
    gone.add("c0")
    while engine.busy:
        engine.step(events.append, gone.__contains__)
    got = tokens_of(events, ["c0", "c1", "c2"])
    alone = run(Engine(lm, max_batch=4, chunk=64), [gen("one", prompt, 6)])["one"]
    assert got["c0"] == [] and got["c1"] == got["c2"] == alone and sorted(done(events)) == ["c1", "c2"]
    assert engine.take_stats().prefill_tokens == 64 + len(prompt)  # c0's first chunk, then c1's prefill
    echo = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1)
    events = []
    stats = engine.run(choices("e", prompt[:70], echo, 2), events.append, lambda d: False)
    assert stats.prefill_tokens == 70
    scored = [echoed(events, d) for d in ("e0", "e1")]
    assert len(scored[0]) == 70 and scored[0] == scored[1]


def test_a_decode_step_runs_only_the_slots_in_use(lm) -> None:
    """Rows take the lowest free slots and a decode step runs the slots up to the highest decoding one
    (on a remote device: the power of two covering it, tests/test_remote_capture.py); a static batch
    keeps the width it was admitted with, a power of two."""
    for batching, want in (("continuous", {1, 3}), ("static", {4})):
        engine = Engine(lm, max_batch=8, batching=batching)
        widths: list[int] = []
        forward = engine._forward

        def recorded(ids, *args, forward=forward, widths=widths):
            if ids.shape[1] == 1:  # a decode step (prefill chunks are 64 wide or more)
                widths.append(ids.shape[0])
            return forward(ids, *args)

        engine._forward = recorded
        batch = [gen(f"r{i}", list(range(3 + i, 9 + i)), n) for i, n in enumerate((20, 3, 6))]
        got = run(engine, batch)
        assert set(widths) == want, (batching, widths)
        assert widths[0] == (3 if batching == "continuous" else 4)
        assert widths[-1] == (1 if batching == "continuous" else 4)
        for row in batch:
            assert run(Engine(lm), [row])[row.dispatch] == got[row.dispatch]


def test_serve_hands_over_each_steps_events_together_in_order(lm) -> None:
    """The worker's loop gets one list of events per step (one hand-over to its event loop, not one
    per token): the same events, in the same order, as a per-event ``run`` of the same rows."""
    import threading

    batch = [gen(f"s{i}", list(range(5 + i, 12 + i)), n) for i, n in enumerate((9, 4, 7))]
    alone: list = []
    Engine(lm, max_batch=4).run(batch, alone.append, lambda d: False)

    engine = Engine(lm, max_batch=4)
    flushed: list[list] = []
    stop = threading.Event()

    def flush(events: list) -> None:
        flushed.append(list(events))
        if sum(isinstance(e, Done) for b in flushed for e in b) == len(batch):
            stop.set()

    engine.submit(batch)
    thread = threading.Thread(target=engine.serve, args=(flush, lambda d: False, stop))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    def untimed(events: list) -> list:
        return [replace(e, durations={}) if isinstance(e, Done) else e for e in events]

    events = [e for b in flushed for e in b if not isinstance(e, Progress)]
    assert untimed(events) == untimed(alone)  # nothing lost, nothing reordered
    assert all(flushed)  # no empty hand-overs
    # each decode step's tokens travel together: far fewer hand-overs than tokens
    n_tokens = sum(len(e.ids) for e in events if isinstance(e, Tokens))
    assert max(sum(isinstance(e, Tokens) for e in b) for b in flushed) >= 3
    assert len(flushed) <= 9 + 2 < n_tokens


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "Qwen/Qwen2.5-0.5B", "facebook/opt-125m"])
def test_decode_rows_attend_over_their_own_columns_and_give_the_same_tokens(name, lm, monkeypatch) -> None:
    """With rows of very different lengths in one step, each row attends over exactly its own columns
    (the varlen kernel), or, without the kernel, each run of slots over its own window (smaller keys for
    the short rows); every row gets the same tokens in each case, with neither, and alone.
    GPT-2, Qwen2 (grouped-query attention) and OPT, shrunk."""
    from caserve.serving.worker import attention

    if name != DEFAULT_MODEL:
        lm = load_model(name, shrink=True)

    widths: list[tuple[int, int]] = []  # (rows, key columns) of every decode SDPA call
    plain = attention.sdpa_attention_forward

    def recorded(module, query, key, *args, **kwargs):
        if query.shape[2] == 1:
            widths.append((query.shape[0], key.shape[2]))
        return plain(module, query, key, *args, **kwargs)

    kernel = attention.load_kernel()
    assert kernel is not None  # a C compiler is part of the machine (and of CI's)
    ranges: list[tuple[list[int], list[int]]] = []  # (lo, hi) of every kernel call

    class Recording:
        supports = staticmethod(kernel.supports)

        def __call__(self, query, key, value, layout, scale):
            ranges.append((layout.lo.tolist(), layout.hi.tolist()))
            return kernel(query, key, value, layout, scale)

    monkeypatch.setattr(attention, "sdpa_attention_forward", recorded)
    monkeypatch.setattr(attention, "load_kernel", Recording)
    # a 300-token prompt in slot 1, short ones around it
    batch = [gen("s0", [7, 8, 9], 40), gen("long", [5 + i % 200 for i in range(300)], 40),
             gen("s2", [11, 12], 40), gen("s3", [13, 14, 15, 16], 40)]
    engine = Engine(lm, max_batch=4)
    assert engine.runs and engine.kernel
    got = run(engine, batch)
    assert not widths  # no decode step went through SDPA
    # steps with all four rows decoding: each row reads its own prompt and tokens so far, no more
    full = [(lo, hi) for lo, hi in ranges if len(hi) == 4 and hi[1] - hi[0] == 297]
    assert full and all(lo == [0, 0, 0, 0] and hi[2] == hi[0] - 1 and hi[3] == hi[0] + 1 for lo, hi in full)
    assert max(hi[1] for _, hi in ranges) <= 300 + 40

    runs = Engine(lm, max_batch=4)
    runs.kernel = False
    runs.run_cost = 1  # split whenever it reads fewer columns
    assert run(runs, batch) == got
    assert (1, 384) in widths and (1, 128) in widths and (2, 128) in widths, set(widths)
    assert all(cols <= 384 for _, cols in widths)
    off = Engine(lm, max_batch=4)
    off.runs = off.kernel = False
    assert run(off, batch) == got
    for row in batch:
        assert run(Engine(lm), [row])[row.dispatch] == got[row.dispatch]


def test_plan_runs_is_the_cheapest_split_into_consecutive_runs() -> None:
    """Against every split of up to 9 slots: the plan covers the slots in order, each run's window
    is its slots' largest, and no split reads fewer columns plus run costs."""
    import itertools
    import random

    from caserve.serving.worker.attention import plan_runs

    def cost(plan, run_cost):
        return sum(run_cost + (b - a) * w for a, b, w in plan)

    assert plan_runs([128] * 8) == ((0, 8, 128),)
    assert plan_runs([1024, 128, 128, 128], run_cost=0) == ((0, 1, 1024), (1, 4, 128))
    assert plan_runs([1024, 128, 128, 128], run_cost=4096) == ((0, 4, 1024),)
    rng = random.Random(5)
    for _ in range(300):
        n, run_cost = rng.randint(1, 9), rng.choice([0, 128, 1024, 5000])
        windows = [128 * rng.randint(1, 16) for _ in range(n)]
        plan = plan_runs(windows, run_cost)
        assert [a for a, _, _ in plan] == [0] + [b for _, b, _ in plan[:-1]] and plan[-1][1] == n
        assert all(w == max(windows[a:b]) for a, b, w in plan)
        best = min(cost([(a, b, max(windows[a:b])) for a, b in zip((0,) + cuts, cuts + (n,))], run_cost)
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        assert cost(plan, run_cost) == best
    many = plan_runs([128 * (1 + i % 5) for i in range(64)], run_cost=0)  # 64 slots: blocks of 4
    assert all((b - a) % 4 == 0 for a, b, _ in many)


def test_a_choice_admitted_after_its_siblings_copies_their_prefill(lm) -> None:
    """Three choices, two free slots: the third is admitted only when another row frees its slot, while
    its siblings decode; it copies their prompt columns and prefills one token, and gets the tokens of
    a separate prefill (greedy: those of one choice alone; seeded: those of a row without a group)."""
    prompt = [(7 * i) % 240 + 3 for i in range(150)]
    for params in (SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)):
        engine = Engine(lm, max_batch=3, chunk=64)
        events: list = []
        other = gen("other", [9, 8, 7], 3)
        stats = engine.run([other] + choices("c", prompt, params, 3), events.append, lambda d: False)
        got = tokens_of(events, ["other", "c0", "c1", "c2"])
        del got["other"]
        assert stats.prefill_tokens == 3 + len(prompt) + 1  # other's prompt, one shared prefill, one token
        sep: list = []
        Engine(lm, max_batch=3, chunk=64).run(choices("c", prompt, params, 3, group=None), sep.append,
                                              lambda d: False)
        assert tokens_of(sep, ["c0", "c1", "c2"]) == got and all(len(v) == 30 for v in got.values())
    echo = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prompt_logprobs=1)
    stats = Engine(lm, max_batch=3, chunk=64).run([gen("other", [9, 8, 7], 3)] + choices("e", prompt, echo, 3),
                                                  lambda e: None, lambda d: False)
    assert stats.prefill_tokens == 3 + 2 * len(prompt)  # an echo choice scores its whole prompt itself
