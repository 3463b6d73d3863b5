"""Static and continuous batching of one burst inside the engine, interleaved step by step.

Runs of the two modes one after the other meet a shared machine at different speeds: on caserve's
2-core test machine the same burst's ratio moved over 1.56-2.31x from one sequential pair to the next,
while the speed of the same steps moved by up to a fifth within minutes. Here both modes' engines run
the same burst in one process, one step (or ``block`` static steps) at a time. Each engine's time is
the sum of its own steps' times. The next turn goes to the engine that is behind in its share of its
steps, so both bursts span the same minutes in the same proportion. The share is steps taken over the
engine's total, known from one sequential run of each first, which is reported too. Three interleaved
rounds agreed within 0.05 there (docs/results.md, section 6, "Static and continuous side by side").

What interleaving changes: the two engines' KV caches share the CPU's caches, so each step may find
part of its working set evicted by the other's. ``block`` > 1 shares them only at the turns; at 100
the ratio moved by 0.02 against step by step.

No HTTP, router or load generator: this is the engine's own ratio. The engine is the one the served
native worker runs (``Engine`` with its slots, ``max_len`` and torch threads, on its device: a GPU where
there is one, else the CPU), on the model loaded here.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

MODES = ("static", "continuous")


def burst_rows(prompts: Sequence[str], output_lens: Sequence[int]) -> list[Any]:
    """The burst as engine rows: greedy, each row's output length fixed (EOS ignored), as the load
    generator asks for it."""
    from caserve.serving.messages import Row, SamplingParams

    return [Row(dispatch=f"r{i}", job=f"r{i}", task="generate", prompt=prompt,
                params=SamplingParams(max_tokens=max(1, n), temperature=0.0, ignore_eos=True))
            for i, (prompt, n) in enumerate(zip(prompts, output_lens))]


def interleaved_burst(model: str, prompts: Sequence[str], output_lens: Sequence[int], *, max_batch: int,
                      max_len: int, rounds: int, shrink: bool = False, threads: int = 1,
                      block: int = 1) -> dict[str, Any]:
    """The burst (greedy, each row's output length fixed, EOS ignored) once per mode alone, then
    ``rounds`` times with the modes interleaved. Returns per-mode seconds, steps and tokens of each run,
    the interleaved rounds' continuous/static ratios (``ratios``) and their median (``ratio``)."""
    import torch

    from caserve.models import load_model
    from caserve.serving.worker.engine import Engine
    from caserve.serving.worker.worker import open_device

    if rounds < 1 or block < 1 or threads < 1 or len(prompts) != len(output_lens) or not prompts:
        raise ValueError("need rounds, block and threads >= 1 and one output length per prompt")
    rows = burst_rows(prompts, output_lens)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lm = load_model(model, device=open_device("native", None, None), shrink=shrink)

        def engine(mode: str) -> Engine:
            built = Engine(lm, max_batch=max_batch, batching=mode, max_len=max_len)
            built.warm_up()
            built.take_stats()
            built.submit(list(rows))
            return built

        def step(built: Engine) -> float:
            t0 = time.perf_counter()
            built.step(lambda event: None, lambda dispatch: False)
            return time.perf_counter() - t0

        alone: dict[str, dict[str, Any]] = {}
        for mode in MODES:
            built, seconds, steps = engine(mode), 0.0, 0
            while built.busy:
                seconds += step(built)
                steps += 1
            alone[mode] = {"seconds": seconds, "steps": steps, "tokens": built.take_stats().generated_tokens}
        runs = []
        for _ in range(rounds):
            engines = {mode: engine(mode) for mode in MODES}
            took, taken = dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0)
            while any(built.busy for built in engines.values()):
                mode = min((m for m in MODES if engines[m].busy), key=lambda m: taken[m] / alone[m]["steps"])
                for _ in range(max(1, round(block * alone[mode]["steps"] / alone["static"]["steps"]))):
                    if not engines[mode].busy:
                        break
                    took[mode] += step(engines[mode])
                    taken[mode] += 1
            runs.append({mode: {"seconds": took[mode], "steps": taken[mode],
                                "tokens": engines[mode].take_stats().generated_tokens} for mode in MODES})
    finally:
        torch.set_num_threads(previous)
    ratios = [r["static"]["seconds"] / r["continuous"]["seconds"] for r in runs]
    return {"block": block, "threads": threads, "alone": alone,
            "alone_ratio": alone["static"]["seconds"] / alone["continuous"]["seconds"],
            "rounds": runs, "ratios": ratios, "ratio": statistics.median(ratios)}
