"""Discrete-event simulator of caserve's router and workers, for clusters far larger than one machine.

Model
-----
* ``gpus`` GPUs, each running ``native_per_gpu`` GPU-native workers.
* ``cpu_nodes`` CPU nodes, each running one CPU-assisted worker whose GPU work goes to a GPU; node ``i`` is
  attached to GPU ``i mod gpus``, and a GPU accepts at most ``tenants_per_gpu`` tenants: CPU nodes beyond
  ``gpus * tenants_per_gpu`` stay idle (reported as ``assisted_workers``).
* Service times (seconds) are drawn from empirical distributions per worker kind, measured by bench runs
  (``ServiceModel.from_results``). An assisted worker on a GPU shared by ``t`` tenants takes
  ``(1 + tenant_slowdown * (t - 1))`` times its drawn service time (0 by default: no contention model).
* Workers serve one request at a time, without preemption.

Policies (``policy``)
---------------------
* ``fifo``: one central first-come-first-served queue. The head request goes to an idle worker when one
  exists, else to the first worker to become free. Among idle workers ``dispatch="fastest"`` picks the kind
  with the lower mean service time, ``dispatch="longest-idle"`` the worker idle the longest (what a pool of
  threads blocked on one queue does).
  With arrivals in order this is exact: request i starts at ``max(a_i, earliest free time)``.
* ``ect``: earliest expected completion time. At arrival the router picks the worker minimising
  ``max(free_w, a_i) + mean_service(kind_w)`` and appends the request to that worker's own queue.

The event loop is O(n log W) for fifo (a heap of busy workers) and O(n W) vectorised for ect.
"""

from __future__ import annotations

import heapq
from collections import deque
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from caserve.bench.metrics import RequestRecord, reduction_pct

logger = logging.getLogger(__name__)

NATIVE, ASSISTED = "native", "assisted"


class SimError(ValueError):
    """Inconsistent cluster or service-time inputs."""


