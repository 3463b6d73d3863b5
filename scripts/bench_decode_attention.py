"""Decode attention alone, one call per step as a layer makes it: the varlen kernel over each row's own
columns against SDPA over the step's longest window and per-run SDPA (the engine's fallback), for
rows of mixed and of equal lengths, with and without grouped-query heads. Medians of 7 x 50 calls, in
microseconds per call (docs/results.md, section 6, "The varlen decode kernel").

Usage: PYTHONPATH=. python scripts/bench_decode_attention.py [threads]"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from caserve.serving.worker.attention import plan_runs
from caserve.serving.worker.decode_kernel import Ranges, load
from caserve.serving.worker.slots import window_for


def timed(fn) -> float:
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        runs.append((time.perf_counter() - t0) / 50 * 1e6)
    return statistics.median(runs)


def case(kernel, heads: int, kv_heads: int, dim: int, lens: list[int], length: int = 2112) -> str:
    n, group = len(lens), heads // kv_heads
    cache_k, cache_v = torch.randn(16, kv_heads, length, dim), torch.randn(16, kv_heads, length, dim)
    query = torch.randn(n, heads, 1, dim)
    window = window_for(max(lens) - 1, length)
    key, value = cache_k[:n, :, :window], cache_v[:n, :, :window]
    ranges = Ranges([0] * n, lens)
    mask = (torch.arange(window).view(1, -1) < torch.tensor(lens).view(-1, 1))[:, None, None, :]
    # SDPA as Transformers calls it for one query position with grouped heads: the group's queries
    # packed as query positions of their key-value head
    packed = query.view(n, kv_heads, group, dim)
    plan = plan_runs([window_for(c - 1, length) for c in lens])

    def one() -> None:
        F.scaled_dot_product_attention(packed, key, value, attn_mask=mask)

    def runs() -> None:
        torch.cat([F.scaled_dot_product_attention(packed[a:b], key[a:b, :, :w], value[a:b, :, :w],
                                                  attn_mask=mask[a:b, ..., :w]) for a, b, w in plan])

    k = timed(lambda: kernel(query, key, value, ranges, dim ** -0.5))
    o, r = timed(one), timed(runs)
    return (f"| {n} | {heads}/{kv_heads} x {dim} | {sum(lens) // n} / {max(lens)} | {len(plan)} | "
            f"{k:.0f} | {r:.0f} | {o:.0f} | {min(r, o) / k:.1f}x |")


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    kernel = load()
    if kernel is None:
        raise SystemExit("the decode kernel could not be built here")
    rng = random.Random(0)
    print(f"threads {torch.get_num_threads()}")
    print("| rows | heads/kv x dim | mean / max columns | runs | kernel us | per-run SDPA us | one-window SDPA us "
          "| kernel's gain |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (4, 8, 16):
        mixed = [rng.choice([20, 60, 150, 400, 900]) for _ in range(n)]
        for heads, kv_heads, dim in ((4, 4, 16), (14, 2, 64)):
            print(case(kernel, heads, kv_heads, dim, mixed))
            print(case(kernel, heads, kv_heads, dim, [900] * n))


if __name__ == "__main__":
    main()
