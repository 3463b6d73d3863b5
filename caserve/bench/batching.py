"""``caserve bench batching``: the same arrivals against static and continuous batching.

Requests are ShareGPT first turns (read from the file given) with output lengths drawn from an Azure
LLM trace's ``GeneratedTokens`` (mixed short and long), capped at ``max_output`` and at what the context
leaves after the prompt (counted with the model's own tokenizer: ``min(model context, max_len)``, so
that no request is refused as too long; how many were cut is reported). For each batching mode a fresh
``caserve serve`` (one worker, ``--max-batch`` slots of ``--max-len`` tokens) is started, warmed up and
sent:

1. a burst of ``num_requests`` at once: throughput at saturation, in ``saturation_rounds`` rounds. The
   static configuration's capacity (requests/s) is the median of its rounds' throughputs, and the
   saturation ratio the median of the rounds' own continuous/static ratios;
2. Poisson arrivals at each ``loads`` x that capacity (the same seeded arrivals for both modes), in
   ``load_rounds`` rounds, each with its own arrivals (seed ``seed + round``). A p99 is one run's
   slowest 1%: with 200 requests, its two slowest; the median of the rounds' own reductions bounds
   what one lucky or unlucky draw of arrivals does to it;
3. with ``engine_rounds`` > 0, after the servers stop: the burst inside the engine in this process,
   static and continuous interleaved step by step (:mod:`caserve.bench.interleave`), whose ratio the
   machine's speed swings do not scatter as they do the served rounds'.

The modes alternate inside each step and round (static, then continuous), so that drift on a shared
machine hits both alike: a machine whose speed drifts by 10% between two runs a minute apart moves one
round's ratio by as much, and the median of paired rounds bounds what one slow or fast run can do.
Reported per run: throughput, mean and p99 queue delay, TTFT, TPOT and JCT (server timings where the
router reports them), in ``batching.json`` and a markdown table; and what the burst's output lengths
alone allow (:func:`decode_steps`), to read the measured saturation ratio against.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import random
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from caserve.bench import arrivals as arr
from caserve.bench.compare import Config, launched_server, warm_up
from caserve.bench.datasets import BenchRequest, load_workload
from caserve.bench.interleave import interleaved_burst
from caserve.bench.loadgen import LoadGenConfig, run_load_sync
from caserve.bench.metrics import compute_metrics
from caserve.bench.run import WorkloadSpec, save_result

logger = logging.getLogger(__name__)

MODES = ("static", "continuous")
SERVE = ("{python} -m caserve.cli serve --model {model} --port {port} --gpu-port {gpu_port} "
         "--native-workers {native} --assisted-workers {assisted} {extra}")


class BatchingBenchError(RuntimeError):
    """The benchmark could not run (bad inputs, a run where every request failed)."""


@dataclass(frozen=True)
class BatchingSpec:
    model: str = "caserve/tiny-gpt2"
    sharegpt: Optional[Path] = None
    trace: Optional[Path] = None
    num_requests: int = 60
    loads: tuple[float, ...] = (0.5, 0.9, 1.5)
    max_batch: int = 8
    max_output: int = 256
    max_prompt_words: int = 96
    max_len: int = 2048  # the worker's --max-len: most tokens (prompt + output) of one slot
    shrink: bool = False
    worker_threads: int = 1
    seed: int = 0
    saturation_rounds: int = 3
    load_rounds: int = 1
    engine_rounds: int = 0  # then the burst inside the engine, the modes interleaved (caserve.bench.interleave)


def output_lengths(trace: Path, n: int, *, cap: int, seed: int) -> list[int]:
    """``n`` GeneratedTokens values drawn (seeded, with replacement) from the trace, each in [1, cap]."""
    with Path(trace).open(encoding="utf-8", newline="") as fh:
        values = [int(row["GeneratedTokens"]) for row in csv.DictReader(fh) if row.get("GeneratedTokens")]
    if not values:
        raise BatchingBenchError(f"{trace}: no GeneratedTokens values")
    rng = random.Random(seed)
    return [max(1, min(cap, rng.choice(values))) for _ in range(n)]


def build_requests(spec: BatchingSpec) -> tuple[list[BenchRequest], int]:
    """The requests, and how many of them had their output cut to fit the context after their prompt."""
    if spec.sharegpt is None or spec.trace is None:
        raise BatchingBenchError("give the ShareGPT file and the Azure trace (--sharegpt, --trace)")
    lens = output_lengths(spec.trace, spec.num_requests, cap=spec.max_output, seed=spec.seed)
    reqs = load_workload("sharegpt", spec.num_requests, path=spec.sharegpt, seed=spec.seed, output_lens=lens,
                         max_prompt_words=spec.max_prompt_words)
    from caserve.models import load_model

    lm = load_model(spec.model, shrink=spec.shrink)  # the served weights are not needed: tokenizer, context
    context = min(lm.max_context, spec.max_len)
    fitted, cut = [], 0
    for r in reqs:
        room = context - len(lm.tokenizer(r.prompt)["input_ids"])
        if room < 1:
            raise BatchingBenchError(f"a prompt fills the context of {context} tokens: lower --max-prompt-words")
        if r.output_len > room:
            r, cut = replace(r, output_len=room), cut + 1
        fitted.append(r)
    return fitted, cut


def summary(records: Sequence[Any], duration: float) -> dict[str, Any]:
    m = compute_metrics(records, duration)
    if m["completed"] == 0:
        raise BatchingBenchError(f"every request failed: {records[0].error if records else 'no requests'}")

    def pick(name: str, key: str) -> Optional[float]:
        block = m.get(name)
        return None if not block else block.get(key)

    return {"completed": m["completed"], "failed": m["failed"], "throughput_rps": m["request_throughput"],
            "output_tok_s": m["output_throughput"],
            "queue_delay_mean_ms": pick("queue_delay_ms", "mean"), "queue_delay_p99_ms": pick("queue_delay_ms", "p99"),
            "ttft_mean_ms": pick("ttft_ms", "mean"), "ttft_p99_ms": pick("ttft_ms", "p99"),
            "tpot_mean_ms": pick("tpot_ms", "mean"), "jct_mean_ms": pick("jct_ms", "mean"),
            "jct_p99_ms": pick("jct_ms", "p99")}


def run_batching(spec: BatchingSpec, out_dir: Optional[Path] = None, progress: bool = False) -> dict[str, Any]:
    if spec.saturation_rounds < 1 or spec.load_rounds < 1 or spec.engine_rounds < 0:
        raise BatchingBenchError(f"saturation_rounds and load_rounds must be at least 1 and engine_rounds at "
                                 f"least 0, not {spec.saturation_rounds}, {spec.load_rounds} and {spec.engine_rounds}")
    reqs, cut = build_requests(spec)
    extra = {mode: f"--max-batch {spec.max_batch} --batching {mode} --worker-threads {spec.worker_threads} "
                   f"--max-len {spec.max_len}" + (" --shrink" if spec.shrink else "") for mode in MODES}
    rows: list[dict[str, Any]] = []
    cfg = Config(native=1, assisted=0)
    servers: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for mode in MODES:  # both servers stay up, so that their runs can alternate
            log = Path(out_dir) / f"server_{mode}.log" if out_dir else None
            servers[mode] = stack.enter_context(launched_server(SERVE, model=spec.model, cfg=cfg, log_path=log,
                                                                extra=extra[mode]))
            warm_up(servers[mode], WorkloadSpec(dataset="synthetic", output_len=8), n=2)

        def run_step(step: str, round_no: int, offsets: np.ndarray, rate: Optional[float]) -> None:
            for mode in MODES:
                recs, duration = run_load_sync(reqs, offsets, LoadGenConfig(url=servers[mode], progress=progress))
                row = {"step": step, "round": round_no, "mode": mode, "rate_rps": rate, **summary(recs, duration)}
                logger.info("%s", row)
                rows.append(row)

        for round_no in range(1, spec.saturation_rounds + 1):
            run_step("saturation", round_no, np.zeros(len(reqs)), None)
        capacity = statistics.median(r["throughput_rps"] for r in rows if r["mode"] == "static")
        for load in spec.loads:
            for round_no in range(1, spec.load_rounds + 1):
                run_step(f"{load:g}x", round_no, arr.poisson(len(reqs), load * capacity, seed=spec.seed + round_no),
                         load * capacity)
    result = {"schema": "caserve-batching/1", "spec": {k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in spec.__dict__.items()},
              "static_capacity_rps": capacity, "outputs_cut_to_context": cut,
              "output_tokens_asked": sum(r.output_len for r in reqs),
              "decode_steps": decode_steps([r.output_len for r in reqs], spec.max_batch),
              "rows": rows, "targets": targets(rows)}
    if spec.engine_rounds:  # after the servers have stopped: the machine is this process's alone
        result["engine_interleaved"] = interleaved_burst(
            spec.model, [r.prompt for r in reqs], [r.output_len for r in reqs], max_batch=spec.max_batch,
            max_len=spec.max_len, rounds=spec.engine_rounds, shrink=spec.shrink, threads=spec.worker_threads)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_result(result, Path(out_dir) / "batching.json")
        (Path(out_dir) / "batching.md").write_text(markdown(result) + "\n")
    return result


def decode_steps(lengths: Sequence[int], slots: int) -> dict[str, dict[str, int]]:
    """What the burst's output lengths allow, whatever the machine: decode steps and computed slot-steps
    (rows x steps) of each mode, in arrival order. Static runs batches of ``slots`` to their longest row,
    computing every admitted row; continuous refills a slot the step after it frees. A step's cost lies
    between a fixed cost (the steps' ratio bounds the throughput ratio) and a cost per computed row (the
    slot-steps' ratio does); prefill and the serving path per token are left out."""
    static_steps = static_slots = 0
    for i in range(0, len(lengths), slots):
        batch = lengths[i:i + slots]
        static_steps += max(batch)
        static_slots += max(batch) * len(batch)
    waiting, running, steps = list(reversed(lengths)), [], 0
    while waiting or running:
        while waiting and len(running) < slots:
            running.append(waiting.pop())
        steps += 1
        running = [left - 1 for left in running if left > 1]
    return {"static": {"steps": static_steps, "slot_steps": static_slots},
            "continuous": {"steps": steps, "slot_steps": sum(lengths)}}


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Continuous over static, each round against the static run next to it: the throughput ratio at
    saturation and the p99 JCT reduction (%) at 0.9x, per round and their medians."""
    by = {(r["step"], r["mode"], r.get("round", 1)): r for r in rows}

    def paired(step: str, value) -> list[float]:
        rounds = sorted({k for (st, _, k) in by if st == step})
        pairs = [(by.get((step, "static", k)), by.get((step, "continuous", k))) for k in rounds]
        return [value(s, c) for s, c in pairs if s and c and value(s, c) is not None]

    ratios = paired("saturation", lambda s, c: c["throughput_rps"] / s["throughput_rps"] if s["throughput_rps"] else None)
    cuts = paired("0.9x", lambda s, c: 100.0 * (1 - c["jct_p99_ms"] / s["jct_p99_ms"]) if s["jct_p99_ms"] else None)
    return {"saturation_throughput_ratio": statistics.median(ratios) if ratios else None,
            "saturation_throughput_ratios": ratios,
            "p99_jct_reduction_pct_at_0.9x": statistics.median(cuts) if cuts else None,
            "p99_jct_reductions_pct_at_0.9x": cuts}


def markdown(result: dict[str, Any]) -> str:
    def f(v: Optional[float], digits: int = 0) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    lines = []
    spec = result.get("spec")
    if spec:  # what was measured, so that a report read alone says it
        threads = spec["worker_threads"]
        max_len = f", --max-len {spec['max_len']}" if "max_len" in spec else ""  # older results lack it
        lines += [f"{spec['model']}{' (shrunk)' if spec['shrink'] else ''}: one worker with {spec['max_batch']} slots "
                  f"and {threads} torch thread{'s' if threads != 1 else ''}{max_len}, "
                  f"{spec['num_requests']} requests per run, seed {spec['seed']}", ""]
    lines += ["| load | batching | done | failed | req/s | out tok/s | queue mean / p99 (ms) | TTFT mean / p99 (ms) | "
              "TPOT mean (ms) | JCT mean / p99 (ms) |", "|" + "---|" * 10]
    rounds: dict[str, int] = {}
    for r in result["rows"]:
        rounds[r["step"]] = max(rounds.get(r["step"], 1), r.get("round", 1))
    for r in result["rows"]:
        step = f"{r['step']} #{r.get('round', 1)}" if rounds[r["step"]] > 1 else r["step"]
        lines.append(f"| {step} | {r['mode']} | {r['completed']} | {r['failed']} | {f(r['throughput_rps'], 2)} | "
                     f"{f(r['output_tok_s'], 1)} | {f(r['queue_delay_mean_ms'])} / {f(r['queue_delay_p99_ms'])} | "
                     f"{f(r['ttft_mean_ms'])} / {f(r['ttft_p99_ms'])} | {f(r['tpot_mean_ms'], 1)} | "
                     f"{f(r['jct_mean_ms'])} / {f(r['jct_p99_ms'])} |")
    t = result["targets"]
    lines.append("")
    if "output_tokens_asked" in result:
        lines.append(f"{result['output_tokens_asked']} output tokens asked per run; "
                     f"{result['outputs_cut_to_context']} outputs cut to fit the context after their prompt")
    bound = result.get("decode_steps")
    if bound:
        st, co = bound["static"], bound["continuous"]
        lines.append(f"what the output lengths allow: static {st['steps']} decode steps ({st['slot_steps']} rows computed), "
                     f"continuous {co['steps']} ({co['slot_steps']}): a throughput ratio between "
                     f"{st['steps'] / co['steps']:.2f}x (fixed cost per step) and "
                     f"{st['slot_steps'] / co['slot_steps']:.2f}x (cost per row)")
    each = t.get("saturation_throughput_ratios") or []
    rounds_note = f" (median of {len(each)} rounds: {', '.join(f'{x:.2f}x' for x in each)})" if len(each) > 1 else ""
    cuts = t.get("p99_jct_reductions_pct_at_0.9x") or []
    cuts_note = f" (median of {len(cuts)} rounds: {', '.join(f'{x:.1f}%' for x in cuts)})" if len(cuts) > 1 else ""
    lines.append(f"static capacity {f(result['static_capacity_rps'], 2)} req/s; continuous/static throughput at "
                 f"saturation {f(t['saturation_throughput_ratio'], 2)}x{rounds_note}; p99 JCT at 0.9x "
                 f"{f(t['p99_jct_reduction_pct_at_0.9x'], 1)}% lower{cuts_note}")
    inside = result.get("engine_interleaved")
    if inside:
        alone = inside["alone"]
        lines.append(f"inside the engine, the modes interleaved step by step: continuous/static {inside['ratio']:.2f}x "
                     f"(median of {len(inside['ratios'])} rounds: {', '.join(f'{x:.2f}x' for x in inside['ratios'])}); "
                     f"run one after the other: {inside['alone_ratio']:.2f}x (static {alone['static']['seconds']:.1f} s "
                     f"in {alone['static']['steps']} steps, continuous {alone['continuous']['seconds']:.1f} s in "
                     f"{alone['continuous']['steps']})")
    return "\n".join(lines)
