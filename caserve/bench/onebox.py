"""The paper's experiment on one box: one GPU, one native worker, K CPU-assisted workers, each on its own cores.

::

    core 0        core 1      core 2           core 3            cores 4 .. 4+K-1
    GPU server    router      load generator   native worker     assisted workers (one core each)
    (gpu-server)  (serve, 0   (this process)   (worker --kind    (worker --kind assisted
                   workers)                     native, CUDA)      --gpu-server 127.0.0.1:G)

Every process is pinned with ``sched_setaffinity`` (what ``taskset -c`` does) and runs 1 torch thread.
When the machine has fewer cores than the plan, cores are reused modulo the count and the result says
``shared_cores: true`` (the CPU dry run): such a run checks the pipeline, not the claim.

Method: start the GPU server, router and native worker; measure the native-only capacity (requests/s
when ``4 x max batch`` requests arrive at once: batching included); build one Poisson arrival sequence at
``load`` x that capacity over ShareGPT prompts, with output lengths from the Azure conversation trace
(scaled by ``output_scale``, capped at ``max_output``); replay it with K = 0, then add assisted workers
(already started workers stay, warm) and replay the identical sequence for each K. Reported per K:
mean and p99 queue delay and JCT (the router's timings), throughput, completed / failed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import httpx
import numpy as np

from caserve.bench import arrivals as arr
from caserve.bench.compare import free_port, queue_delay_series, subprocess_env, table_rows
from caserve.bench.datasets import load_workload
from caserve.bench.loadgen import LoadGenConfig, run_load_sync, wait_healthy
from caserve.bench.metrics import compute_metrics, jct_values
from caserve.bench.run import SCHEMA, hardware_label, records_of
from caserve.serving.credentials import WORKER_TOKEN_ENV, new_token

logger = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
SHAREGPT = DATA / "sharegpt_first_turn_300.json"
AZURE = DATA / "azure_conv_2023_1000.csv"
CORE_SERVER, CORE_ROUTER, CORE_LOADGEN, CORE_NATIVE, CORE_ASSISTED = 0, 1, 2, 3, 4


class OneBoxError(RuntimeError):
    """A process of the experiment did not start or register in time."""


@dataclass
class OneBoxSpec:
    model: str = "gpt2"  # caserve.models name (random weights unless found locally)
    assisted: Sequence[int] = (0, 2, 4, 8)
    num_requests: int = 200
    load: float = 1.5
    output_scale: float = 0.25  # Azure conversation outputs (mean ~250 tokens) scaled to fit the time budget
    max_output: int = 192  # with 48-word prompts (815 bytes at most here) fits GPT-2's 1024 byte-level tokens
    max_prompt_words: int = 48
    max_batch: int = 8
    gpu_device: str = "auto"
    shrink: bool = False
    seed: int = 0
    start_timeout_s: float = 180.0


def core_of(slot: int) -> tuple[int, bool]:
    """Core for a plan slot, and whether it had to wrap around (fewer cores than the plan)."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[slot % len(cores)], slot >= len(cores)


def _pinned(core: int) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, {core})


