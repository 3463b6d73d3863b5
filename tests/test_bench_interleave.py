"""Static and continuous batching interleaved inside the engine (``caserve.bench.interleave``): both
modes do all of the burst in every run, their turns keep their shares of steps even, so that both
meet the same minutes of the machine, and the caller's torch threads are left as they were."""

from __future__ import annotations

import statistics

import pytest
import torch

from caserve.bench.interleave import interleaved_burst
from caserve.serving.worker.engine import Engine

PROMPTS = [f"question number {i} here" for i in range(7)]
LENGTHS = [3, 40, 2, 25, 5, 30, 4]


def test_both_modes_run_the_whole_burst_with_even_shares_of_steps(monkeypatch) -> None:
    order: list[str] = []  # the mode of every step of the burst (warm-ups left out)
    plain_step, plain_warm_up = Engine.step, Engine.warm_up

    def warm_up(self):
        self.warming = True
        plain_warm_up(self)
        self.warming = False

    def recorded(self, emit, cancelled):
        if not getattr(self, "warming", False):
            order.append(self.batching)
        return plain_step(self, emit, cancelled)

    monkeypatch.setattr(Engine, "warm_up", warm_up)
    monkeypatch.setattr(Engine, "step", recorded)
    threads = torch.get_num_threads()
    out = interleaved_burst("caserve/tiny-gpt2", PROMPTS, LENGTHS, max_batch=2, max_len=256, rounds=2, threads=1)
    assert torch.get_num_threads() == threads
    alone = out["alone"]
    totals = {mode: alone[mode]["steps"] for mode in ("static", "continuous")}
    assert totals["static"] > totals["continuous"] > 0  # static runs each batch to its longest row
    for run in [alone] + out["rounds"]:
        assert {mode: run[mode]["tokens"] for mode in totals} == dict.fromkeys(totals, sum(LENGTHS))
    for run in out["rounds"]:
        assert {mode: run[mode]["steps"] for mode in totals} == totals
    assert len(order) == 3 * sum(totals.values())  # the sequential runs, then the two rounds' turns
    interleaved = order[sum(totals.values()):]
    for start in (0, sum(totals.values())):
        taken = dict.fromkeys(totals, 0)
        for mode in interleaved[start:start + sum(totals.values())]:
            taken[mode] += 1
            shares = [taken[m] / totals[m] for m in totals]
            assert abs(shares[0] - shares[1]) <= 1 / min(totals.values()) + 1e-9
        assert taken == totals
    assert len(out["ratios"]) == 2 and out["ratio"] == pytest.approx(statistics.median(out["ratios"]))


def test_blocks_and_bad_arguments() -> None:
    out = interleaved_burst("caserve/tiny-gpt2", PROMPTS, LENGTHS, max_batch=2, max_len=256, rounds=1, block=5)
    assert out["block"] == 5 and out["rounds"][0]["static"]["steps"] == out["alone"]["static"]["steps"]
    for bad in (dict(rounds=0), dict(block=0), dict(threads=0)):
        with pytest.raises(ValueError):
            interleaved_burst("caserve/tiny-gpt2", PROMPTS, LENGTHS, max_batch=2, max_len=256,
                              **{"rounds": 1, **bad})
    with pytest.raises(ValueError):
        interleaved_burst("caserve/tiny-gpt2", PROMPTS, LENGTHS[:3], max_batch=2, max_len=256, rounds=1)
