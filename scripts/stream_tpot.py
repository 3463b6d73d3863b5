"""Per-token time of streamed requests through ``caserve serve`` (router + one native worker), as a
client sees it: the median gap between a stream's tokens after its first one.

It starts one ``caserve serve`` with one worker, warms it up, then per round sends ``CONC`` concurrent
streamed completions of ``TOKENS`` tokens each (``ignore_eos``) and prints the round's median gap and
the tokens per second over all streams and the worker's CPU time per token. What it isolates: the per-step cost of the serving path (the
worker's event loop, its event stream to the router, the router's SSE) on top of the engine's step.

Usage: PYTHONPATH=. python scripts/stream_tpot.py [rounds]
Environment: MODEL (caserve/tiny-gpt2), SHRINK (set: shrink the zoo model), CONC (concurrent streams,
1), TOKENS (per stream, 400), MB (slots, 16), THREADS (the worker's threads, 1)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time

import httpx

from burst_cpu import processes  # this folder's /proc reader
from caserve.bench.batching import SERVE
from caserve.bench.compare import Config, launched_server


def worker_cpu_s() -> float:
    """User + system CPU seconds of the worker process (/proc, Linux only)."""
    for cmd, seconds in processes().values():
        if "caserve.cli worker" in cmd:
            return seconds
    raise RuntimeError("no worker process found")


def stream(url: str, model: str, tokens: int, gaps: list[float], counts: list[int]) -> None:
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    stamps = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0].get("text") is not None:
                    stamps.append(time.perf_counter())
    gaps.extend(b - a for a, b in zip(stamps[1:], stamps[2:]))
    counts.append(len(stamps))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    model, shrink = os.environ.get("MODEL", "caserve/tiny-gpt2"), bool(os.environ.get("SHRINK"))
    conc, tokens = int(os.environ.get("CONC", 1)), int(os.environ.get("TOKENS", 400))
    extra = (f"--max-batch {os.environ.get('MB', 16)} --worker-threads {os.environ.get('THREADS', 1)}"
             + (" --shrink" if shrink else ""))
    with launched_server(SERVE, model=model, cfg=Config(native=1, assisted=0), extra=extra) as url:
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        stream(url, name, 16, [], [])  # warm-up
        for r in range(1, rounds + 1):
            gaps: list[float] = []
            counts: list[int] = []
            t0, cpu0 = time.perf_counter(), worker_cpu_s()
            threads = [threading.Thread(target=stream, args=(url, name, tokens, gaps, counts)) for _ in range(conc)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall, cpu = time.perf_counter() - t0, worker_cpu_s() - cpu0
            print(f"round {r}: median gap {statistics.median(gaps) * 1e3:.3f} ms, "
                  f"{sum(counts) / wall:.0f} tokens/s over {conc} stream(s), "
                  f"worker CPU {cpu / sum(counts) * 1e3:.3f} ms per token", flush=True)


if __name__ == "__main__":
    main()
