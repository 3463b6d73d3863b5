"""The saturation burst of ``scripts/engine_burst.py`` with static and continuous batching run side by
side in one process, one step at a time, so that both meet the same machine: this CPU's speed moves by
a fifth within minutes, and runs one after the other turn that into a spread of the ratio (1.69-2.31x
for the same burst). Each engine's time is the sum of its own steps' times. The next step goes to the
engine that is behind in its share of its steps (steps taken over its total, known from one sequential
run of each first, which is reported too), so both bursts span the same minutes in the same proportion.

What the interleaving changes: the two engines' KV caches share the CPU's caches (each step finds part
of its cache evicted by the other engine's step), so each step may be a little slower than alone.
``BLOCK`` (default 1) runs that many static steps per turn (and as many continuous steps as keep the
shares even), which leaves the caches alone but at the turns while both still share the minutes.

Usage: PYTHONPATH=. python scripts/engine_interleaved.py [rounds]
Environment: as ``scripts/engine_burst.py`` (MODEL, SHRINK, MB, N, WORDS, THREADS, DATA), and BLOCK;
the kernel is on where it builds."""

from __future__ import annotations

import os
import statistics
import sys
import time

from engine_burst import setup

from caserve.serving.worker.engine import Engine

MODES = ("static", "continuous")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    block = int(os.environ.get("BLOCK", 1))
    spec, lm, rows = setup()

    def engine(mode: str) -> Engine:
        built = Engine(lm, max_batch=spec.max_batch, batching=mode, max_len=spec.max_len)
        built.warm_up()
        built.take_stats()
        return built

    def step(built: Engine) -> float:
        t0 = time.perf_counter()
        built.step(lambda event: None, lambda dispatch: False)
        return time.perf_counter() - t0

    calls, alone = {}, {}
    for mode in MODES:  # one sequential run each: its step count, and the usual measure
        built = engine(mode)
        built.submit(list(rows))
        calls[mode], alone[mode] = 0, 0.0
        while built.busy:
            alone[mode] += step(built)
            calls[mode] += 1
        print(f"alone {mode}: {alone[mode]:.1f} s, {calls[mode]} steps, "
              f"{built.take_stats().generated_tokens} tokens", flush=True)
    print(f"alone: ratio {alone['static'] / alone['continuous']:.2f}", flush=True)

    ratios = []
    for round_no in range(1, rounds + 1):
        engines = {mode: engine(mode) for mode in MODES}
        for built in engines.values():
            built.submit(list(rows))
        took, taken = dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0)
        t0 = time.perf_counter()
        while any(built.busy for built in engines.values()):
            mode = min((m for m in MODES if engines[m].busy), key=lambda m: taken[m] / calls[m])
            for _ in range(max(1, round(block * calls[mode] / calls["static"]))):
                if not engines[mode].busy:
                    break
                took[mode] += step(engines[mode])
                taken[mode] += 1
        tokens = {m: engines[m].take_stats().generated_tokens for m in MODES}
        ratios.append(took["static"] / took["continuous"])
        print(f"round {round_no} interleaved ({time.perf_counter() - t0:.1f} s wall): static {took['static']:.1f} s "
              f"({taken['static']} steps, {tokens['static']} tokens), continuous {took['continuous']:.1f} s "
              f"({taken['continuous']} steps, {tokens['continuous']} tokens), ratio {ratios[-1]:.2f}", flush=True)
    print(f"interleaved ratios {[round(r, 2) for r in ratios]}, median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
