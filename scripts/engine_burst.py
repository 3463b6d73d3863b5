"""The saturation burst of ``caserve bench batching`` inside the engine alone (no HTTP, no router): the
same requests, all at once, into one ``Engine``, static and continuous batching alternating, with the
varlen decode kernel on and off (per-run SDPA), in paired rounds. Prints each run's time, decode steps,
prefill and decode seconds, and each arm's static/continuous ratios (docs/results.md, section 6).

Usage: PYTHONPATH=. python scripts/engine_burst.py [rounds]
Environment: MODEL (caserve/tiny-gpt2), SHRINK (set: shrink the zoo model), MB (slots, 16), N (requests,
200), WORDS (prompt words, 48), THREADS (torch threads, 1), KERNEL (both | on | off), DATA (folder of the
ShareGPT file and the Azure trace, ../shared/datasets)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

from caserve.bench.batching import BatchingSpec, build_requests
from caserve.bench.interleave import burst_rows
from caserve.models import LoadedModel, load_model
from caserve.serving.messages import Row
from caserve.serving.worker.engine import Engine


def spec_from_env() -> BatchingSpec:
    """The burst the environment names (see the module docstring)."""
    data = Path(os.environ.get("DATA", "../shared/datasets"))
    return BatchingSpec(model=os.environ.get("MODEL", "caserve/tiny-gpt2"),
                        sharegpt=data / "sharegpt_v3_first_turn_500.json",
                        trace=data / "azure_llm_trace_2023_conv.csv", num_requests=int(os.environ.get("N", 200)),
                        max_batch=int(os.environ.get("MB", 16)), max_output=1024,
                        max_prompt_words=int(os.environ.get("WORDS", 48)), shrink=bool(os.environ.get("SHRINK")),
                        worker_threads=int(os.environ.get("THREADS", 1)))


def setup() -> tuple[BatchingSpec, LoadedModel, list[Row]]:
    """The burst's spec, the model and its rows (greedy, each row's output length from the trace)."""
    spec = spec_from_env()
    torch.set_num_threads(spec.worker_threads)
    model, shrink = spec.model, spec.shrink
    reqs, _ = build_requests(spec)
    rows = burst_rows([r.prompt for r in reqs], [r.output_len for r in reqs])
    return spec, load_model(model, shrink=shrink), rows


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    spec, lm, rows = setup()
    slots = spec.max_batch
    arms = {"both": [True, False], "on": [True], "off": [False]}[os.environ.get("KERNEL", "both")]
    took: dict[tuple[bool, str], list[float]] = {}
    for round_no in range(1, rounds + 1):
        for kernel in arms:
            for mode in ("static", "continuous"):
                engine = Engine(lm, max_batch=slots, batching=mode, max_len=spec.max_len)
                engine.kernel = engine.kernel and kernel
                engine.warm_up()
                t0 = time.perf_counter()
                stats = engine.run(list(rows), lambda event: None, lambda dispatch: False)
                seconds = time.perf_counter() - t0
                took.setdefault((kernel, mode), []).append(seconds)
                print(f"round {round_no} kernel={'on' if engine.kernel else 'off'} {mode}: {seconds:.1f} s, "
                      f"{stats.steps} steps, {stats.generated_tokens} tokens, prefill {stats.prefill_s:.1f} s, "
                      f"decode {stats.decode_s:.1f} s", flush=True)
    for kernel in arms:
        static, continuous = took[(kernel, "static")], took[(kernel, "continuous")]
        ratios = [s / c for s, c in zip(static, continuous)]
        print(f"kernel {'on' if kernel else 'off'}: static {[round(s, 1) for s in static]} s, continuous "
              f"{[round(c, 1) for c in continuous]} s, ratios {[round(r, 2) for r in ratios]}, "
              f"median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
