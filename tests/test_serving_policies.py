"""Dispatch policies, the service-time model, the router's requeue bookkeeping, sampling and text
deltas: in-process and fast (no sockets)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caserve.models import byte_level_tokenizer
from caserve.serving.errors import ModelNotFound, QueueFull
import msgspec

from caserve.serving.messages import TASK_EMBED, TASK_GENERATE, Event, Run, SamplingParams
from caserve.serving.router.jobs import Job, JobState
from caserve.serving.router.policies import EctPolicy, FcfsPolicy, ServiceModel, make_policy
from caserve.serving.router.router import Router
from caserve.serving.worker.detokenize import TextTracker
from caserve.serving.worker.sampling import SlotSampler


@dataclass
class W:
    """A worker as policies see it; by default static-like: all slots free when idle, none when busy."""

    id: str
    kind: str = "cpu"
    max_batch: int = 1
    idle_since: Optional[float] = 0.0
    busy_since: Optional[float] = None
    batch_estimate_s: float = 0.0
    free_slots: int = -1
    running: int = 0
    slot_free_at: float = 0.0
    groups: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.free_slots < 0:
            self.free_slots = self.max_batch if self.idle_since is not None else 0
        if self.idle_since is None:
            self.running = max(self.running, 1)
            self.slot_free_at = (self.busy_since or 0.0) + self.batch_estimate_s


def job(units: int = 10, max_tokens: int = 10, task: str = TASK_GENERATE) -> Job:
    return Job("m", task, {"prompt": "x" * units, "params": SamplingParams(max_tokens=max_tokens)}, prompt_units=units, max_tokens=max_tokens)


def events(raw: list[dict]) -> list[Event]:
    """Worker events as the router receives them: validated into the message structs."""
    return msgspec.convert(raw, list[Event])


def test_factory_builds_both_policies_and_refuses_others() -> None:
    assert isinstance(make_policy("fcfs"), FcfsPolicy)
    assert isinstance(make_policy("ect"), EctPolicy)
    with pytest.raises(ValueError):
        make_policy("random")


def test_fcfs_longest_idle_worker_takes_the_head_with_a_batch() -> None:
    q = [job(), job(), job()]
    a, b = W("a", max_batch=2, idle_since=5.0), W("b", max_batch=2, idle_since=3.0)
    out = make_policy("fcfs").assign(q, [a, b], now=10.0)
    assert [(w.id, batch) for w, batch in out] == [("b", [q[0], q[1]]), ("a", [q[2]])]


def test_fcfs_spreads_a_queue_over_idle_workers() -> None:
    q = [job() for _ in range(6)]
    out = make_policy("fcfs").assign(q, [W("a", max_batch=8, idle_since=1.0), W("b", max_batch=8, idle_since=2.0),
                                         W("c", max_batch=1, idle_since=3.0)], now=5.0)
    assert [(w.id, len(b)) for w, b in out] == [("a", 3), ("b", 2), ("c", 1)]
    assert [j for _, b in out for j in b] == q


def test_fcfs_skips_busy_workers_and_batches_only_compatible_jobs() -> None:
    q = [job(), job(task=TASK_EMBED), job()]
    busy = W("busy", max_batch=4, idle_since=None, busy_since=1.0)
    idle = W("idle", max_batch=4)
    out = make_policy("fcfs").assign(q, [busy, idle], now=2.0)
    assert [(w.id, batch) for w, batch in out] == [("idle", [q[0], q[2]])]


@settings(max_examples=60, deadline=None)
@given(n_jobs=st.integers(0, 12), caps=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       idle=st.lists(st.booleans(), min_size=4, max_size=4))
def test_fcfs_serves_exactly_the_oldest_jobs_that_fit(n_jobs: int, caps: list[int], idle: list[bool]) -> None:
    q = [job() for _ in range(n_jobs)]
    workers = [W(f"w{i}", max_batch=c, idle_since=float(i) if idle[i] else None) for i, c in enumerate(caps)]
    out = make_policy("fcfs").assign(q, workers, now=10.0)
    assigned = [j for _, batch in out for j in batch]
    capacity = sum(w.max_batch for w in workers if w.idle_since is not None)
    assert len(assigned) == len(set(map(id, assigned))) == min(n_jobs, capacity)
    for w1, b1 in out:  # spread, not piled on one worker: a batch 2+ longer than another means
        for w2, b2 in out:  # the other worker is at its max_batch
            assert len(b1) <= len(b2) + 1 or len(b2) == w2.max_batch
    assert set(map(id, assigned)) == set(map(id, q[: len(assigned)]))
    assert all(w.idle_since is not None and len(b) <= w.max_batch for w, b in out)
    assert len({w.id for w, _ in out}) == len(out)


def trained(fast_step: float, slow_step: float) -> ServiceModel:
    svc = ServiceModel()
    svc.observe("fast", "native", prompt_units=10, steps=100, prefill_s=0.01, decode_s=100 * fast_step, observed_s=100 * fast_step + 0.01)
    svc.observe("slow", "assisted", prompt_units=10, steps=100, prefill_s=0.01, decode_s=100 * slow_step, observed_s=100 * slow_step + 0.01)
    return svc


def test_service_model_learns_linear_rates_and_lends_them_to_new_workers() -> None:
    svc = trained(0.001, 0.01)
    assert svc.estimate("fast", "native", 10, 100) == pytest.approx(0.11, rel=1e-6)
    assert svc.estimate("slow", "assisted", 10, 200) == pytest.approx(2.01, rel=1e-6)
    assert svc.estimate("new", "assisted", 10, 100) == svc.estimate("slow", "assisted", 10, 100)
    assert ServiceModel().estimate("anyone", "cpu", 100, 100) == 0.0  # unknown: looks fast, gets tried


def test_ect_waits_for_the_fast_worker_when_it_finishes_sooner() -> None:
    svc = trained(fast_step=0.001, slow_step=0.05)
    fast = W("fast", "native", idle_since=None, busy_since=9.9, batch_estimate_s=0.2)  # free at 10.1
    slow = W("slow", "assisted")
    q = [job(max_tokens=100)]
    assert EctPolicy(svc).assign(q, [fast, slow], now=10.0) == []  # 10.1 + 0.11 < 10 + 5.01
    assert [(w.id, b) for w, b in FcfsPolicy(svc).assign(q, [fast, slow], now=10.0)] == [("slow", q)]


def test_ect_later_jobs_take_the_slow_worker_once_the_fast_one_is_reserved() -> None:
    svc = trained(fast_step=0.01, slow_step=0.02)
    fast = W("fast", "native", idle_since=None, busy_since=9.9, batch_estimate_s=0.2)
    slow = W("slow", "assisted")
    q = [job(max_tokens=100) for _ in range(3)]
    out = EctPolicy(svc).assign(q, [fast, slow], now=10.0)
    # job 0: fast at 10.1 + 1.01 beats slow at 10 + 2.01 -> waits; job 1: fast would be 12.13, slow 12.01
    assert [(w.id, b) for w, b in out] == [("slow", [q[1]])]


def test_ect_tries_an_unmeasured_worker_before_waiting_for_a_measured_one() -> None:
    svc = trained(fast_step=0.001, slow_step=0.05)
    fast = W("fast", "native")  # idle and known fast
    new = W("new", "assisted")  # never measured: it would borrow slow's rates, but ECT explores it
    assert svc.estimate("new", "assisted", 10, 100) > svc.estimate("fast", "native", 10, 100)
    out = EctPolicy(svc).assign([job(max_tokens=100)], [fast, new], now=1.0)
    assert [w.id for w, _ in out] == ["new"]


def test_ect_uses_idle_workers_when_nothing_is_known() -> None:
    q = [job(), job()]
    out = EctPolicy(ServiceModel()).assign(q, [W("a", idle_since=None, busy_since=0.0), W("b"), W("c")], now=1.0)
    assert sorted(w.id for w, _ in out) == ["b", "c"]


def test_router_requeues_a_lost_workers_job_and_ignores_its_late_events() -> None:
    async def scenario() -> None:
        router = Router(policy="fcfs", max_queue=2)
        with pytest.raises(ModelNotFound):
            router.submit([job()])
        a = router.register(worker_id="a", kind="cpu", model="m", task="causal-lm", max_batch=1, max_context=64)
        router.channel_opened(a)
        j = job()
        router.submit([j])
        assert j.state is JobState.RUNNING and j.worker_id == "a"
        first = j.dispatch_id
        router.handle_events(a, events([{"type": "tokens", "dispatch": first, "ids": [1, 2], "text": "ab"}]))
        b = router.register(worker_id="b", kind="cpu", model="m", task="causal-lm", max_batch=1, max_context=64)
        router.channel_opened(b)
        router.worker_lost(a, "killed")
        assert j.state is JobState.RUNNING and j.worker_id == "b" and j.attempts == 2
        run = b.outbox.get_nowait()
        assert isinstance(run, Run) and run.rows[0].prefix_ids == [1, 2]  # continue, do not restart
        router.handle_events(a, events([{"type": "tokens", "dispatch": first, "ids": [9], "text": "z"}]))  # stale
        router.handle_events(b, events([{"type": "tokens", "dispatch": j.dispatch_id, "ids": [3], "text": "c"},
                                 {"type": "done", "dispatch": j.dispatch_id, "finish_reason": "length",
                                  "prompt_tokens": 1},
                                 {"type": "done", "dispatch": j.dispatch_id, "finish_reason": "stop"}]))
        assert j.state is JobState.DONE and j.text == "abc" and j.completion_tokens == 3
        assert j.finish_reason == "length"
        seen = []
        while not j.events.empty():
            seen.append(j.events.get_nowait())
        assert seen == [(0, "delta", ("ab", [])), (0, "delta", ("c", [])), (0, "done", None)]  # exactly once

    asyncio.run(scenario())


def test_router_takes_an_echo_prompt_once_and_only_when_asked() -> None:
    """An echo job's prompt logprobs and text are kept from the first event that carries them (a prompt
    event before its tokens; a requeued attempt's copy is ignored); a job that did not ask for echo never
    takes them, whatever a worker sends."""
    prompt = [{"id": 120, "token": "x", "logprob": None}, {"id": 121, "token": "y", "logprob": -1.5}]

    async def scenario() -> None:
        router = Router(policy="fcfs", max_queue=4)
        a = router.register(worker_id="a", kind="cpu", model="m", task="causal-lm", max_batch=2, max_context=64)
        router.channel_opened(a)
        echo = Job("m", TASK_GENERATE, {"prompt": "xy", "params": SamplingParams(max_tokens=2, prompt_logprobs=0)},
                   prompt_units=2, max_tokens=2)
        plain = job()
        router.submit([echo])
        router.submit([plain])
        router.handle_events(a, events([
            {"type": "tokens", "dispatch": echo.dispatch_id, "ids": [1], "text": "a", "prompt_logprobs": prompt,
             "prompt_text": "xy"},
            {"type": "tokens", "dispatch": plain.dispatch_id, "ids": [1], "text": "a", "prompt_logprobs": prompt,
             "prompt_text": "forged"},
            {"type": "tokens", "dispatch": echo.dispatch_id, "ids": [2], "text": "b", "prompt_logprobs": prompt[:1],
             "prompt_text": "again"},
            {"type": "done", "dispatch": echo.dispatch_id, "finish_reason": "length", "prompt_tokens": 2},
            {"type": "done", "dispatch": plain.dispatch_id, "finish_reason": "length", "prompt_tokens": 2,
             "prompt_logprobs": prompt, "prompt_text": "forged"}]))
        assert echo.prompt_text == "xy" and [e.token for e in echo.prompt_logprobs] == ["x", "y"]
        assert plain.prompt_text is None and plain.prompt_logprobs is None
        for j in (echo, plain):
            seen = []
            while not j.events.empty():
                seen.append(j.events.get_nowait()[1])
            assert seen == (["prompt", "delta", "delta", "done"] if j is echo else ["delta", "done"])

    asyncio.run(scenario())


def test_router_admission_control_refuses_beyond_max_queue() -> None:
    async def scenario() -> None:
        router = Router(max_queue=2)
        router.register(worker_id="a", kind="cpu", model="m", task="causal-lm", max_batch=1, max_context=64)
        router.submit([job(), job()])  # no open channel yet: both wait
        with pytest.raises(QueueFull) as info:
            router.submit([job()])
        assert info.value.status == 429 and int(info.value.headers()["Retry-After"]) >= 1

    asyncio.run(scenario())


def test_text_tracker_holds_back_possible_stop_strings() -> None:
    tok = byte_level_tokenizer()
    t = TextTracker(tok, ["XY"])
    out = [t.add(i) for i in tok("abXYcd")["input_ids"]]
    assert "".join(out) == "ab" and t.stopped
    t = TextTracker(tok, [])
    ids = tok("é!")["input_ids"]  # é is two byte tokens: nothing is emitted for its first half
    assert [t.add(i) for i in ids] == ["", "é", "!"]
    t = TextTracker(tok, [], prefix_ids=tok("hi")["input_ids"])
    assert t.add(tok("!")["input_ids"][0]) == "!" and t.flush() == ""
    # a requeued row: the earlier attempt delivered "ab" and held "X" back (it could start "XY")
    t = TextTracker(tok, ["XY"], prefix_ids=tok("abX")["input_ids"], prefix_chars_sent=2)
    assert t.add(tok("c")["input_ids"][0]) == "X" and t.flush() == "c"


def test_sampling_greedy_top_p_and_seed() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    sampler = SlotSampler(1, 4, "cpu", [])

    def draw(**kw) -> int:
        sampler.start(0, SamplingParams(**kw), [0])
        return int(sampler.sample(logits, [0]).ids)

    assert draw(temperature=0.0) == 1
    assert {draw(temperature=1.0, top_p=0.01, seed=s) for s in range(20)} == {1}
    assert len({draw(temperature=1.0, seed=5) for _ in range(3)}) == 1
    assert len({draw(temperature=2.0, seed=s) for s in range(50)}) > 2



def test_both_policies_dispatch_into_free_slots_of_busy_continuous_workers() -> None:
    q = [job() for _ in range(5)]
    busy = W("busy", max_batch=4, idle_since=None, busy_since=0.0, free_slots=2, running=2)
    full = W("full", max_batch=2, idle_since=None, busy_since=0.0, free_slots=0, running=2)
    for policy in (make_policy("fcfs"), make_policy("ect")):
        out = policy.assign(q, [busy, full], now=1.0)
        assert [(w.id, b) for w, b in out] == [("busy", q[:2])], policy.name  # at most its free slots


def test_service_model_learns_step_cost_growing_with_occupancy() -> None:
    svc = ServiceModel()
    for k in (1, 4, 2, 8, 1, 6):  # a step running k slots takes 10 ms + 2 ms per extra slot
        svc.observe_steps("w", "cpu", steps=10, decode_s=10 * (0.010 + 0.002 * (k - 1)), occupancy=10 * k)
    r = svc.rates("w", "cpu")
    assert r.step_s == pytest.approx(0.010, rel=1e-3) and r.slot_s == pytest.approx(0.002, rel=1e-3)
    assert svc.estimate("w", "cpu", 0, 100, occupancy=5) == pytest.approx(100 * 0.018, rel=1e-3)
    # ECT: a job goes to the emptier of two equally fast workers
    full = W("w", max_batch=8, idle_since=None, busy_since=0.0, free_slots=1, running=7)
    svc.observe_steps("v", "cpu", steps=10, decode_s=0.1, occupancy=10)
    svc.observe_steps("v", "cpu", steps=10, decode_s=0.12, occupancy=20)
    empty = W("v", max_batch=8, idle_since=None, busy_since=0.0, free_slots=7, running=1)
    out = EctPolicy(svc).assign([job(max_tokens=50)], [full, empty], now=1.0)
    assert [w.id for w, _ in out] == ["v"]


def test_both_policies_keep_the_choices_of_one_request_on_one_worker() -> None:
    """A worker prefills the n choices of a request once only if it gets them together: the water-filling
    share (2 and 1 here) is stretched to a group's end where the worker has room, and never past it."""
    group = [Job("m", TASK_GENERATE, {"prompt": "x", "prompt_group": "g", "params": SamplingParams()},
                 prompt_units=1, max_tokens=10) for _ in range(3)]
    for policy in (make_policy("fcfs"), make_policy("ect")):
        a, b = W("a", max_batch=4), W("b", max_batch=4)
        out = policy.assign(group + [job()], [a, b], now=1.0)
        batches = {w.id: batch for w, batch in out}
        assert any(batch[:3] == group for batch in batches.values()), (policy.name, batches)
        assert sum(len(batch) for batch in batches.values()) == 4
        tight = W("t", max_batch=2)  # no room for all three: the group is split, nothing else breaks
        out = policy.assign(group, [tight], now=1.0)
        assert [batch for _, batch in out] == [group[:2]], policy.name