class _Box:
    """The processes of one experiment; stopped (each by its pid) when the box closes."""

    def __init__(self, spec: OneBoxSpec, stack: ExitStack) -> None:
        self.spec, self.stack = spec, stack
        self.shared_cores = False
        self.port, self.gpu_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.assisted = 0
        self.worker_token = new_token()  # the router and the workers this box starts share it (environment only)

    def _start(self, slot: int, *args: str) -> subprocess.Popen:
        core, wrapped = core_of(slot)
        self.shared_cores |= wrapped
        env = {**subprocess_env(), "OMP_NUM_THREADS": "1", WORKER_TOKEN_ENV: self.worker_token}
        proc = subprocess.Popen([sys.executable, "-m", "caserve.cli", *args], env=env, preexec_fn=_pinned(core),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        self.stack.callback(_stop, proc)
        return proc

    def start(self) -> None:
        s = self.spec
        router = self._start(CORE_ROUTER, "serve", "--port", str(self.port), "--model", s.model,
                             "--native-workers", "0", "--assisted-workers", "0")
        self._start(CORE_SERVER, "gpu-server", "--port", str(self.gpu_port), "--device", s.gpu_device,
                    "--threads", "1", "--no-unix-socket")
        wait_healthy(self.url, timeout_s=s.start_timeout_s, proc=router)
        self._worker(CORE_NATIVE, "native", "native-0")
        self.wait_workers(1)

    def _worker(self, slot: int, kind: str, wid: str) -> None:
        s = self.spec
        args = ["worker", "--router", self.url, "--kind", kind, "--model", s.model, "--threads", "1",
                "--max-batch", str(s.max_batch), "--worker-id", wid]
        if kind == "assisted":
            args += ["--gpu-server", f"127.0.0.1:{self.gpu_port}"]
        if s.shrink:
            args.append("--shrink")
        self._start(slot, *args)

    def add_assisted(self, k: int) -> None:
        """Grow to ``k`` assisted workers (started in parallel, each on its own core)."""
        for i in range(self.assisted, k):
            self._worker(CORE_ASSISTED + i, "assisted", f"assisted-{i}")
        if k > self.assisted:
            self.assisted = k
            self.wait_workers(1 + k)

    def wait_workers(self, n: int) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        while time.monotonic() < deadline:
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise OneBoxError(f"exited early: {dead[0]}")
            if registered(self.url) >= n:
                return
            time.sleep(0.5)
        raise OneBoxError(f"{n} workers did not register within {self.spec.start_timeout_s:.0f}s")


def registered(url: str) -> int:
    """Workers registered with the router over all models (its /health document)."""
    try:
        doc = httpx.get(url + "/health", timeout=5.0, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return 0
    return sum(len(m.get("workers", [])) for m in doc.get("models", {}).values())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def workload(spec: OneBoxSpec, rate: float, n: Optional[int] = None, seed: Optional[int] = None):
    """ShareGPT prompts with Azure output lengths; Poisson offsets at ``rate``. Same inputs, same result."""
    n = n or spec.num_requests
    seed = spec.seed if seed is None else seed
    gen = arr.azure_trace(AZURE).generated_tokens
    lens = np.clip(np.round(gen * spec.output_scale), 1, spec.max_output).astype(int)
    reqs = load_workload("sharegpt", n, path=SHAREGPT, seed=seed, output_lens=np.roll(lens, -seed).tolist(),
                         max_prompt_words=spec.max_prompt_words)
    return reqs, arr.poisson(n, rate, seed=seed)


def capacity(url: str, spec: OneBoxSpec) -> float:
    """Native-only requests/s with ``4 x max batch`` requests arriving at once (batching included)."""
    reqs, offsets = workload(spec, float("inf"), n=4 * spec.max_batch, seed=spec.seed + 1000)
    recs, duration = run_load_sync(reqs, offsets, LoadGenConfig(url=url, progress=False))
    done = sum(r.success for r in recs)
    if not done:
        raise OneBoxError(f"capacity run: every request failed ({recs[0].error})")
    return done / duration


def _doc(label: str, url: str, spec: OneBoxSpec, k: int, rate: float, records, duration: float) -> dict[str, Any]:
    return {"schema": SCHEMA, "label": label,
            "meta": {"url": url, "model": spec.model, "random_weights": "unknown", "hardware": hardware_label(),
                     "workers": {"native": 1, "assisted": k}, "rate": rate,
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "metrics": compute_metrics(records, duration), "requests": [r.to_json() for r in records]}


def run(spec: OneBoxSpec, on_row: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """The experiment; ``on_row`` sees the document after each K (for partial results)."""
    core, _ = core_of(CORE_LOADGEN)
    os.sched_setaffinity(0, {core})
    result: dict[str, Any] = {"schema": "caserve-onebox/1", "spec": spec.__dict__ | {"assisted": list(spec.assisted)},
                              "cores": len(os.sched_getaffinity(0)), "rows": [], "runs": []}
    with ExitStack() as stack:
        box = _Box(spec, stack)
        box.start()
        cap = capacity(box.url, spec)
        rate = spec.load * cap
        result.update(native_capacity_rps=cap, rate_rps=rate, shared_cores=box.shared_cores)
        logger.info("native-only capacity %.2f req/s; replaying at %.2f req/s", cap, rate)
        reqs, offsets = workload(spec, rate)
        for k in sorted(set(spec.assisted)):
            box.add_assisted(k)
            result["shared_cores"] = box.shared_cores
            label = f"native=1 + assisted={k}" if k else "native=1 only"
            recs, duration = run_load_sync(reqs, offsets, LoadGenConfig(url=box.url, progress=False))
            result["runs"].append(_doc(label, box.url, spec, k, rate, recs, duration))
            result["rows"] = rows(result["runs"])
            if on_row:
                on_row(result)
    return result


def rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``compare``'s rows plus the p99 queue delay."""
    out = table_rows(runs)
    for row, doc in zip(out, runs):
        q = [r.server.queue_delay for r in records_of(doc) if r.success and r.server is not None]
        row["p99_queue_delay_s"] = float(np.percentile(q, 99)) if q else None
        row["assisted"] = doc["meta"]["workers"]["assisted"]
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| K assisted | completed | failed | mean queue (s) | p99 queue (s) | mean JCT (s) | p99 JCT (s) | "
             "throughput (req/s) | JCT reduction |", "|" + "---|" * 9]
    for r in result["rows"]:
        q = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        red = "n/a" if r["jct_reduction_pct"] is None else f"{r['jct_reduction_pct']:.0f}%"
        lines.append(f"| {r['assisted']} | {r['completed']} | {r['failed']} | {q(r['mean_queue_delay_s'])} | "
                     f"{q(r['p99_queue_delay_s'])} | {r['mean_jct_s']:.3f} | {r['p99_jct_s']:.3f} | "
                     f"{r['throughput_rps']:.2f} | {red} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    from caserve.bench import plots

    runs = result["runs"]
    if not runs:
        return []
    title = f"one box, {result['spec']['model']}, {result['spec']['load']}x native capacity"
    paths = [plots.jct_cdf({d["label"]: jct_values(records_of(d)) for d in runs}, out_dir / "onebox_jct_cdf.png",
                           title=f"JCT CDF: {title}")]
    series = queue_delay_series(runs)
    if series:
        paths.append(plots.queue_delay_over_time(series, out_dir / "onebox_queue_delay.png",
                                                 title=f"Queue delay: {title}"))
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m caserve.bench.onebox --spec JSON --out FILE``: the gpu-suite's step; the result file is
    rewritten after every K."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="the paper's experiment on one box")
    p.add_argument("--spec", default="{}", help="JSON object of OneBoxSpec fields")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = OneBoxSpec(**json.loads(a.spec))
    last: dict[str, Any] = {"schema": "caserve-onebox/1", "rows": [], "runs": []}

    def save(doc: dict[str, Any]) -> None:
        last.update(doc)
        a.out.write_text(json.dumps(last))

    try:
        save(run(spec, on_row=save))
    except Exception as exc:  # the partial result is kept, with the reason
        save({"error": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    main()
