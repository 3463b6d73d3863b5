"""``caserve bench compare``: the same arrival sequence against native-only and native + K assisted workers.

For each configuration a fresh server is started as a subprocess from a command template (by default
``caserve serve``), warmed up, replayed the identical workload, and stopped. The result is a table,
``compare.json`` (with every configuration's full bench result) and two plots:
``jct_cdf.png`` and ``queue_delay.png``.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from caserve.bench import plots
from caserve.bench.datasets import REPO_ROOT
from caserve.bench.loadgen import LoadGenConfig, LoadGenError, run_load_sync, wait_healthy
from caserve.bench.metrics import jct_values, reduction_pct
from caserve.bench.run import WorkloadSpec, bench_serve, records_of, save_result
from caserve.bench.zoo import weights_are_random

logger = logging.getLogger(__name__)

SERVE_CMD = (
    "{python} -m caserve.cli serve --model {model} --port {port} --gpu-port {gpu_port} "
    "--native-workers {native} --assisted-workers {assisted} {extra}"
)
REF_CMD = (
    "{python} -m caserve.bench.refserver --model {model} --port {port} "
    "--native-workers {native} --assisted-workers {assisted} {extra}"
)
SERVER_CMDS = {"caserve": SERVE_CMD, "ref": REF_CMD}


class CompareError(RuntimeError):
    """A configuration's server could not be started or the run failed as a whole."""


