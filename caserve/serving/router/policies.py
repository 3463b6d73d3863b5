"""Dispatch policies: which queued jobs go to which worker with free slots, now.

One interface (:class:`DispatchPolicy`), two implementations (:class:`FcfsPolicy`,
:class:`EctPolicy`), built by one factory (:func:`make_policy`). A policy is a pure decision over a
snapshot of one model's queue and workers; the router applies the decisions. A worker has
``max_batch`` slots; ``free_slots`` of them can take a job now (a continuous-batching worker has a free
slot whenever fewer than ``max_batch`` jobs run there; a static one only when it is idle). Both
policies form dispatches the same way (:func:`fill_batch`): a dispatched job takes along compatible
jobs queued behind it, in queue order, up to the worker's free slots.
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass
from typing import Collection, Optional, Protocol, Sequence

from caserve.serving.router.jobs import Job

logger = logging.getLogger(__name__)

POLICIES = ("fcfs", "ect")


class WorkerView(Protocol):
    """What a policy may know about a worker."""

    id: str
    kind: str
    max_batch: int
    free_slots: int  # jobs it can start now
    running: int  # jobs running there now
    idle_since: Optional[float]  # None while it runs jobs
    slot_free_at: float  # when its next slot is expected to free (its running jobs' estimates)
    groups: Collection[str]  # prompt groups of the jobs running there: another choice skips its prefill there


@dataclass
class _Rates:
    """Linear service-time model of one worker: ``overhead + prefill * prompt_units + step(k) * tokens``,
    where a decode step running k slots takes ``step(k) = step_s + slot_s * (k - 1)``."""

    overhead_s: float = 0.0
    prefill_s_per_unit: float = 0.0
    step_s: float = 0.0
    slot_s: float = 0.0
    samples: int = 0
    moments: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # EWMA of k, t, k*k, k*t per step
    step_samples: int = 0
    job_samples: int = 0

    def step(self, occupancy: float) -> float:
        return self.step_s + self.slot_s * (max(1.0, occupancy) - 1.0)


class ServiceModel:
    """Per-worker service-time estimates learned from what workers report.

    For each worker: the time of a decode step as a line in the number of slots it runs (a least-squares
    fit over exponentially weighted (``alpha``) moments of the steps' occupancy and duration, from the
    worker's progress reports), prefill seconds per prompt unit (from the durations finished jobs
    report) and a fixed overhead (router-observed job time minus both).
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
        prefill_s: float, decode_s: float, observed_s: float, occupancy: float = 1.0,
    ) -> None:
        """A finished job (or batch): its steps ran ``occupancy`` slots on average."""
        self.observe_steps(worker_id, kind, steps=steps, decode_s=decode_s, occupancy=occupancy * steps)
        self.observe_job(worker_id, kind, prompt_units=prompt_units, prefill_s=prefill_s, decode_s=decode_s,
                         observed_s=observed_s)

    def observe_job(self, worker_id: str, kind: str, *, prompt_units: int, prefill_s: float, decode_s: float,
                    observed_s: float) -> None:
        r = self._rates.setdefault(worker_id, _Rates())
        self._kinds[worker_id] = kind
        first = r.job_samples == 0
        if prompt_units > 0:
            r.prefill_s_per_unit = self._ewma(r.prefill_s_per_unit, prefill_s / prompt_units, first)
        r.overhead_s = self._ewma(r.overhead_s, max(0.0, observed_s - prefill_s - decode_s), first)
        r.job_samples += 1
        r.samples = r.job_samples + r.step_samples

    def observe_steps(self, worker_id: str, kind: str, *, steps: int, decode_s: float, occupancy: int) -> None:
        """``steps`` decode steps took ``decode_s`` and ran ``occupancy`` slots in all."""
        if steps <= 0:
            return
        r = self._rates.setdefault(worker_id, _Rates())
        self._kinds[worker_id] = kind
        k, t = max(1.0, occupancy / steps), decode_s / steps
        first = r.step_samples == 0
        mk, mt, mkk, mkt = (self._ewma(old, new, first) for old, new in zip(r.moments, (k, t, k * k, k * t)))
        r.moments, r.step_samples = (mk, mt, mkk, mkt), r.step_samples + 1
        var = mkk - mk * mk
        slope = max(0.0, (mkt - mk * mt) / var) if var > 1e-6 else r.slot_s
        r.slot_s = slope
        r.step_s = max(0.0, mt - slope * (mk - 1.0))
        r.samples = r.job_samples + r.step_samples

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
                    sum(k.slot_s for k in known) / n,
                )
        return _Rates()

    def estimate(self, worker_id: str, kind: str, prompt_units: int, output_tokens: int,
                 occupancy: float = 1.0) -> float:
        """One job's service time on a worker whose decode steps run ``occupancy`` slots."""
        r = self.rates(worker_id, kind)
        return r.overhead_s + r.prefill_s_per_unit * prompt_units + r.step(occupancy) * output_tokens

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            w: {"overhead_s": r.overhead_s, "prefill_s_per_unit": r.prefill_s_per_unit,
                "step_s": r.step_s, "slot_s": r.slot_s, "samples": r.samples}
            for w, r in self._rates.items()
        }


