"""``caserve bench server-scaling``: how many decoding tenants one GPU server keeps up with.

One GPU server; the largest tenant count's worth of tenant processes (:mod:`caserve.bench.tenant`), each
decoding with the serving engine as an assisted worker does, are started and warmed up once. Then for
each N in ``--tenants`` the first N decode together (``R`` runs of ``--new-tokens`` tokens each) while
the others idle. Per N:

* aggregate tokens/s: all tokens / (last tenant's end - first tenant's start);
* server CPU-seconds per decode step: the server process's CPU time over the round / decode steps (each
  tenant decodes with batch 1, so one step per token);
* client ms per token: median over the N tenants of wall / tokens; client CPU per token likewise;
* blocking round trips and time blocked on replies per token.

Saturation is the smallest N whose aggregate rate is within 10% of the best one measured: beyond it,
adding tenants only shares out the same rate. Tenants are separate processes so that no single client
GIL caps the rate; on a CPU "GPU server" they also compete with it for the cores.
"""

from __future__ import annotations

import json
import logging
import os
import select
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from caserve.bench.compare import subprocess_env
from caserve.bench.relay import RelayProcess
from caserve.bench.remote_overhead import start_server

logger = logging.getLogger(__name__)

SATURATION = 0.9  # within 10% of the best aggregate rate


class ScalingError(RuntimeError):
    """Tenants could not be started or a round failed."""


@dataclass
class Round:
    tenants: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    server_cpu_s_per_step: float
    client_ms_per_token: float  # median over tenants
    client_cpu_ms_per_token: float
    round_trips_per_token: float
    sync_wait_ms_per_token: float


def _cpu_seconds(pid: int) -> float:
    """CPU time of a local process, all threads (Linux /proc): from ``schedstat`` in nanoseconds where the
    kernel keeps it, else utime + stime from ``stat`` (clock ticks, usually 10 ms)."""
    try:
        ns = sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir())
        if ns > 0:  # 0: the kernel keeps no schedstat figures
            return ns / 1e9
    except (OSError, ValueError, IndexError):
        pass
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Tenant:
    def __init__(self, index: int, server: str, model: str, new_tokens: int, transport: str) -> None:
        self.index = index
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "caserve.bench.tenant", "--server", server, "--model", model,
             "--new-tokens", str(new_tokens), "--transport", transport],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**subprocess_env(), "OMP_NUM_THREADS": "1"})

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def receive(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise ScalingError(f"tenant {self.index}: no reply (exit code {self.proc.poll()})")
        doc = json.loads(line)
        if "error" in doc:
            raise ScalingError(f"tenant {self.index}: {doc['error']}")
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _round(tenants: list[_Tenant], runs: int, server_pid: int, timeout_s: float) -> Round:
    cpu0 = _cpu_seconds(server_pid)
    for t in tenants:
        t.send(f"go {runs}")
    deadline = time.monotonic() + timeout_s
    docs = [t.receive(deadline) for t in tenants]
    server_cpu = _cpu_seconds(server_pid) - cpu0
    tokens = sum(d["tokens"] for d in docs)
    wall = max(d["end"] for d in docs) - min(d["start"] for d in docs)
    per_tenant = [d["wall_s"] / d["tokens"] * 1e3 for d in docs]
    return Round(len(tenants), tokens, wall, tokens / wall, server_cpu / tokens, statistics.median(per_tenant),
                 statistics.median(d["cpu_s"] / d["tokens"] * 1e3 for d in docs),
                 sum(d["syncs"] for d in docs) / tokens, sum(d["sync_wait_s"] for d in docs) / tokens * 1e3)


def saturation(rounds: list[Round]) -> Optional[int]:
    """Smallest tenant count within 10% of the best aggregate rate (None without rounds)."""
    if not rounds:
        return None
    best = max(r.tokens_per_s for r in rounds)
    return min(r.tenants for r in rounds if r.tokens_per_s >= SATURATION * best)


def run(*, model: str, tenants: list[int], device: str, server_threads: int = 0,
        new_tokens: int = 32, runs: int = 2, transport: str = "auto", delay_us: Optional[float] = None,
        out: Optional[Path] = None, start_timeout_s: float = 600.0, round_timeout_s: float = 600.0) -> dict[str, Any]:
    """Measure every tenant count; the document is (re)written to ``out`` after each round, so a run cut
    short still leaves the rounds it finished."""
    if not tenants or min(tenants) < 1:
        raise ValueError("tenant counts must be >= 1")
    doc: dict[str, Any] = {"benchmark": "server-scaling", "model": model, "device": device, "new_tokens": new_tokens,
                           "runs": runs, "server_threads": server_threads, "relay_delay_us": delay_us,
                           "cores": os.cpu_count(), "rounds": [], "saturates_at": None, "errors": []}
    with ExitStack() as stack:
        proc, server = start_server(device, server_threads)  # local: its CPU time is read from /proc
        stack.callback(lambda: (proc.terminate(), proc.wait(10)))
        address = server if delay_us is None else stack.enter_context(RelayProcess(server, delay_us))
        link = "tcp" if delay_us is not None else transport
        pool = [_Tenant(i, address, model, new_tokens, link) for i in range(max(tenants))]
        for t in pool:
            stack.callback(t.stop)
        deadline = time.monotonic() + start_timeout_s
        try:
            doc["model"] = [t.receive(deadline) for t in pool][0]["label"]
        except ScalingError as exc:  # reported in the document, like a failed round
            doc["errors"].append(f"start: {exc}")
            tenants = []
        for n in sorted(set(tenants)):
            try:
                r = _round(pool[:n], runs, proc.pid, round_timeout_s)
            except ScalingError as exc:
                doc["errors"].append(f"N={n}: {exc}")
                logger.warning("server-scaling N=%d failed: %s", n, exc)
                break
            logger.info("N=%d: %.1f tok/s, server %.2f ms CPU/step, client %.2f ms/token", n, r.tokens_per_s,
                        r.server_cpu_s_per_step * 1e3, r.client_ms_per_token)
            doc["rounds"].append(asdict(r))
            doc["saturates_at"] = saturation([Round(**x) for x in doc["rounds"]])
            if out:
                _write(doc, out)
    if out:
        _write(doc, out)
    return doc


def _write(doc: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| tenants | tokens/s (all) | server CPU ms / step | client ms / token | client CPU ms / token | "
             "round trips / token | blocked ms / token |", "|" + "---|" * 7]
    for r in doc["rounds"]:
        lines.append(f"| {r['tenants']} | {r['tokens_per_s']:.1f} | {r['server_cpu_s_per_step'] * 1e3:.2f} | "
                     f"{r['client_ms_per_token']:.2f} | {r['client_cpu_ms_per_token']:.2f} | "
                     f"{r['round_trips_per_token']:.2f} | {r['sync_wait_ms_per_token']:.2f} |")
    lines.append(f"\nsaturates at {doc['saturates_at']} tenants (within {100 - SATURATION * 100:.0f}% of the best rate)")
    return "\n".join(lines)
