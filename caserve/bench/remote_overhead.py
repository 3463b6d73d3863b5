"""``caserve bench remote-overhead``: what forwarding ATen ops to a GPU server costs per token.

For each model, the same greedy decode runs natively (in this process, on ``--native-device``) and on a
caserve device backed by a GPU server subprocess on this host. Modes: ``eager`` and ``graph`` run
Transformers' ``generate`` (dynamic KV cache; static cache in graph mode), ``engine`` runs caserve's own
serving engine the way workers do (native: dynamic cache; assisted: static cache, graph mode, sampling on
the CPU node). Reported per generated token: wall
milliseconds, ATen ops intercepted, op records and frames sent, bytes sent, and CPU-seconds of the GPU
server process next to the native process's own. Both runs are warmed up with one identical generate
first, so every op plan is cached, as in a serving steady state.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from caserve.bench.relay import RelayProcess, echo_server, measure_rtt

logger = logging.getLogger(__name__)

# Benchmark name -> caserve.models name. Weights are random unless the model is found locally.
MODELS = {
    "tiny-gpt2": "caserve/tiny-gpt2",  # 4 layers, 64 wide
    "gpt2-124m": "gpt2",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
}


@dataclass
class Result:
    model: str  # says "(random weights)" unless real weights were found locally
    mode: str  # eager (dynamic KV cache) or graph (graph mode, static KV cache; native uses it too)
    new_tokens: int
    native_ms_per_token: float
    remote_ms_per_token: float
    ratio: float
    aten_ops_per_token: float
    records_per_token: float
    frames_per_token: float
    bytes_per_token: float
    syncs_per_token: float
    native_cpu_s_per_token: float
    server_cpu_s_per_token: float
    server_cpu_vs_native: float
    runs: int
    step_replays_per_token: float = 0.0  # graph mode: forward calls replayed without running their Python
    sync_wait_ms_per_token: float = 0.0  # client time blocked on replies (the syncs above)
    relay_delay_us: float | None = None  # one-way delay of the relay between client and server (None: direct)


def start_server(device: str, threads: int) -> tuple[subprocess.Popen, str]:
    """A GPU server subprocess on a free port; ``threads`` 0 lets ``caserve gpu-server`` choose."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "caserve.cli", "gpu-server", "--port", "0", "--device", device, "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the GPU server did not start: {line!r}")
    return proc, line.split("listening on ")[1].split()[0]


def _generate(model, ids, n: int, cache: str) -> None:
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                       cache_implementation=cache)


def assisted_engine(lm):
    """The serving engine as an assisted worker builds it with the worker's defaults (one place for
    remote-overhead, server-scaling's tenants and scripts/ab_server_threads.py)."""
    from caserve.serving.worker.engine import Engine

    return Engine(lm)


def engine_decode(engine, ids: list[int], n: int) -> None:
    """One greedy decode of ``n`` tokens through the engine's public entry point, as a worker's batch of one."""
    from caserve.serving.messages import Row, SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0, stop=[], seed=None, ignore_eos=True)
    row = Row(dispatch="bench", job="bench", task="generate", prompt_ids=list(ids), params=params)
    engine.run([row], lambda event: None, lambda dispatch: False)


# mode -> KV cache of generate (graph mode needs shapes that repeat); engine: the serving engine's own
MODES = {"eager": "dynamic", "graph": "static", "engine": "engine"}


