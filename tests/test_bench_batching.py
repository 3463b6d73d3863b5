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
    spec = BatchingSpec(sharegpt=sharegpt, trace=trace, num_requests=6, loads=(1.0,), max_batch=2, max_output=12,
                        saturation_rounds=2, load_rounds=2, engine_rounds=1)
    result = run_batching(spec, tmp_path / "out")
    assert [(r["step"], r["round"], r["mode"]) for r in result["rows"]] == [
        ("saturation", 1, "static"), ("saturation", 1, "continuous"), ("saturation", 2, "static"),
        ("saturation", 2, "continuous"), ("1x", 1, "static"), ("1x", 1, "continuous"), ("1x", 2, "static"),
        ("1x", 2, "continuous")]
    assert all(r["completed"] == 6 and r["failed"] == 0 for r in result["rows"])
    static = [r["throughput_rps"] for r in result["rows"][:4:2]]
    assert result["static_capacity_rps"] == pytest.approx(sum(static) / 2) and min(static) > 0
    assert result["rows"][4]["rate_rps"] == result["static_capacity_rps"]
    assert len(result["targets"]["saturation_throughput_ratios"]) == 2
    assert result["targets"]["saturation_throughput_ratio"] > 0
    text = markdown(result)
    assert "saturation #2" in text and "median of 2 rounds" in text and (tmp_path / "out" / "batching.json").is_file()
    assert "| 1x #2 | continuous |" in text
    assert text.startswith("caserve/tiny-gpt2: one worker with 2 slots and 1 torch thread, --max-len 2048, "
                           "6 requests per run, seed 0\n")
    inside = result["engine_interleaved"]  # the same burst inside the engine, after the servers
    asked = sum(r.output_len for r in build_requests(spec)[0])
    assert [run[mode]["tokens"] for run in [inside["alone"]] + inside["rounds"] for mode in ("static", "continuous")] \
        == [asked] * 4
    assert inside["rounds"][0]["static"]["steps"] == inside["alone"]["static"]["steps"]
    assert len(inside["ratios"]) == 1 and inside["ratio"] > 0
    assert f"interleaved step by step: continuous/static {inside['ratio']:.2f}x" in text
    for bad in (dict(saturation_rounds=0), dict(load_rounds=0), dict(engine_rounds=-1)):
        with pytest.raises(BatchingBenchError):
            run_batching(BatchingSpec(sharegpt=sharegpt, trace=trace, num_requests=2, **bad))


def test_saturation_ratio_is_the_median_of_paired_rounds() -> None:
    """Each round's continuous run is divided by the static run next to it; the median of those ratios
    (2.2x here) differs from the ratio of the medians (3.0 / 1.5 = 2.0x) and from the first round's."""
    from caserve.bench.batching import targets

    def row(step: str, k: int, mode: str, rps: float, p99: float = 1.0) -> dict:
        return {"step": step, "round": k, "mode": mode, "throughput_rps": rps, "jct_p99_ms": p99}

    rows = [row("saturation", 1, "static", 1.0), row("saturation", 1, "continuous", 2.4),
            row("saturation", 2, "static", 2.0), row("saturation", 2, "continuous", 3.0),
            row("saturation", 3, "static", 1.5), row("saturation", 3, "continuous", 3.3),
            row("0.9x", 1, "static", 1.0, 400.0), row("0.9x", 1, "continuous", 1.0, 100.0)]
    t = targets(rows)
    assert t["saturation_throughput_ratios"] == pytest.approx([2.4, 1.5, 2.2])
    assert t["saturation_throughput_ratio"] == pytest.approx(2.2)
    assert t["p99_jct_reduction_pct_at_0.9x"] == pytest.approx(75.0)
    assert t["p99_jct_reductions_pct_at_0.9x"] == pytest.approx([75.0])
    # a result written before rounds existed (no "round" key) reads as one round
    old = targets([{k: v for k, v in r.items() if k != "round"} for r in rows if r["round"] == 1])
    assert old["saturation_throughput_ratio"] == pytest.approx(2.4)


def test_p99_jct_reduction_is_the_median_of_paired_load_rounds() -> None:
    """Each 0.9x round's continuous p99 against the static run beside it (75%, 20%, 50% lower): the median
    is 50%, not the first round's 75% nor the reduction of the medians' (1 - 200/500 = 60%)."""
    from caserve.bench.batching import targets

    def row(k: int, mode: str, p99: float) -> dict:
        return {"step": "0.9x", "round": k, "mode": mode, "throughput_rps": 1.0, "jct_p99_ms": p99}

    rows = [row(1, "static", 400.0), row(1, "continuous", 100.0), row(2, "static", 500.0),
            row(2, "continuous", 400.0), row(3, "static", 600.0), row(3, "continuous", 300.0)]
    t = targets(rows)
    assert t["p99_jct_reductions_pct_at_0.9x"] == pytest.approx([75.0, 20.0, 50.0])
    assert t["p99_jct_reduction_pct_at_0.9x"] == pytest.approx(50.0)
    # a round missing its continuous run counts for nothing
    assert targets(rows[:-1])["p99_jct_reductions_pct_at_0.9x"] == pytest.approx([75.0, 20.0])
    result = {"rows": [dict(r, completed=1, failed=0, output_tok_s=1.0, queue_delay_mean_ms=0.0,
                            queue_delay_p99_ms=0.0, ttft_mean_ms=0.0, ttft_p99_ms=0.0, tpot_mean_ms=0.0,
                            jct_mean_ms=0.0) for r in rows],
              "static_capacity_rps": 1.0, "targets": t}
    text = markdown(result)
    assert "| 0.9x #3 | static |" in text and "50.0% lower (median of 3 rounds: 75.0%, 20.0%, 50.0%)" in text


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
