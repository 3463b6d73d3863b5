"""A/B of a CPU GPU server's intra-op threads: two servers (``--threads A`` and ``--threads B``), one engine
client each in this process, decode runs alternating A, B, A, B..., server CPU time per decode step read from
/proc. Usage: PYTHONPATH=. python scripts/ab_server_threads.py [A B [reps [tokens [model]]]]
(docs/results.md, section 7)."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import caserve.remote as R
from caserve.bench.remote_overhead import MODELS, assisted_engine, engine_decode, start_server
from caserve.bench.server_scaling import _cpu_seconds
from caserve.models import load_model


def main() -> None:
    a, b, reps, tokens = (int(x) for x in (sys.argv[1:5] + ["1", "2", "6", "32"][len(sys.argv[1:5]):]))
    model = sys.argv[5] if len(sys.argv) > 5 else "tiny-gpt2"
    torch.set_num_threads(1)
    arms = {}
    for threads in (a, b):
        proc, address = start_server("cpu", threads)
        dev = R.connect(address)
        lm = load_model(MODELS[model], device=dev)
        R.graph_mode(lm.model)
        engine = assisted_engine(lm)
        for _ in range(3):
            engine_decode(engine, list(range(1, 9)), tokens)
        arms[threads] = {"proc": proc, "engine": engine, "cpu_ms_per_step": [], "ms_per_token": []}
    try:
        for _ in range(reps):
            for threads, arm in arms.items():
                cpu0, t0 = _cpu_seconds(arm["proc"].pid), time.perf_counter()
                engine_decode(arm["engine"], list(range(1, 9)), tokens)
                arm["ms_per_token"].append((time.perf_counter() - t0) / tokens * 1e3)
                arm["cpu_ms_per_step"].append((_cpu_seconds(arm["proc"].pid) - cpu0) / tokens * 1e3)
    finally:
        for arm in arms.values():
            arm["proc"].terminate()
    print(json.dumps({f"threads={t}": {"median_server_cpu_ms_per_step": statistics.median(arm["cpu_ms_per_step"]),
                                       "median_ms_per_token": statistics.median(arm["ms_per_token"]),
                                       "server_cpu_ms_per_step": arm["cpu_ms_per_step"],
                                       "ms_per_token": arm["ms_per_token"]} for t, arm in arms.items()}, indent=1))


if __name__ == "__main__":
    main()
