"""Dispatch policies: which queued jobs go to which idle worker, now.

One interface (:class:`DispatchPolicy`), two implementations (:class:`FcfsPolicy`,
:class:`EctPolicy`), built by one factory (:func:`make_policy`). A policy is a pure decision over a
snapshot of one model's queue and workers; the router applies the decisions. Both policies form
batches the same way (:func:`fill_batch`): a dispatched job takes along up to ``max_batch - 1``
compatible jobs queued behind it, in queue order.
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from caserve.serving.router.jobs import Job

logger = logging.getLogger(__name__)

POLICIES = ("fcfs", "ect")


class WorkerView(Protocol):
    """What a policy may know about a worker."""

    id: str
    kind: str
    max_batch: int
    idle_since: Optional[float]  # None while busy
    busy_since: Optional[float]
    batch_estimate_s: float  # the service model's estimate for the batch it is running


@dataclass
class _Rates:
    """Linear service-time model of one worker: ``overhead + prefill * prompt_units + step * tokens``."""

    overhead_s: float = 0.0
    prefill_s_per_unit: float = 0.0
    step_s: float = 0.0
    samples: int = 0


class ServiceModel:
    """Per-worker service-time estimates learned from finished batches.

    For each worker, three rates are exponentially weighted averages (``alpha``) of what its finished
    batches showed: decode seconds per generated step and prefill seconds per prompt unit (from the
    durations the worker reports), and a fixed overhead (router-observed batch time minus both).
    A worker without samples borrows the mean rates of workers of the same kind, else of all workers,
    else zero (used for busy-time and Retry-After estimates; ECT treats unmeasured workers as free).
    """

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self._rates: dict[str, _Rates] = {}
        self._kinds: dict[str, str] = {}

    def _ewma(self, old: float, new: float, first: bool) -> float:
        return new if first else (1 - self.alpha) * old + self.alpha * new

    def observe(
        self, worker_id: str, kind: str, *, prompt_units: int, steps: int,
        prefill_s: float, decode_s: float, observed_s: float,
    ) -> None:
        r = self._rates.setdefault(worker_id, _Rates())
        self._kinds[worker_id] = kind
        first = r.samples == 0
        if prompt_units > 0:
            r.prefill_s_per_unit = self._ewma(r.prefill_s_per_unit, prefill_s / prompt_units, first)
        if steps > 0:
            r.step_s = self._ewma(r.step_s, decode_s / steps, first)
        r.overhead_s = self._ewma(r.overhead_s, max(0.0, observed_s - prefill_s - decode_s), first)
        r.samples += 1

    def known(self, worker_id: str) -> bool:
        r = self._rates.get(worker_id)
        return r is not None and r.samples > 0

    def forget(self, worker_id: str) -> None:
        self._rates.pop(worker_id, None)
        self._kinds.pop(worker_id, None)

    def rates(self, worker_id: str, kind: str) -> _Rates:
        r = self._rates.get(worker_id)
        if r is not None and r.samples:
            return r
        for pool in ([w for w, k in self._kinds.items() if k == kind], list(self._kinds)):
            known = [self._rates[w] for w in pool if self._rates[w].samples]
            if known:
                n = len(known)
                return _Rates(
                    sum(k.overhead_s for k in known) / n,
                    sum(k.prefill_s_per_unit for k in known) / n,
                    sum(k.step_s for k in known) / n,
                )
        return _Rates()

    def estimate(self, worker_id: str, kind: str, prompt_units: int, output_tokens: int) -> float:
        r = self.rates(worker_id, kind)
        return r.overhead_s + r.prefill_s_per_unit * prompt_units + r.step_s * output_tokens

    def estimate_batch(self, worker_id: str, kind: str, jobs: Sequence[Job]) -> float:
        """A padded batch runs its summed prefill once and as many decode steps as its longest row."""
        units = sum(j.prompt_units for j in jobs)
        steps = max((j.expected_output for j in jobs), default=0)
        return self.estimate(worker_id, kind, units, steps)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            w: {"overhead_s": r.overhead_s, "prefill_s_per_unit": r.prefill_s_per_unit,
                "step_s": r.step_s, "samples": r.samples}
            for w, r in self._rates.items()
        }


Assignment = tuple[WorkerView, list[Job]]


def fill_batch(queue: Sequence[Job], head: int, max_batch: int, taken: set[int]) -> list[Job]:
    """``queue[head]`` plus up to ``max_batch - 1`` later, untaken jobs with the same batch key."""
    batch = [queue[head]]
    taken.add(head)
    for i in range(head + 1, len(queue)):
        if len(batch) >= max_batch:
            break
        if i not in taken and queue[i].batch_key == queue[head].batch_key:
            batch.append(queue[i])
            taken.add(i)
    return batch


def share_out(n_jobs: int, idle: Sequence[WorkerView]) -> dict[str, int]:
    """Batch size per idle worker: ``n_jobs`` spread evenly, capped by each worker's ``max_batch``
    (water-filling, smallest cap first, so that the total is ``min(n_jobs, total capacity)``).
    ``idle`` is in dispatch order."""
    sizes: dict[str, int] = {}
    left = n_jobs
    order = {w.id: i for i, w in enumerate(idle)}  # among equal caps, the longest idle gets the larger share
    ordered = sorted(idle, key=lambda w: (w.max_batch, order[w.id]))
    for i, w in enumerate(ordered):
        sizes[w.id] = min(w.max_batch, math.ceil(left / (len(ordered) - i))) if left > 0 else 0
        left -= sizes[w.id]
    return sizes


class DispatchPolicy(abc.ABC):
    """Decides, for one model, which queued jobs start now on which idle workers."""

    name: str

    def __init__(self, service: ServiceModel) -> None:
        self.service = service

    @abc.abstractmethod
    def assign(self, queue: Sequence[Job], workers: Sequence[WorkerView], now: float) -> list[Assignment]:
        """Return (idle worker, batch) pairs; every job and worker appears at most once."""


class FcfsPolicy(DispatchPolicy):
    """First come, first served over one shared FIFO queue (the reference system).

    Algorithm: while the queue is not empty and some worker is idle, the worker that has been idle
    longest takes the job at the head of the queue together with compatible jobs behind it. Batch
    sizes share the queue out among the idle workers (water-filling: each gets ``ceil(jobs left /
    workers left)``, at most its ``max_batch``, smallest ``max_batch`` first), so idle workers are
    not left waiting while one of them takes a large batch. Worker speed is ignored: a slow idle
    worker is always used rather than wait.
    """

    name = "fcfs"

    def assign(self, queue: Sequence[Job], workers: Sequence[WorkerView], now: float) -> list[Assignment]:
        idle = sorted((w for w in workers if w.idle_since is not None), key=lambda w: (w.idle_since, w.id))
        sizes = share_out(len(queue), idle)
        taken: set[int] = set()
        out: list[Assignment] = []
        head = 0
        for worker in idle:
            while head < len(queue) and head in taken:
                head += 1
            if head >= len(queue):
                break
            out.append((worker, fill_batch(queue, head, max(1, sizes[worker.id]), taken)))
        return out


class EctPolicy(DispatchPolicy):
    """Expected completion time: each job goes where it is expected to finish first.

    Algorithm (list scheduling over the first ``window`` queued jobs, in arrival order): every worker
    has a *free-at* time, ``now`` when idle, else its batch's dispatch time plus the service model's
    estimate for that batch (never before ``now``). For each job, the expected completion on worker
    ``w`` is ``free_at[w] + estimate(w, prompt length, max_tokens)``; the job picks the minimum.
    If that worker is idle and still unclaimed in this round, the job is dispatched to it (with
    compatible jobs behind it, up to ``max_batch`` and an even share of the queue among the idle
    workers); otherwise the job stays queued and reserves the
    worker (``free_at[w] += estimate``), so later jobs see it as taken. A job therefore waits for a
    busy fast worker instead of taking an idle slow one when the fast one is expected to finish it
    sooner, while later jobs may still use the slow one. A worker that has not finished a batch yet
    is estimated at zero cost (optimism), so every worker gets measured once instead of borrowing
    rates that could hide that it is faster.
    """

    name = "ect"

    def __init__(self, service: ServiceModel, window: int = 64) -> None:
        super().__init__(service)
        self.window = window

    def assign(self, queue: Sequence[Job], workers: Sequence[WorkerView], now: float) -> list[Assignment]:
        free_at: dict[str, float] = {}
        for w in workers:
            if w.idle_since is not None:
                free_at[w.id] = now
            else:
                started = w.busy_since if w.busy_since is not None else now
                free_at[w.id] = max(now, started + w.batch_estimate_s)
        claimed: set[str] = set()
        taken: set[int] = set()
        out: list[Assignment] = []
        for i in range(min(len(queue), self.window)):
            if i in taken:
                continue
            job = queue[i]
            best, best_key = None, None
            for w in workers:
                cost = (self.service.estimate(w.id, w.kind, job.prompt_units, job.expected_output)
                        if self.service.known(w.id) else 0.0)
                t = free_at[w.id] + cost
                startable = w.idle_since is not None and w.id not in claimed
                key = (t, not startable, w.id)  # ties go to a worker that can start now
                if best_key is None or key < best_key:
                    best, best_key = w, key
            if best is None or best_key is None:
                break
            if not best_key[1]:
                startable = sum(1 for w in workers if w.idle_since is not None and w.id not in claimed)
                share = math.ceil((min(len(queue), self.window) - len(taken)) / max(1, startable))
                batch = fill_batch(queue, i, max(1, min(best.max_batch, share)), taken)
                claimed.add(best.id)
                free_at[best.id] = now + (self.service.estimate_batch(best.id, best.kind, batch)
                                          if self.service.known(best.id) else 0.0)
                out.append((best, batch))
            else:
                free_at[best.id] = best_key[0]  # reserve: the job will wait for this worker
        return out


def make_policy(name: str, service: Optional[ServiceModel] = None) -> DispatchPolicy:
    """The factory: ``"fcfs"`` or ``"ect"``."""
    service = service or ServiceModel()
    if name == "fcfs":
        return FcfsPolicy(service)
    if name == "ect":
        return EctPolicy(service)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