@dataclass
class ServiceModel:
    """Empirical service-time samples (s) per worker kind."""

    samples: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        self.samples = {k: np.asarray(v, dtype=float) for k, v in self.samples.items() if len(v)}
        if not self.samples:
            raise SimError("service model has no samples")

    def mean(self, kind: str) -> float:
        return float(self._of(kind).mean())

    def _of(self, kind: str) -> np.ndarray:
        if kind in self.samples:
            return self.samples[kind]
        if len(self.samples) == 1:  # one measured kind stands for all
            return next(iter(self.samples.values()))
        raise SimError(f"no service-time samples for worker kind {kind!r} (have {sorted(self.samples)})")

    def draw(self, kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.choice(self._of(kind), size=size, replace=True)

    @classmethod
    def from_records(cls, records: Iterable[RequestRecord], *, default_kind: str = NATIVE) -> "ServiceModel":
        """Service = finish - dispatch from caserve timings; requests without them use E2E latency."""
        out: dict[str, list[float]] = {}
        for r in records:
            if not r.success:
                continue
            if r.server is not None:
                out.setdefault(_kind(r.server.worker_kind, default_kind), []).append(r.server.service)
            else:
                out.setdefault(default_kind, []).append(r.latency)
        return cls({k: np.asarray(v) for k, v in out.items()})

    @classmethod
    def from_results(cls, docs: Sequence[Mapping[str, Any]]) -> "ServiceModel":
        from caserve.bench.run import records_of

        merged: dict[str, list[np.ndarray]] = {}
        for doc in docs:
            for k, v in cls.from_records(records_of(dict(doc))).samples.items():
                merged.setdefault(k, []).append(v)
        return cls({k: np.concatenate(v) for k, v in merged.items()})

    def with_assisted_factor(self, factor: float) -> "ServiceModel":
        """When no assisted service time was measured, assume ``factor`` x the native samples."""
        if ASSISTED in self.samples or NATIVE not in self.samples:
            return self
        if not factor > 0:
            raise SimError(f"assisted factor must be > 0, got {factor}")
        logger.warning("no measured assisted service times: assuming %.2f x native", factor)
        return ServiceModel({**self.samples, ASSISTED: self.samples[NATIVE] * factor})

    def to_json(self) -> dict[str, Any]:
        return {k: {"n": int(len(v)), "mean_s": float(v.mean()), "p50_s": float(np.median(v))} for k, v in self.samples.items()}


def _kind(name: Optional[str], default: str) -> str:
    """Map a worker kind reported by a server onto native / assisted."""
    if not name:
        return default
    n = name.lower()
    if "assist" in n or "remote" in n:
        return ASSISTED
    if "native" in n or "gpu" in n:
        return NATIVE
    return n


@dataclass
class ClusterSpec:
    gpus: int = 1
    native_per_gpu: int = 1
    cpu_nodes: int = 0
    tenants_per_gpu: int = 8
    tenant_slowdown: float = 0.0
    policy: str = "fifo"
    dispatch: str = "fastest"  # fifo only: which idle worker takes a request: fastest | longest-idle

    def workers(self) -> tuple[np.ndarray, np.ndarray]:
        """(kind per worker: 0 native / 1 assisted, slowdown factor per worker), shape (W,) each."""
        if self.gpus < 0 or self.native_per_gpu < 0 or self.cpu_nodes < 0 or self.tenants_per_gpu < 0:
            raise SimError(f"negative cluster size in {self}")
        n_native = self.gpus * self.native_per_gpu
        n_assisted = min(self.cpu_nodes, self.gpus * self.tenants_per_gpu)
        if n_native + n_assisted == 0:
            raise SimError(f"cluster has no workers: {self}")
        kinds = np.concatenate([np.zeros(n_native, int), np.ones(n_assisted, int)])
        factor = np.ones(n_native + n_assisted)
        if n_assisted and self.tenant_slowdown:
            per_gpu = np.bincount(np.arange(n_assisted) % self.gpus, minlength=self.gpus)
            tenants = per_gpu[np.arange(n_assisted) % self.gpus]
            factor[n_native:] = 1.0 + self.tenant_slowdown * (tenants - 1)
        return kinds, factor


@dataclass
class SimResult:
    arrival: np.ndarray  # (n,) s
    start: np.ndarray  # (n,) s
    finish: np.ndarray  # (n,) s
    worker: np.ndarray  # (n,) worker index
    kind: np.ndarray  # (n,) 0 native / 1 assisted

    @property
    def queue_delay(self) -> np.ndarray:
        return self.start - self.arrival

    @property
    def jct(self) -> np.ndarray:
        return self.finish - self.arrival

    def summary(self) -> dict[str, float]:
        q, j = self.queue_delay, self.jct
        span = float(self.finish.max() - self.arrival.min()) or 1.0
        return {
            "requests": int(len(j)),
            "mean_queue_delay_s": float(q.mean()),
            "p99_queue_delay_s": float(np.percentile(q, 99)),
            "mean_jct_s": float(j.mean()),
            "p50_jct_s": float(np.median(j)),
            "p99_jct_s": float(np.percentile(j, 99)),
            "throughput_rps": float(len(j) / span),
            "assisted_share": float(self.kind.mean()),
        }


def simulate(arrivals: np.ndarray, service: ServiceModel, cluster: ClusterSpec, *, seed: int = 0,
             service_times: Optional[np.ndarray] = None) -> SimResult:
    """Run one simulation of ``len(arrivals)`` requests (arrivals: sorted offsets in s, shape (n,)).

    ``service_times`` (shape (n,)) replays given per-request service times instead of drawing them
    (trace-driven simulation); the worker choice still follows the policy."""
    a = np.asarray(arrivals, dtype=float)
    if a.ndim != 1 or len(a) == 0:
        raise SimError("arrivals must be a non-empty 1-D array")
    if np.any(np.diff(a) < 0):
        raise SimError("arrivals must be sorted")
    kinds, factor = cluster.workers()
    rng = np.random.default_rng(seed)
    names = (NATIVE, ASSISTED)
    # Pre-draw each request's service time on either kind: shape (2, n).
    if service_times is not None:
        st = np.asarray(service_times, dtype=float)
        if st.shape != a.shape:
            raise SimError(f"service_times shape {st.shape} != arrivals shape {a.shape}")
        draws = np.stack([st, st])
    else:
        draws = np.stack([service.draw(names[k], rng, len(a)) if (kinds == k).any() else np.zeros(len(a)) for k in (0, 1)])
    means = np.array([service.mean(names[k]) if (kinds == k).any() else np.inf for k in (0, 1)])
    if cluster.policy == "fifo":
        if cluster.dispatch not in ("fastest", "longest-idle"):
            raise SimError(f"unknown dispatch {cluster.dispatch!r}; choose fastest or longest-idle")
        return _fifo(a, draws, means, kinds, factor, longest_idle=cluster.dispatch == "longest-idle")
    if cluster.policy == "ect":
        return _ect(a, draws, means, kinds, factor)
    raise SimError(f"unknown policy {cluster.policy!r}; choose fifo or ect")


def _fifo(a, draws, means, kinds, factor, *, longest_idle: bool = False) -> SimResult:
    n, W = len(a), len(kinds)
    start, finish = np.empty(n), np.empty(n)
    worker = np.empty(n, dtype=int)
    order = np.argsort(means)  # preferred kind first
    # Idle workers per kind (fastest) or all in one (longest-idle), oldest-idle first.
    idle: list[deque[int]] = [deque(), deque()]
    for w in range(W):
        idle[0 if longest_idle else kinds[w]].append(w)
    busy: list[tuple[float, int]] = []  # heap of (free_time, worker)
    for i in range(n):
        t = a[i]
        while busy and busy[0][0] <= t:
            _, w = heapq.heappop(busy)
            idle[0 if longest_idle else kinds[w]].append(w)
        w = -1
        for k in ((0,) if longest_idle else order):
            if idle[k]:
                w = idle[k].popleft()
                break
        if w < 0:
            t, w = heapq.heappop(busy)
        s = t + draws[kinds[w], i] * factor[w]
        start[i], finish[i], worker[i] = t, s, w
        heapq.heappush(busy, (s, w))
    return SimResult(a, start, finish, worker, kinds[worker])


def _ect(a, draws, means, kinds, factor) -> SimResult:
    n = len(a)
    free = np.zeros(len(kinds))
    expected = means[kinds] * factor
    start, finish = np.empty(n), np.empty(n)
    worker = np.empty(n, dtype=int)
    for i in range(n):
        begin = np.maximum(free, a[i])
        w = int(np.argmin(begin + expected))
        start[i] = begin[w]
        finish[i] = free[w] = begin[w] + draws[kinds[w], i] * factor[w]
        worker[i] = w
    return SimResult(a, start, finish, worker, kinds[worker])


def replicate(arrivals: np.ndarray, service: ServiceModel, cluster: ClusterSpec, *, replicas: int = 1, seed: int = 0) -> dict[str, float]:
    """Mean of :meth:`SimResult.summary` over ``replicas`` seeds (same arrivals)."""
    sums: dict[str, float] = {}
    for r in range(replicas):
        for k, v in simulate(arrivals, service, cluster, seed=seed + r).summary().items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / replicas for k, v in sums.items()}