def test_fcfs_sends_the_choices_of_one_request_to_a_worker_with_room_for_all() -> None:
    """FCFS's first pick (the longest idle) has room for two of three choices, the other worker for all
    three: they go together to the second (one prefill), and the next job to the first. Without such a
    worker the group is split as before; a job of one choice still takes the first pick."""
    group = [Job("m", TASK_GENERATE, {"prompt": "x", "prompt_group": "g", "params": SamplingParams()},
                 prompt_units=1, max_tokens=10) for _ in range(3)]
    plain = job()
    small = W("small", max_batch=4, idle_since=0.0, free_slots=2)
    roomy = W("roomy", max_batch=8, idle_since=0.5)
    out = make_policy("fcfs").assign(group + [plain], [roomy, small], now=1.0)
    assert [(w.id, batch) for w, batch in out] == [("roomy", group), ("small", [plain])]
    assert make_policy("fcfs").assign([plain], [roomy, small], now=1.0) == [(small, [plain])]
    cramped = W("cramped", max_batch=2, idle_since=0.5, free_slots=2)
    out = make_policy("fcfs").assign(group, [cramped, small], now=1.0)
    assert [(w.id, batch) for w, batch in out] == [("small", group[:2]), ("cramped", group[2:])]


def test_a_later_choice_goes_where_its_siblings_run_and_skips_the_prefill_there() -> None:
    """The choices a worker had no room for go, when a slot frees, to the worker that runs their siblings
    (it copies the prompt's KV from them): FCFS prefers it among the workers with free slots; ECT counts
    no prefill there and waits for it when that is sooner, and not when it is later."""
    def choice() -> Job:
        return Job("m", TASK_GENERATE, {"prompt": "x" * 4000, "prompt_group": "g", "params": SamplingParams()},
                   prompt_units=4000, max_tokens=10)
    later = choice()
    home = W("home", max_batch=4, idle_since=None, busy_since=0.0, free_slots=1, running=3, groups=frozenset({"g"}))
    other = W("other", max_batch=4, idle_since=0.5)  # idle longer: FCFS's first pick without the group
    out = make_policy("fcfs").assign([later, job()], [other, home], now=1.0)
    assert [(w.id, b) for w, b in out] == [("home", [later]), ("other", [out[1][1][0]])]
    assert make_policy("fcfs").assign([job()], [other, home], now=1.0)[0][0].id == "other"  # no group: as before

    svc = ServiceModel()
    for w in ("home", "other"):  # 1 ms per prompt unit, 10 ms per step
        svc.observe(w, "cpu", prompt_units=1000, steps=10, prefill_s=1.0, decode_s=0.1, observed_s=1.1)
    full = W("home", max_batch=4, idle_since=None, busy_since=0.0, free_slots=0, running=4,
             groups=frozenset({"g"}), batch_estimate_s=1.5)
    assert EctPolicy(svc).assign([later], [full, other], now=1.0) == []  # 1.5 + 0.1 beats 1.0 + 4.0 + 0.1
    late = W("home", max_batch=4, idle_since=None, busy_since=0.0, free_slots=0, running=4,
             groups=frozenset({"g"}), batch_estimate_s=6.0)
    assert [w.id for w, _ in EctPolicy(svc).assign([later], [late, other], now=1.0)] == ["other"]
    stranger = W("home", max_batch=4, idle_since=None, busy_since=0.0, free_slots=0, running=4, batch_estimate_s=1.5)
    assert [w.id for w, _ in EctPolicy(svc).assign([later], [stranger, other], now=1.0)] == ["other"]


