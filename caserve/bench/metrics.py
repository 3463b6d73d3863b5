"""Per-request records and the benchmark metrics computed from them.

Client-side metrics follow vLLM's ``bench serve`` definitions (see docs/bench.md):

* TTFT: request sent -> first streamed chunk carrying a choice.
* ITL: gaps between consecutive streamed chunks of a request, pooled over all requests.
* TPOT: per request ``(E2E - TTFT) / (output_tokens - 1)``, only for requests with more than one output
  token (for goodput, a request with <= 1 token counts as TPOT 0).
* E2E latency: request sent -> last chunk received.
* request throughput = completed / duration; output throughput = total output tokens / duration;
  total token throughput = (input + output tokens) / duration; duration = first send -> last completion.
* goodput = requests meeting every given SLO (ttft, tpot, e2el, in ms) / duration.

Server-side metrics come from caserve's per-request timings (absent for other servers):
queue delay = dispatch - arrival, JCT = finish - arrival, service time = finish - dispatch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


class MetricsError(ValueError):
    """Bad SLO specification or inconsistent records."""


@dataclass
class ServerTimings:
    """caserve's per-request timestamps (server clock, seconds) and the worker that served it."""

    arrival: float
    dispatch: float
    finish: float
    first_token: Optional[float] = None
    worker_id: Optional[str] = None
    worker_kind: Optional[str] = None

    @property
    def queue_delay(self) -> float:
        return self.dispatch - self.arrival

    @property
    def jct(self) -> float:
        return self.finish - self.arrival

    @property
    def service(self) -> float:
        return self.finish - self.dispatch


@dataclass
class RequestRecord:
    """What the load generator saw for one request. Times in seconds; ``start`` is relative to the run."""

    index: int
    scheduled: float
    start: float = 0.0
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    server: Optional[ServerTimings] = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.server is not None:
            d["server"].update(
                queue_delay=self.server.queue_delay, jct=self.server.jct, service=self.server.service
            )
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RequestRecord":
        d = dict(d)
        srv = d.pop("server", None)
        if srv:
            keep = {k: srv.get(k) for k in ServerTimings.__dataclass_fields__}
            d["server"] = ServerTimings(**keep)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def parse_slos(specs: Iterable[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for spec in specs:
        key, sep, val = spec.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise MetricsError(f"bad SLO {spec!r}: use ttft:MS, tpot:MS or e2el:MS")
        try:
            out[key] = float(val)
        except ValueError as exc:
            raise MetricsError(f"bad SLO value in {spec!r}") from exc
        if out[key] < 0:
            raise MetricsError(f"SLO {spec!r} must be >= 0")
    return out


def summarize(values: Sequence[float], percentiles: Sequence[float], *, scale: float = 1000.0) -> dict[str, float]:
    """mean / median / std / pXX of ``values`` times ``scale`` (default: seconds -> ms). Empty -> zeros."""
    arr = np.asarray(values, dtype=float) * scale if len(values) else np.zeros(1)
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(arr, p))
    out["count"] = int(len(values))
    return out


def compute_metrics(
    records: Sequence[RequestRecord],
    duration: float,
    *,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    slos: Optional[Mapping[str, float]] = None,
) -> dict[str, Any]:
    """Aggregate metrics of a run (latencies in ms, throughputs per second)."""
    if duration <= 0:
        raise MetricsError(f"duration must be > 0, got {duration}")
    ok = [r for r in records if r.success]
    ttfts, e2els, tpots, all_tpots, itls = [], [], [], [], []
    total_in = total_out = 0
    for r in ok:
        total_in += r.prompt_tokens
        total_out += r.output_tokens
        tpot = 0.0
        if r.output_tokens > 1:
            tpot = (r.latency - r.ttft) / (r.output_tokens - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls.extend(r.itl)
        ttfts.append(r.ttft)
        e2els.append(r.latency)
    good = 0
    if slos:
        limits = {k: v / 1000.0 for k, v in slos.items()}
        for ttft, tpot, e2el in zip(ttfts, all_tpots, e2els):
            seen = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
            good += all(seen[k] <= lim for k, lim in limits.items())
    srv = [r.server for r in ok if r.server is not None]
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": (good / duration) if slos else None,
        "slos_ms": dict(slos) if slos else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "ttft_ms": summarize(ttfts, percentiles),
        "tpot_ms": summarize(tpots, percentiles),
        "itl_ms": summarize(itls, percentiles),
        "e2el_ms": summarize(e2els, percentiles),
        "server_timings": len(srv),
    }
    if srv:
        out["queue_delay_ms"] = summarize([s.queue_delay for s in srv], percentiles)
        out["jct_ms"] = summarize([s.jct for s in srv], percentiles)
        out["service_ms"] = summarize([s.service for s in srv], percentiles)
        kinds: dict[str, list[float]] = {}
        for s in srv:
            kinds.setdefault(s.worker_kind or "unknown", []).append(s.service)
        out["service_ms_by_kind"] = {k: summarize(v, percentiles) for k, v in sorted(kinds.items())}
    return out


def jct_values(records: Sequence[RequestRecord]) -> np.ndarray:
    """Per-request JCT in seconds: server JCT when reported, else client E2E latency. Shape: (completed,)."""
    return np.asarray(
        [r.server.jct if r.server is not None else r.latency for r in records if r.success], dtype=float
    )


def reduction_pct(baseline: float, value: float) -> float:
    """How much lower ``value`` is than ``baseline``, in percent (positive = better)."""
    return 100.0 * (baseline - value) / baseline if baseline > 0 else 0.0