@dataclass
class Projection:
    """A sweep over CPU-node counts for one GPU count and load."""

    gpus: int
    rate_rps: float
    cpu_nodes: list[int]
    rows: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def project(
    service: ServiceModel,
    *,
    gpus: int,
    cpu_nodes: Sequence[int],
    rate_rps: Optional[float] = None,
    load: float = 0.9,
    num_requests: int = 20000,
    tenants_per_gpu: int = 8,
    tenant_slowdown: float = 0.0,
    policy: str = "fifo",
    arrivals: Optional[np.ndarray] = None,
    cv: float = 1.0,
    seed: int = 0,
) -> Projection:
    """Queue delay and JCT for ``gpus`` GPUs and each CPU-node count in ``cpu_nodes``.

    Without ``arrivals`` the requests arrive with gamma gaps of coefficient of variation ``cv`` (1: Poisson);
    without ``rate_rps`` either, the rate is ``load`` times the native-only capacity
    (``gpus / mean native service``), so the GPU-only baseline is busy but stable."""
    if arrivals is None:
        if rate_rps is None:
            rate_rps = load * gpus / service.mean(NATIVE)
        from caserve.bench.arrivals import gamma

        arrivals = gamma(num_requests, rate_rps, cv=cv, seed=seed)
    else:
        rate_rps = float(len(arrivals) / max(arrivals[-1] - arrivals[0], 1e-9))
    proj = Projection(gpus=gpus, rate_rps=float(rate_rps), cpu_nodes=list(cpu_nodes))
    base = None
    for c in cpu_nodes:
        cl = ClusterSpec(gpus=gpus, cpu_nodes=c, tenants_per_gpu=tenants_per_gpu, tenant_slowdown=tenant_slowdown, policy=policy)
        row: dict[str, Any] = {"cpu_nodes": c, "assisted_workers": int((cl.workers()[0] == 1).sum())}
        row.update(simulate(arrivals, service, cl, seed=seed).summary())
        if base is None:
            base = row
        row["jct_reduction_pct"] = reduction_pct(base["mean_jct_s"], row["mean_jct_s"])
        row["queue_delay_reduction_pct"] = reduction_pct(base["mean_queue_delay_s"], row["mean_queue_delay_s"])
        proj.rows.append(row)
        logger.info("sim gpus=%d cpu_nodes=%d: mean JCT %.3fs", gpus, c, row["mean_jct_s"])
    return proj