def test_router_tells_policies_which_request_groups_run_on_each_worker() -> None:
    """The router's worker sessions expose the prompt groups of their running jobs (what the policies
    above read), and forget a group once its last job there is done."""
    async def scenario() -> None:
        router = Router(policy="fcfs")
        a = router.register(worker_id="a", kind="cpu", model="m", task="causal-lm", max_batch=2, max_context=64)
        router.channel_opened(a)
        group = [Job("m", TASK_GENERATE, {"prompt": "x", "prompt_group": "g", "params": SamplingParams()},
                     prompt_units=1, max_tokens=10) for _ in range(3)]
        router.submit(group + [job()])
        assert [j.worker_id for j in group] == ["a", "a", None] and a.groups == {"g"}
        for j in group[:2]:
            router.handle_events(a, events([{"type": "done", "dispatch": j.dispatch_id, "finish_reason": "length",
                                             "prompt_tokens": 1}]))
        assert group[2].worker_id == "a" and a.groups == {"g"}  # the freed slots took the third choice...
        router.handle_events(a, events([{"type": "done", "dispatch": group[2].dispatch_id,
                                         "finish_reason": "length", "prompt_tokens": 1}]))
        assert a.groups == set() and a.running == 1  # ... and the job without a group runs on

    asyncio.run(scenario())
