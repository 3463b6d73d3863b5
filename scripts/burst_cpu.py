"""Where the CPU goes while ``caserve serve`` takes the saturation burst of ``caserve bench batching``:
CPU seconds of each process (this load generator, the router, the worker) and of each of the worker's
threads (its event loop, its engine) over the burst, read from /proc (Linux only).

It starts one ``caserve serve`` with one native worker in the given batching mode, warms it up, sends
the burst ``rounds`` times, and prints per round the wall time, the tokens streamed, and the CPU each
process and worker thread used. A process at about 100% of one core is what holds the burst
(docs/results.md, section 6).

Usage: PYTHONPATH=. python scripts/burst_cpu.py static|continuous [rounds]
Environment: MODEL (caserve/tiny-gpt2), SHRINK (set: shrink the zoo model), MB (slots, 16), N (requests,
200), WORDS (prompt words, 48), MAX_OUTPUT (1024), THREADS (the worker's threads, 1), DATA (folder of
the ShareGPT file and the Azure trace, ../shared/datasets)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from caserve.bench.batching import SERVE, BatchingSpec, build_requests
from caserve.bench.compare import Config, launched_server, warm_up
from caserve.bench.loadgen import LoadGenConfig, run_load_sync
from caserve.bench.run import WorkloadSpec

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat_path: str) -> float:
    """User + system CPU seconds from a /proc stat file (fields after the command's closing paren)."""
    with open(stat_path) as fh:
        text = fh.read()
    fields = text[text.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def processes() -> dict[int, tuple[str, float]]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline") as fh:
                cmd = fh.read().replace("\0", " ").strip()
            out[int(entry)] = (cmd, cpu_seconds(f"/proc/{entry}/stat"))
        except OSError:  # gone meanwhile
            continue
    return out


def threads(pid: int) -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
    return out


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "continuous"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    data = Path(os.environ.get("DATA", "../shared/datasets"))
    model, shrink = os.environ.get("MODEL", "caserve/tiny-gpt2"), bool(os.environ.get("SHRINK"))
    spec = BatchingSpec(model=model, sharegpt=data / "sharegpt_v3_first_turn_500.json",
                        trace=data / "azure_llm_trace_2023_conv.csv", num_requests=int(os.environ.get("N", 200)),
                        max_batch=int(os.environ.get("MB", 16)), max_output=int(os.environ.get("MAX_OUTPUT", 1024)),
                        max_prompt_words=int(os.environ.get("WORDS", 48)), shrink=shrink,
                        worker_threads=int(os.environ.get("THREADS", 1)))
    reqs, _ = build_requests(spec)
    extra = (f"--max-batch {spec.max_batch} --batching {mode} --worker-threads {spec.worker_threads} "
             f"--max-len {spec.max_len}" + (" --shrink" if shrink else ""))
    with launched_server(SERVE, model=model, cfg=Config(native=1, assisted=0), extra=extra) as url:
        warm_up(url, WorkloadSpec(dataset="synthetic", output_len=8), n=2)
        roles = {os.getpid(): "load generator"}
        for pid, (cmd, _) in processes().items():
            if "caserve.cli serve" in cmd:
                roles[pid] = "router (caserve serve)"
            elif "caserve.cli worker" in cmd:
                roles[pid] = "worker"
        worker = next(pid for pid, role in roles.items() if role == "worker")
        for round_no in range(1, rounds + 1):
            before, threads_before, t0 = processes(), threads(worker), time.perf_counter()
            records, _ = run_load_sync(reqs, np.zeros(len(reqs)), LoadGenConfig(url=url))
            wall = time.perf_counter() - t0
            after, threads_after = processes(), threads(worker)
            tokens = sum(r.output_tokens for r in records if not r.error)
            done = sum(1 for r in records if not r.error)
            print(f"{mode} round {round_no}: {wall:.1f} s, {done}/{len(records)} requests, {tokens} tokens "
                  f"({tokens / wall:.0f}/s)")
            for pid, role in roles.items():
                used = after[pid][1] - before[pid][1]
                print(f"  {role:24s} {used:6.1f} s CPU ({used / wall:5.1%} of one core)")
            for tid, seconds in sorted(threads_after.items()):
                used = seconds - threads_before.get(tid, 0.0)
                if used >= 0.1:
                    name = "main (event loop)" if tid == worker else f"thread {tid}"
                    print(f"    worker {name:20s} {used:6.1f} s CPU")


if __name__ == "__main__":
    main()