@dataclass(frozen=True)
class Config:
    native: int
    assisted: int

    @property
    def label(self) -> str:
        return f"native={self.native}" + (f" + assisted={self.assisted}" if self.assisted else " only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """The current environment with the repo root first on PYTHONPATH (no editable install needed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@contextmanager
def launched_server(template: str, *, model: str, cfg: Config, startup_timeout_s: float = 300.0,
                    log_path: Optional[Path] = None, extra: str = "") -> Iterator[str]:
    """Start the server from ``template`` in its own process group; yield its URL; always stop it.

    Template fields: ``{python} {model} {port} {gpu_port} {native} {assisted} {extra}``."""
    port = free_port()
    cmd = template.format(python=shlex.quote(sys.executable), model=shlex.quote(model), port=port,
                          gpu_port=free_port(), native=cfg.native, assisted=cfg.assisted, extra=extra)
    logger.info("starting: %s", cmd)
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(shlex.split(cmd), env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    restore = _exit_on_sigterm()
    try:
        try:
            wait_healthy(url, timeout_s=startup_timeout_s, proc=proc)
        except LoadGenError as exc:
            raise CompareError(f"{cfg.label}: {exc} (command: {cmd})") from exc
        yield url
    finally:
        _stop(proc)
        if log_path:
            log.close()
        restore()


def _exit_on_sigterm():
    """While a server runs, turn SIGTERM into SystemExit so the ``finally`` above stops the server."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we created: the server and its own workers
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


def warm_up(url: str, workload: WorkloadSpec, *, n: int = 2, endpoint: str = "auto", workers: int = 1) -> None:
    """Unmeasured requests paying first-call costs (allocation, lazy init, remote op planning) on every
    worker: ``n`` rounds of ``workers`` concurrent requests."""
    if n <= 0:
        return
    reqs, _ = WorkloadSpec(**{**asdict(workload), "num_requests": n * workers, "process": "poisson",
                              "rate": float("inf"), "seed": workload.seed + 7}).build()
    cfg = LoadGenConfig(url=url, endpoint=endpoint, progress=False)
    for i in range(n):
        recs, _ = run_load_sync(reqs[i * workers:(i + 1) * workers], np.zeros(workers), cfg)
        failed = [r.error for r in recs if not r.success]
        if failed:
            logger.warning("warm-up: %d/%d requests failed: %s", len(failed), workers, failed[0])


def calibrate(url: str, wl: WorkloadSpec, endpoint: str, *, n: int, load: float, native: int) -> float:
    """Arrival rate (req/s) giving ``load`` x the native-only capacity, from ``n`` sequential requests
    (the first one discarded as warm-up)."""
    reqs, _ = replace(wl, num_requests=n + 1, rate=float("inf"), seed=wl.seed + 1000).build()
    recs, _ = run_load_sync(reqs, np.zeros(len(reqs)), LoadGenConfig(url=url, endpoint=endpoint, progress=False, max_concurrency=1))
    lat = [r.server.service if r.server is not None else r.latency for r in recs[1:] if r.success]
    if not lat:
        raise CompareError(f"calibration of {wl.dataset} at {url} failed: {recs[-1].error}")
    return load * native / max(float(np.mean(lat)), 1e-4)


def compare(
    model: str,
    workload: WorkloadSpec,
    *,
    native: int = 1,
    assisted: Sequence[int] = (1, 2),
    server_cmd: str = SERVE_CMD,
    out_dir: Optional[Path] = None,
    endpoint: str = "auto",
    slos: Optional[dict[str, float]] = None,
    warmup: int = 2,
    progress: bool = True,
    startup_timeout_s: float = 300.0,
    server_args: str = "",
    shrink: bool = False,
    load: Optional[float] = None,
) -> dict[str, Any]:
    """Run every configuration and return the comparison document (also written to ``out_dir``).

    With ``load``, the workload's rate is replaced by ``load`` x the native-only capacity, calibrated on the
    native-only server (first configuration) and then used unchanged for every configuration."""
    configs = [Config(native, 0)] + [Config(native, k) for k in assisted if k > 0]
    runs: list[dict[str, Any]] = []
    for cfg in configs:
        log_path = Path(out_dir) / f"server_{cfg.native}n_{cfg.assisted}a.log" if out_dir else None
        extra = " ".join(a for a in (server_args, "--shrink" if shrink else "") if a)
        with launched_server(server_cmd, model=model, cfg=cfg, startup_timeout_s=startup_timeout_s, log_path=log_path,
                             extra=extra) as url:
            warm_up(url, workload, n=warmup, endpoint=endpoint, workers=cfg.native + cfg.assisted)
            if load is not None and not runs:
                workload = replace(workload, rate=calibrate(url, workload, endpoint, n=5, load=load, native=cfg.native))
                logger.info("calibrated rate: %.3f req/s (%.2fx native-only capacity)", workload.rate, load)
            doc = bench_serve(url, workload, model=None, endpoint=endpoint, slos=slos, label=cfg.label,
                              progress=progress,
                              extra_meta={"workers": {"native": cfg.native, "assisted": cfg.assisted},
                                          "requested_model": model, "server_command": server_cmd, "server_args": extra})
        if doc["meta"]["random_weights"] == "unknown":
            doc["meta"]["random_weights"] = weights_are_random(model, shrink=shrink)
        runs.append(doc)
    result = {"schema": "caserve-compare/1", "model": model, "workload": asdict(workload), "load": load,
              "rows": table_rows(runs), "runs": runs}
    if out_dir:
        write_outputs(result, Path(out_dir))
    return result


def table_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per configuration; reductions are against the first (native-only) run."""
    rows = []
    base_jct = base_q = None
    for doc in runs:
        m, recs = doc["metrics"], records_of(doc)
        jct = jct_values(recs)
        q = [r.server.queue_delay for r in recs if r.success and r.server is not None]
        row = {
            "config": doc["label"],
            "workers": doc["meta"].get("workers"),
            "completed": m["completed"],
            "failed": m["failed"],
            "mean_jct_s": float(jct.mean()) if len(jct) else float("nan"),
            "p50_jct_s": float(np.percentile(jct, 50)) if len(jct) else float("nan"),
            "p99_jct_s": float(np.percentile(jct, 99)) if len(jct) else float("nan"),
            "mean_queue_delay_s": float(np.mean(q)) if q else None,
            "throughput_rps": m["request_throughput"],
            "output_tok_s": m["output_throughput"],
            "jct_source": "server" if m.get("server_timings") else "client e2e",
            "random_weights": doc["meta"].get("random_weights"),
            "hardware": doc["meta"].get("hardware"),
        }
        if base_jct is None:
            base_jct, base_q = row["mean_jct_s"], row["mean_queue_delay_s"]
        row["jct_reduction_pct"] = reduction_pct(base_jct, row["mean_jct_s"])
        row["queue_delay_reduction_pct"] = (reduction_pct(base_q, row["mean_queue_delay_s"])
                                            if base_q is not None and row["mean_queue_delay_s"] is not None else None)
        rows.append(row)
    return rows


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_result(result, out_dir / "compare.json")
    runs = result["runs"]
    title = f"{result['model']} / {result['workload']['dataset']}"
    plots.jct_cdf({d["label"]: jct_values(records_of(d)) for d in runs}, out_dir / "jct_cdf.png", title=f"JCT CDF: {title}")
    series = queue_delay_series(runs)
    if series:
        plots.queue_delay_over_time(series, out_dir / "queue_delay.png", title=f"Queue delay: {title}")
    (out_dir / "compare.md").write_text(markdown_table(result["rows"]) + "\n")


def queue_delay_series(runs: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per run label: (arrival offset s, queue delay s) of its requests with server timings."""
    series = {}
    for d in runs:
        recs = [r for r in records_of(d) if r.success and r.server is not None]
        if recs:
            a0 = min(r.server.arrival for r in recs)
            series[d["label"]] = ([r.server.arrival - a0 for r in recs], [r.server.queue_delay for r in recs])
    return series


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Reductions are only claimed when neither run lost requests (otherwise the means cover different
    request sets); the raw figure is then shown in brackets."""
    head = ("| config | completed | failed | mean JCT (s) | p50 JCT (s) | p99 JCT (s) | mean queue delay (s) | "
            "throughput (req/s) | JCT reduction | queue-delay reduction |")
    lines = [head, "|" + "---|" * 10]
    base_failed = rows[0]["failed"] if rows else 0

    def pct(v: Optional[float], failed: int) -> str:
        if v is None:
            return "n/a"
        return f"n/a (failures; raw {v:.0f}%)" if (failed or base_failed) else f"{v:.1f}%"

    for r in rows:
        q = "n/a" if r["mean_queue_delay_s"] is None else f"{r['mean_queue_delay_s']:.3f}"
        lines.append(f"| {r['config']} | {r['completed']} | {r['failed']} | {r['mean_jct_s']:.3f} | {r['p50_jct_s']:.3f} | "
                     f"{r['p99_jct_s']:.3f} | {q} | {r['throughput_rps']:.2f} | {pct(r['jct_reduction_pct'], r['failed'])} | "
                     f"{pct(r['queue_delay_reduction_pct'], r['failed'])} |")
    return "\n".join(lines)