Assignment = tuple[WorkerView, list[Job]]


def fill_batch(queue: Sequence[Job], head: int, max_batch: int, taken: set[int], room: int = 0) -> list[Job]:
    """``queue[head]`` plus up to ``max_batch - 1`` later, untaken jobs with the same batch key; then the
    other choices of the requests in the batch (equal ``Job.group``), up to ``room`` jobs in all (the
    worker's free slots), so that a worker gets them together and prefills their prompt once."""
    batch = [queue[head]]
    taken.add(head)
    for i in range(head + 1, len(queue)):
        if len(batch) >= max_batch:
            break
        if i not in taken and queue[i].batch_key == queue[head].batch_key:
            batch.append(queue[i])
            taken.add(i)
    groups = {j.group for j in batch if j.group is not None}
    for i in range(head + 1, len(queue)):
        if len(batch) >= room or not groups:
            break
        if i not in taken and queue[i].group in groups and queue[i].batch_key == queue[head].batch_key:
            batch.append(queue[i])
            taken.add(i)
    return batch


def prompt_units(job: Job, worker: WorkerView) -> int:
    """The prompt ``job`` would prefill on ``worker``: none when other choices of its request run there
    (the worker copies their prompt's KV columns), else all of it."""
    return 0 if job.group is not None and job.group in worker.groups else job.prompt_units


def share_out(n_jobs: int, open_: Sequence[WorkerView]) -> dict[str, int]:
    """Jobs per worker with free slots: ``n_jobs`` spread evenly, capped by each worker's ``free_slots``
    (water-filling, smallest cap first, so that the total is ``min(n_jobs, total free slots)``).
    ``open_`` is in dispatch order."""
    sizes: dict[str, int] = {}
    left = n_jobs
    order = {w.id: i for i, w in enumerate(open_)}  # among equal caps, the first in order gets the larger share
    ordered = sorted(open_, key=lambda w: (w.free_slots, order[w.id]))
    for i, w in enumerate(ordered):
        sizes[w.id] = min(w.free_slots, math.ceil(left / (len(ordered) - i))) if left > 0 else 0
        left -= sizes[w.id]
    return sizes


class DispatchPolicy(abc.ABC):
    """Decides, for one model, which queued jobs start now on which idle workers."""

    name: str

    def __init__(self, service: ServiceModel) -> None:
        self.service = service

    @abc.abstractmethod
    def assign(self, queue: Sequence[Job], workers: Sequence[WorkerView], now: float) -> list[Assignment]:
        """Return (worker, jobs) pairs, at most ``free_slots`` jobs each; every job and worker appears at
        most once."""