def validate_against(doc: Mapping[str, Any], *, replicas: int = 20, policy: str = "fifo", dispatch: str = "longest-idle") -> dict[str, float]:
    """Simulate a measured run (its own arrivals and worker counts) and compare mean JCT, two ways:

    * resampled (``simulated_mean_jct_s``, ``relative_error``): service times drawn i.i.d. from the run's
      empirical distribution, as projections do; mean over ``replicas`` seeds.
    * trace-driven (``replay_mean_jct_s``, ``replay_relative_error``): each request keeps its measured
      service time; this checks the queue and dispatch model alone, also when service times drift during
      the run (e.g. a shared machine), which i.i.d. draws cannot represent.

    Worker counts come from ``meta.workers`` (``{"native": N, "assisted": K}``) or, failing that, from the
    distinct worker ids in the per-request timings."""
    from caserve.bench.run import records_of

    recs = [r for r in records_of(dict(doc)) if r.success and r.server is not None]
    if not recs:
        raise SimError("validation needs a run with caserve per-request timings")
    counts = dict(doc.get("meta", {}).get("workers") or {})
    if not counts:
        for kind in (NATIVE, ASSISTED):
            counts[kind] = len({r.server.worker_id for r in recs if _kind(r.server.worker_kind, NATIVE) == kind})
    recs.sort(key=lambda r: r.server.arrival)
    arrivals = np.array([r.server.arrival for r in recs])
    arrivals -= arrivals[0]
    service = ServiceModel.from_records(recs)
    cl = ClusterSpec(gpus=1, native_per_gpu=int(counts.get(NATIVE, 0)), cpu_nodes=int(counts.get(ASSISTED, 0)),
                     tenants_per_gpu=max(1, int(counts.get(ASSISTED, 0))), policy=policy, dispatch=dispatch)
    sim = replicate(arrivals, service, cl, replicas=replicas)
    replay = simulate(arrivals, service, cl, service_times=np.array([r.server.service for r in recs])).summary()
    measured = float(np.mean([r.server.jct for r in recs]))
    measured_q = float(np.mean([r.server.queue_delay for r in recs]))
    return {
        "measured_mean_jct_s": measured,
        "simulated_mean_jct_s": sim["mean_jct_s"],
        "relative_error": abs(sim["mean_jct_s"] - measured) / measured,
        "replay_mean_jct_s": replay["mean_jct_s"],
        "replay_relative_error": abs(replay["mean_jct_s"] - measured) / measured,
        "measured_mean_queue_delay_s": measured_q,
        "simulated_mean_queue_delay_s": sim["mean_queue_delay_s"],
        "requests": len(recs),
        "workers": counts,
    }
