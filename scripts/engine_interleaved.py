"""The saturation burst of ``scripts/engine_burst.py`` with static and continuous batching interleaved
step by step inside one process (``caserve.bench.interleave``, which says why and how; ``caserve bench
batching --engine-rounds N`` runs the same after its served runs). Prints one sequential run of each
mode, then each interleaved round's times, steps, tokens and ratio (docs/results.md, section 6).

Usage: PYTHONPATH=. python scripts/engine_interleaved.py [rounds]
Environment: as ``scripts/engine_burst.py`` (MODEL, SHRINK, MB, N, WORDS, THREADS, DATA), and BLOCK
(static steps per turn, 1); the kernel is on where it builds."""

from __future__ import annotations

import os
import sys

from engine_burst import spec_from_env

from caserve.bench.batching import build_requests
from caserve.bench.interleave import MODES, interleaved_burst


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    spec = spec_from_env()
    reqs, _ = build_requests(spec)
    out = interleaved_burst(spec.model, [r.prompt for r in reqs], [r.output_len for r in reqs],
                            max_batch=spec.max_batch, max_len=spec.max_len, rounds=rounds, shrink=spec.shrink,
                            threads=spec.worker_threads, block=int(os.environ.get("BLOCK", 1)))
    for mode in MODES:
        run = out["alone"][mode]
        print(f"alone {mode}: {run['seconds']:.1f} s, {run['steps']} steps, {run['tokens']} tokens")
    print(f"alone: ratio {out['alone_ratio']:.2f}")
    for round_no, (run, ratio) in enumerate(zip(out["rounds"], out["ratios"]), 1):
        print(f"round {round_no} interleaved: " + ", ".join(
            f"{mode} {run[mode]['seconds']:.1f} s ({run[mode]['steps']} steps, {run[mode]['tokens']} tokens)"
            for mode in MODES) + f", ratio {ratio:.2f}")
    print(f"interleaved ratios {[round(r, 2) for r in out['ratios']]}, median {out['ratio']:.2f}")


if __name__ == "__main__":
    main()