def measure(name: str, mode: str, address: str, transport: str, native_device: str, new_tokens: int,
            runs: int) -> Result:
    """Native and remote runs alternate, so that drift on a shared machine hits both alike."""
    import caserve.remote as R
    from caserve.models import load_model

    cache = MODES[mode]
    loaded = load_model(MODELS[name], device=native_device)  # the same random weights every load
    native = loaded.model
    vocab = native.config.vocab_size
    ids = torch.randint(0, min(vocab, 256), (1, 8), generator=torch.Generator().manual_seed(0))
    nids = ids.to(native_device)
    native_sync = torch.cuda.synchronize if native_device.startswith("cuda") else (lambda: None)

    dev = R.connect(address, transport=transport)
    rloaded = load_model(MODELS[name], device=dev)
    remote = rloaded.model
    if mode in ("graph", "engine"):
        R.graph_mode(remote)
    rids = ids.to(dev)
    if mode == "engine":
        from caserve.serving.worker.engine import Engine

        native_engine, remote_engine = Engine(loaded), assisted_engine(rloaded)  # as workers run them
        prompt = ids[0].tolist()
        run_native = lambda: engine_decode(native_engine, prompt, new_tokens)  # noqa: E731
        run_remote = lambda: engine_decode(remote_engine, prompt, new_tokens)  # noqa: E731
    else:
        run_native = lambda: _generate(native, nids, new_tokens, cache)  # noqa: E731
        run_remote = lambda: _generate(remote, rids, new_tokens, cache)  # noqa: E731
    remote_sync = lambda: torch.caserve.synchronize(dev)  # noqa: E731
    native_runs, remote_runs, server_cpu, counts = [], [], [], []
    run_native()  # warm-up: caches, op plans, graphs, allocators
    for _ in range(3):  # graph mode captures a forward on its third call at the latest (engine prefills)
        run_remote()
    for _ in range(runs):
        native_runs.append(_timed_once(run_native, native_sync))
        before = R.server_stats(dev)["cpu_seconds"]
        s0 = R.stats(dev)
        wall, _ = _timed_once(run_remote, remote_sync)
        s1 = R.stats(dev)
        server_cpu.append(R.server_stats(dev)["cpu_seconds"] - before)
        remote_runs.append(wall)
        counts.append({k: s1[k] - s0[k] for k in ("ops", "records", "frames", "bytes_sent", "syncs", "step_replays",
                                                  "sync_wait_s")})
    R.disconnect(dev)

    per = lambda x: x / new_tokens  # noqa: E731
    native_ms = per(statistics.median(w for w, _ in native_runs)) * 1e3
    remote_ms = per(statistics.median(remote_runs)) * 1e3
    native_cpu = per(statistics.median(c for _, c in native_runs))
    server = per(statistics.median(server_cpu))
    med = {k: per(statistics.median(c[k] for c in counts)) for k in counts[0]}
    return Result(loaded.label, mode, new_tokens, native_ms, remote_ms, remote_ms / native_ms, med["ops"], med["records"],
                  med["frames"], med["bytes_sent"], med["syncs"], native_cpu, server, server / native_cpu, runs,
                  med["step_replays"], med["sync_wait_s"] * 1e3)


def _timed_once(fn, sync) -> tuple[float, float]:
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(models: list[str], modes: list[str], *, server: str | None, device: str, transport: str, native_device: str,
        new_tokens: int, runs: int, threads: int, out: Path, delays_us: list[float | None] | None = None) -> list[Result]:
    """``delays_us``: measure every (model, mode) through a relay adding each one-way delay (TCP only);
    ``None`` in the list is the direct connection."""
    torch.set_num_threads(threads)
    if delays_us and transport == "unix":
        raise ValueError("a relay delay needs the TCP transport")
    proc = None
    if server is None:
        proc, server = start_server(device, threads)
    report = {
        "benchmark": "remote-overhead",
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "gpu_server_device": device, "native_device": native_device,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "transport": transport, "threads": threads, "torch": torch.__version__, "relay_rtt_us": None, "results": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    try:
        for delay in delays_us or [None]:
            with _link(server, delay) as address:
                for m in models:
                    for mode in modes:
                        r = measure(m, mode, address, "tcp" if delay is not None else transport, native_device,
                                    new_tokens, runs)
                        r.relay_delay_us = delay
                        results.append(r)
                        report["results"].append(asdict(r))
                        out.write_text(json.dumps(report, indent=2))  # a run cut short keeps what it measured
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    if delays_us:
        report["relay_rtt_us"] = relay_rtt_us([d for d in delays_us if d is not None])
    out.write_text(json.dumps(report, indent=2))
    return results


@contextmanager
def _link(server: str, delay_us: float | None) -> Iterator[str]:
    """The server's address, or that of a relay adding ``delay_us`` in front of it."""
    if delay_us is None:
        yield server
        return
    with RelayProcess(server, delay_us) as address:
        yield address


def relay_rtt_us(delays_us: list[float]) -> dict[str, float]:
    """Median 1-byte round trip (us) to an echo server, direct and through a relay of each delay: what the
    relay really adds on this machine (its own hop plus twice the delay, plus any oversleep)."""
    sock, echo = echo_server()
    try:
        rtt = {"direct": measure_rtt(echo)}
        for d in delays_us:
            with RelayProcess(echo, d) as address:
                rtt[f"{d:g}"] = measure_rtt(address)
    finally:
        sock.close()
    return rtt


def print_table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="caserve remote overhead (median per generated token)")
    for col in ("model", "mode", "delay us", "native ms", "remote ms", "remote/native", "ATen ops", "records", "frames", "bytes",
                "step replays", "round trips", "server CPU / native CPU"):
        table.add_column(col, justify="right")
    for r in results:
        delay = "direct" if r.relay_delay_us is None else f"{r.relay_delay_us:g}"
        table.add_row(r.model, r.mode, delay, f"{r.native_ms_per_token:.2f}", f"{r.remote_ms_per_token:.2f}", f"{r.ratio:.2f}",
                      f"{r.aten_ops_per_token:.0f}", f"{r.records_per_token:.0f}", f"{r.frames_per_token:.1f}",
                      f"{r.bytes_per_token:.0f}", f"{r.step_replays_per_token:.2f}", f"{r.syncs_per_token:.2f}",
                      f"{r.server_cpu_vs_native:.2f}")
    Console(width=190).print(table)