class FcfsPolicy(DispatchPolicy):
    """First come, first served over one shared FIFO queue (the reference system).

    Algorithm: while the queue is not empty and some worker has a free slot, the workers with free
    slots take the jobs at the head of the queue in order: idle workers first, the longest idle first,
    then busy ones, the least loaded first. The queue is shared out among them (water-filling: each gets
    ``ceil(jobs left / workers left)``, at most its free slots, smallest cap first), so that a burst is
    spread rather than piled onto one worker; a head job whose request's other choices run on one of
    them goes to that one (it copies their prompt's KV instead of prefilling it), and the queued
    choices of one request go to the first of them with room for all (one prefill), where there is
    one. Worker speed is ignored: a slow worker with a free slot is always used rather than wait.
    """

    name = "fcfs"

    def assign(self, queue: Sequence[Job], workers: Sequence[WorkerView], now: float) -> list[Assignment]:
        open_ = sorted((w for w in workers if w.free_slots > 0),
                       key=lambda w: (w.idle_since is None, w.idle_since or 0.0, w.running, w.id))
        sizes = share_out(len(queue), open_)
        taken: set[int] = set()
        out: list[Assignment] = []
        head = 0
        unused = list(open_)
        while unused:
            while head < len(queue) and head in taken:
                head += 1
            if head >= len(queue):
                break
            worker = self._worker_for(queue, head, taken, unused)
            unused.remove(worker)
            out.append((worker, fill_batch(queue, head, max(1, sizes[worker.id]), taken, worker.free_slots)))
        return out

    @staticmethod
    def _worker_for(queue: Sequence[Job], head: int, taken: set[int], unused: list[WorkerView]) -> WorkerView:
        """The worker for ``queue[head]``: the first in order, unless the job is a choice of an ``n`` > 1
        request; then the one where its siblings run (their prefill serves it too), else the first with
        room for all of its queued choices (one prefill for them all), else the first."""
        group = queue[head].group
        if group is None:
            return unused[0]
        home = next((w for w in unused if group in w.groups), None)
        if home is not None:
            return home
        choices = sum(1 for i in range(head, len(queue)) if i not in taken and queue[i].group == group)
        return next((w for w in unused if w.free_slots >= choices), unused[0])


class EctPolicy(DispatchPolicy):
    """Expected completion time: each job goes where it is expected to finish first.

    Algorithm (list scheduling over the first ``window`` queued jobs, in arrival order): every worker
    has a *free-at* time, ``now`` when it has a free slot, else when its next slot is expected to free
    (its running jobs' dispatch times plus their estimates; never before ``now``). For each job, the
    expected completion on worker ``w`` is ``free_at[w] + estimate(w, prompt length, max_tokens,
    occupancy)``, where the per-step cost grows with the slots ``w`` would then run and a choice whose
    siblings run on ``w`` costs no prefill there (it copies their prompt's KV); the job picks the
    minimum. If that worker has a free slot and is still unclaimed in this round, the job is dispatched
    to it (with compatible jobs behind it, up to its free slots and an even share of the queue among
    the workers with free slots); otherwise the job stays queued and reserves the worker
    (``free_at[w] += estimate``), so later jobs see it as taken. A job therefore waits for a busy fast
    worker instead of taking a free slow one when the fast one is expected to finish it sooner, while
    later jobs may still use the slow one. A worker not measured yet is estimated at zero cost
    (optimism), so every worker gets measured once instead of borrowing rates that could hide that it
    is faster.
    """

    name = "ect"

    def __init__(self, service: ServiceModel, window: int = 64) -> None:
        super().__init__(service)
        self.window = window

    def assign(self, queue: Sequence[Job], workers: Sequence[WorkerView], now: float) -> list[Assignment]:
        free_at = {w.id: now if w.free_slots > 0 else max(now, w.slot_free_at) for w in workers}
        claimed: set[str] = set()
        taken: set[int] = set()
        out: list[Assignment] = []
        for i in range(min(len(queue), self.window)):
            if i in taken:
                continue
            job = queue[i]
            best, best_key = None, None
            for w in workers:
                cost = (self.service.estimate(w.id, w.kind, prompt_units(job, w), job.expected_output, w.running + 1)
                        if self.service.known(w.id) else 0.0)
                t = free_at[w.id] + cost
                startable = w.free_slots > 0 and w.id not in claimed
                key = (t, not startable, w.id)  # ties go to a worker that can start now
                if best_key is None or key < best_key:
                    best, best_key = w, key
            if best is None or best_key is None:
                break
            if not best_key[1]:
                startable = sum(1 for w in workers if w.free_slots > 0 and w.id not in claimed)
                share = math.ceil((min(len(queue), self.window) - len(taken)) / max(1, startable))
                batch = fill_batch(queue, i, max(1, min(best.free_slots, share)), taken, best.free_slots)
                claimed.add(best.id)
                free_at[best.id] = now + (max(self.service.estimate(best.id, best.kind, prompt_units(j, best),
                                                                    j.expected_output, best.running + len(batch))
                                              for j in batch)
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
