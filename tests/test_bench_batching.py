"""``caserve bench batching`` end to end on tiny inputs: two real servers (static and continuous), a
burst and one Poisson load; every request completes and the report names both modes at every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caserve.bench.batching import BatchingBenchError, BatchingSpec, build_requests, markdown, output_lengths, run_batching


def inputs(tmp: Path) -> tuple[Path, Path]:
    sharegpt = tmp / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"question number {i} here"}]}
                                    for i in range(6)]))
    trace = tmp / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{10 + i}.0,100,{n}\n" for i, n in enumerate([2, 40, 3, 900, 5])))
    return sharegpt, trace


def test_output_lengths_are_drawn_from_the_trace_and_capped(tmp_path: Path) -> None:
    _, trace = inputs(tmp_path)
    lens = output_lengths(trace, 50, cap=30, seed=1)
    assert set(lens) <= {2, 30, 3, 5} and 30 in lens and len(set(lens)) >= 3
    assert lens == output_lengths(trace, 50, cap=30, seed=1)


def test_static_and_continuous_runs_on_the_same_arrivals(tmp_path: Path) -> None:
    sharegpt, trace = inputs(tmp_path)
    spec = BatchingSpec(sharegpt=sharegpt, trace=trace, num_requests=6, loads=(1.0,), max_batch=2, max_output=12)
    result = run_batching(spec, tmp_path / "out")
    assert [(r["step"], r["mode"]) for r in result["rows"]] == [
        ("saturation", "static"), ("saturation", "continuous"), ("1x", "static"), ("1x", "continuous")]
    assert all(r["completed"] == 6 and r["failed"] == 0 for r in result["rows"])
    assert result["static_capacity_rps"] == result["rows"][0]["throughput_rps"] > 0
    assert result["rows"][2]["rate_rps"] == result["static_capacity_rps"]
    assert result["targets"]["saturation_throughput_ratio"] > 0
    assert "continuous" in markdown(result) and (tmp_path / "out" / "batching.json").is_file()


def test_outputs_are_cut_to_fit_the_context_after_their_prompt(tmp_path: Path) -> None:
    """The built-in model's tokenizer is byte-level: a prompt of b bytes takes b tokens of the slot."""
    sharegpt, trace = inputs(tmp_path)
    spec = BatchingSpec(sharegpt=sharegpt, trace=trace, num_requests=20, max_output=1000, max_len=40)
    reqs, cut = build_requests(spec)
    totals = [len(r.prompt.encode()) + r.output_len for r in reqs]
    assert max(totals) == 40 and cut == sum(1 for t in totals if t == 40) > 0
    assert {r.output_len for r in reqs} & {2, 3, 5}  # short ones are kept as drawn
    with pytest.raises(BatchingBenchError):
        build_requests(BatchingSpec(sharegpt=sharegpt, trace=trace, num_requests=3, max_len=10))


def test_decode_steps_count_what_each_mode_computes() -> None:
    from caserve.bench.batching import decode_steps

    # 2 slots; static: batches (5, 1) and (2, 2) run 5 + 2 steps computing 10 + 4 rows; continuous: the
    # 1-token row frees its slot after step 1, the third row takes it (steps 2-3), the fourth takes the
    # next free one (steps 4-5) while the 5-token row ends at step 5
    assert decode_steps([5, 1, 2, 2], 2) == {"static": {"steps": 7, "slot_steps": 14},
                                             "continuous": {"steps": 5, "slot_steps": 10}}
    assert decode_steps([3, 3, 3], 8) == {"static": {"steps": 3, "slot_steps": 9},
                                          "continuous": {"steps": 3, "slot_steps": 9}}
