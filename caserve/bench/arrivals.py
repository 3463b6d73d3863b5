"""Arrival processes: when each request of a workload is sent.

An arrival sequence is a non-decreasing array of send offsets in seconds from the start of the run
(first request at its offset, not necessarily 0). The same sequence is replayed against every configuration
of a comparison, so results differ only by the server.

* ``poisson(n, rate)``: exponential inter-arrival times, mean ``1/rate``.
* ``gamma(n, rate, cv)``: gamma inter-arrival times with mean ``1/rate`` and coefficient of variation ``cv``
  (shape ``k = 1/cv^2``; vLLM's ``--burstiness`` is this shape ``k``). ``cv = 1`` is Poisson, ``cv > 1`` is
  burstier, ``cv < 1`` smoother.
* ``azure_trace(path, ...)``: replay of an Azure LLM inference trace (CSV ``TIMESTAMP,ContextTokens,
  GeneratedTokens``); offsets are ``(t - t0) * time_scale``, so ``time_scale=0.1`` plays it 10x faster.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)


class ArrivalError(ValueError):
    """Bad arrival-process parameters or an unreadable trace."""


def poisson(n: int, rate: float, *, seed: int = 0) -> np.ndarray:
    """``n`` Poisson arrivals at ``rate`` requests/s (``inf``: all at once). Shape: (n,)."""
    return gamma(n, rate, cv=1.0, seed=seed)


def gamma(n: int, rate: float, *, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """``n`` arrivals with gamma inter-arrival times of mean ``1/rate`` and coefficient of variation ``cv``."""
    if n < 1:
        raise ArrivalError("need n >= 1 arrivals")
    if not rate > 0:
        raise ArrivalError(f"rate must be > 0, got {rate}")
    if math.isinf(rate):
        return np.zeros(n)
    if not cv > 0:
        raise ArrivalError(f"cv must be > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=n)
    gaps[0] = 0.0  # the first request goes out at t=0
    return np.cumsum(gaps)


@dataclass(frozen=True)
class Trace:
    """A replayed trace: offsets (s) and per-request prompt / output token counts, all shape (n,)."""

    offsets: np.ndarray
    context_tokens: np.ndarray
    generated_tokens: np.ndarray


def _parse_ts(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    # Azure traces carry 7 fractional digits; datetime takes at most 6.
    if "." in s:
        head, frac = s.split(".", 1)
        s = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError as exc:
        raise ArrivalError(f"unparseable TIMESTAMP {s!r}") from exc


def azure_trace(
    path: Path, *, n: Optional[int] = None, time_scale: float = 1.0, start: int = 0
) -> Trace:
    """Rows ``start .. start+n`` of an Azure LLM trace, offsets relative to the first of them."""
    if not time_scale > 0:
        raise ArrivalError(f"time_scale must be > 0, got {time_scale}")
    path = Path(path)
    if not path.is_file():
        raise ArrivalError(f"trace not found: {path}")
    ts: list[float] = []
    ctx: list[int] = []
    gen: list[int] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ArrivalError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for i, row in enumerate(reader):
            if i < start:
                continue
            if n is not None and len(ts) >= n:
                break
            ts.append(_parse_ts(row["TIMESTAMP"]))
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
    if not ts:
        raise ArrivalError(f"{path}: no rows in the requested range")
    t = np.asarray(ts)
    order = np.argsort(t, kind="stable")
    offsets = (t[order] - t[order][0]) * time_scale
    return Trace(offsets, np.asarray(ctx)[order], np.asarray(gen)[order])


def make_arrivals(
    n: int,
    *,
    process: str = "poisson",
    rate: float = 1.0,
    cv: float = 1.0,
    trace_path: Optional[Path] = None,
    time_scale: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, Optional[Trace]]:
    """Dispatch on ``process`` (poisson | gamma | azure); returns offsets and, for azure, the trace."""
    if process == "poisson":
        return poisson(n, rate, seed=seed), None
    if process == "gamma":
        return gamma(n, rate, cv=cv, seed=seed), None
    if process == "azure":
        if trace_path is None:
            from caserve.bench.datasets import default_data_dir

            trace_path = default_data_dir() / "azure_llm_trace_2023_conv.csv"
        tr = azure_trace(trace_path, n=n, time_scale=time_scale)
        return tr.offsets, tr
    raise ArrivalError(f"unknown arrival process {process!r}; choose poisson, gamma or azure")
