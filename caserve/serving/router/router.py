"""The router: one queue per model, worker sessions, dispatch through a policy, requeue on loss.

Everything here runs on the router's asyncio loop (no locks). The HTTP layers call in:
``api`` submits and cancels jobs, ``worker_api`` registers workers and feeds their events.
Exactly-once: a job accepts events only from the dispatch it is currently running under
(``Job.dispatch_id``); a requeued job ignores whatever its previous worker still sends. Worker events
arrive as typed :mod:`caserve.serving.messages` structs; a batch of events naming a dispatch id that was
never sent to that worker session is refused whole (nothing of it is applied).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from caserve.serving.errors import (
    WORKER_ERROR_TYPES, BadRequest, Conflict, ModelNotFound, NotFound, QueueFull, RequestCancelled, RequestFailed,
    ServingError,
)
from caserve.serving.messages import (
    MODEL_TASKS, Cancel, Done, DrainReply, Error, Event, Progress, RouterMessage, Run, Tokens,
)
from caserve.serving.router.jobs import Job, JobState
from caserve.serving.router.metrics import ServingMetrics
from caserve.serving.router.policies import ServiceModel, make_policy

logger = logging.getLogger(__name__)

REMEMBERED_DISPATCHES = 4096  # dispatch ids a session remembers, so that late events of old rows are known
MAX_MODELS = 64  # configured models plus those registered workers serve


@dataclass(eq=False)
class WorkerSession:
    """One registration of a worker. A worker that re-registers gets a new session."""

    id: str
    kind: str
    model: str
    task: str
    max_batch: int
    max_context: int
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    outbox: "asyncio.Queue[Optional[RouterMessage]]" = field(default_factory=asyncio.Queue)
    jobs: dict[str, Job] = field(default_factory=dict)  # dispatch id -> job, running here
    # every dispatch id sent to this session (the last REMEMBERED_DISPATCHES), finished or not
    dispatched: "collections.OrderedDict[str, None]" = field(default_factory=collections.OrderedDict)
    batching: str = "continuous"  # static: takes jobs only when idle (see messages.RegisterRequest)
    idle_since: Optional[float] = field(default_factory=time.monotonic)
    busy_since: Optional[float] = None
    slot_free_at: float = 0.0  # when its next slot is expected to free (set before each policy decision)
    last_seen: float = field(default_factory=time.monotonic)
    registered_at: float = field(default_factory=time.monotonic)
    channel_open: bool = False
    alive: bool = True
    draining: bool = False  # receives no new jobs; its running jobs finish normally
    jobs_done: int = 0
    progress: dict[str, Any] = field(default_factory=dict)  # the worker's last progress report
    progress_at: Optional[float] = None

    @property
    def running(self) -> int:
        return len(self.jobs)

    @property
    def groups(self) -> set[str]:
        """The prompt groups (``n`` > 1 requests) of the jobs running here."""
        return {j.group for j in self.jobs.values() if j.group is not None}

    @property
    def free_slots(self) -> int:
        """Jobs this worker can start now: the router's own count (a cancelled job's slot counts as free
        at once; the worker holds a job sent meanwhile until its next step frees the slot)."""
        if self.batching == "static":
            return 0 if self.jobs else self.max_batch
        return max(0, self.max_batch - len(self.jobs))

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "task": self.task, "max_batch": self.max_batch,
            "batching": self.batching, "free_slots": self.free_slots,
            "busy": self.idle_since is None, "channel_open": self.channel_open, "draining": self.draining,
            "running": [j.id for j in self.jobs.values()], "registered_at": self.registered_at,
            "jobs_done": self.jobs_done, "progress": self.progress,
        }


@dataclass(eq=False)
class ModelState:
    name: str
    task: Optional[str] = None
    max_context: Optional[int] = None
    created: int = field(default_factory=lambda: int(time.time()))
    queue: list[Job] = field(default_factory=list)  # sorted by Job.seq (arrival order)
    workers: dict[str, WorkerSession] = field(default_factory=dict)


class Router:
    def __init__(
        self, *, policy: str = "fcfs", max_queue: int = 256, heartbeat_timeout_s: float = 10.0,
        max_attempts: int = 3, models: Iterable[str] = (), max_models: int = MAX_MODELS,
    ) -> None:
        self.service = ServiceModel()
        self.policy = make_policy(policy, self.service)
        self.max_queue = max_queue
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_attempts = max_attempts
        self.metrics = ServingMetrics()
        # Bounded: only configured models and those a registered (token-holding) worker serves; a
        # client naming any other model gets a 404 and adds nothing here or to the metrics.
        self.models: dict[str, ModelState] = {m: ModelState(m) for m in models}
        self.max_models = max(max_models, len(self.models))

    # ------------------------------------------------------------------------------------ client side

    def model(self, name: str, task: Optional[str] = None) -> ModelState:
        """The model's state; 404 when unknown, 400 when its workers cannot run ``task``."""
        state = self.models.get(name)
        if state is None:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise ModelNotFound(f"The model '{shown}' does not exist", param="model")
        if task is not None and state.task is not None and task not in MODEL_TASKS.get(state.task, set()):
            raise BadRequest(f"model '{name}' is a {state.task} model and cannot serve {task} requests",
                             param="model")
        return state

    def submit(self, jobs: list[Job]) -> None:
        """Admit all of ``jobs`` (one request) into their model's queue, or none (429)."""
        state = self.model(jobs[0].model, jobs[0].task)
        if len(state.queue) + len(jobs) > self.max_queue:
            self.metrics.rejected.labels(state.name).inc()
            raise QueueFull(
                f"queue for model '{state.name}' is full ({len(state.queue)} waiting)",
                retry_after_s=self._retry_after(state),
            )
        for job in jobs:
            self._enqueue(state, job)
        self._schedule(state)

    def cancel(self, job: Job) -> None:
        """The client went away: drop a queued job, or stop a running one and free its worker."""
        ws: Optional[WorkerSession] = None
        if job.state is JobState.QUEUED:
            state = self.models.get(job.model)
            if state is not None and job in state.queue:
                state.queue.remove(job)
                self._update_queue_gauge(state)
        elif job.state is JobState.RUNNING:
            ws = self._session_of(job)
            if ws is not None and job.dispatch_id is not None:
                ws.outbox.put_nowait(Cancel(dispatch=job.dispatch_id))
                ws.jobs.pop(job.dispatch_id, None)
                self._slot_freed(ws)
        else:
            return
        self._finish(job, JobState.CANCELLED, RequestCancelled("client disconnected"))
        if ws is not None:
            self._schedule(self.models[ws.model])

    # ------------------------------------------------------------------------------------ worker side

    def register(self, *, worker_id: str, kind: str, model: str, task: str, max_batch: int,
                 max_context: int, batching: str = "continuous") -> WorkerSession:
        if task not in MODEL_TASKS:
            raise BadRequest(f"unknown model task {task!r}", param="task")
        for other in self.models.values():
            if worker_id in other.workers:  # alive: lost sessions leave the table at once
                # Never evict a live session: a second registration under its id is refused, and a
                # restarted worker gets its id back once its old channel closed or timed out.
                logger.warning("refused registration of worker id %r for %s: a live session holds it",
                               worker_id, model)
                raise Conflict(f"worker id {worker_id!r} is held by a live session; pick another id or "
                               f"retry once that worker is gone", param="worker_id")
        if model not in self.models and len(self.models) >= self.max_models:
            raise Conflict(f"this router already serves {len(self.models)} models (its limit)", param="model")
        state = self.models.setdefault(model, ModelState(model))
        state.task = state.task or task
        state.max_context = max_context
        ws = WorkerSession(worker_id, kind, model, task, max(1, max_batch), max_context, batching=batching)
        state.workers[worker_id] = ws
        self._update_worker_gauge(state)
        logger.info("worker %s (%s) registered for %s, %d slot(s), %s batching", worker_id, kind, model,
                    ws.max_batch, batching)
        return ws

    def session(self, worker_id: str, session: str) -> WorkerSession:
        for state in self.models.values():
            ws = state.workers.get(worker_id)
            if ws is not None and ws.session == session and ws.alive:
                ws.last_seen = time.monotonic()
                return ws
        raise NotFound(f"no live session {session!r} for worker {worker_id!r}; register again")

    def channel_opened(self, ws: WorkerSession) -> None:
        ws.channel_open = True
        self._schedule(self.models[ws.model])

    def drain(self, worker_id: str) -> DrainReply:
        """Stop dispatching to a worker (before stopping it); its running jobs finish normally.
        ``running == 0`` in the reply means it can be stopped without a requeue. Unknown workers (already
        gone) count as drained."""
        for state in self.models.values():
            ws = state.workers.get(worker_id)
            if ws is not None and ws.alive:
                if not ws.draining:
                    ws.draining = True
                    logger.info("worker %s draining (%d job(s) running)", worker_id, len(ws.jobs))
                return DrainReply(worker_id=worker_id, draining=True, running=len(ws.jobs))
        return DrainReply(worker_id=worker_id, draining=True, running=0)

    def worker_lost(self, ws: WorkerSession, reason: str) -> None:
        """Forget a worker session and requeue (continuing, not restarting) whatever it was running."""
        if not ws.alive:
            return
        ws.alive = False
        ws.outbox.put_nowait(None)  # closes the channel if it is still open
        state = self.models[ws.model]
        if state.workers.get(ws.id) is ws:
            del state.workers[ws.id]
        self._account_busy(ws, time.monotonic())
        logger.warning("worker %s lost (%s); requeueing %d job(s)", ws.id, reason, len(ws.jobs))
        for job in list(ws.jobs.values()):
            if job.state is not JobState.RUNNING:
                continue
            if job.attempts >= self.max_attempts:
                self._finish(job, JobState.FAILED, RequestFailed(
                    f"request failed: its worker was lost {job.attempts} times (last: {reason})"))
                continue
            job.state, job.dispatch_id = JobState.QUEUED, None
            self.metrics.requeues.labels(job.model).inc()
            self._enqueue(state, job)
        ws.jobs.clear()
        self._update_worker_gauge(state)
        self._schedule(state)

    def handle_events(self, ws: WorkerSession, events: list[Event]) -> None:
        """Apply a worker's events in order. Refuses the whole list (400, nothing applied) when one names a
        dispatch id this session was never sent; events of rows that were requeued, cancelled or finished
        since are dropped (exactly-once)."""
        unknown = [e.dispatch for e in events if not isinstance(e, Progress) and e.dispatch not in ws.dispatched]
        if unknown:
            logger.warning("worker %s sent events for %d dispatch id(s) it was never sent (first %r); refused",
                           ws.id, len(unknown), unknown[0][:40])
            raise BadRequest(f"dispatch id {unknown[0][:40]!r} was never sent to this worker session",
                             param="events.dispatch")
        for event in events:
            if isinstance(event, Progress):
                self._progress(ws, event)
                continue
            job = ws.jobs.get(event.dispatch)
            if job is None or job.state is not JobState.RUNNING or job.dispatch_id != event.dispatch:
                continue  # a stale dispatch (job requeued, cancelled or finished): exactly-once
            now = time.monotonic()
            if (isinstance(event, (Tokens, Done)) and event.prompt_text is not None and job.echo
                    and job.prompt_text is None):
                # echo: the prompt's logprobs and text come with a row's first event (kept from the first
                # attempt when the job was requeued; ignored for a job that did not ask); a stream sends
                # the prompt before any token
                job.prompt_logprobs, job.prompt_text = event.prompt_logprobs, event.prompt_text
                job.events.put_nowait((job.choice, "prompt", None))
            if isinstance(event, Tokens):
                job.generated_ids.extend(event.ids)
                job.text += event.text
                if job.first_token is None:
                    job.first_token = now
                self.metrics.tokens.labels(job.model, ws.id, ws.kind).inc(len(event.ids))
                entries = list(event.logprobs or [])
                job.logprobs.extend(entries)
                if event.text or entries:
                    job.events.put_nowait((job.choice, "delta", (event.text, entries)))
            elif isinstance(event, Done):
                job.finish_reason = event.finish_reason
                job.prompt_tokens = event.prompt_tokens
                if event.embeddings is not None:
                    job.result = event.embeddings
                elif event.classes is not None:
                    job.result = [{"label": c.label, "score": c.score, "scores": c.scores} for c in event.classes]
                job.worker_durations = dict(event.durations)
                if job.first_token is None:
                    job.first_token = now
                job.completion_tokens = len(job.generated_ids)
                del ws.jobs[job.dispatch_id]
                self._learn(ws, job, now)
                self._finish(job, JobState.DONE, None)
                self._slot_freed(ws)
            elif isinstance(event, Error):
                error_type = WORKER_ERROR_TYPES.get(event.error_type, RequestFailed)
                del ws.jobs[job.dispatch_id]
                self._finish(job, JobState.FAILED, error_type(event.message))
                self._slot_freed(ws)
        if ws.alive:
            self._schedule(self.models[ws.model])

    async def reap_forever(self, period_s: float = 1.0) -> None:
        """Drop workers whose heartbeats stopped (a channel that closes is noticed at once, not here),
        and re-run the policy, whose estimates change with time even when no event arrives."""
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for state in list(self.models.values()):
                for ws in list(state.workers.values()):
                    if now - ws.last_seen > self.heartbeat_timeout_s:
                        self.worker_lost(ws, f"no heartbeat for {now - ws.last_seen:.1f}s")
                self._schedule(state)

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "models": {
                name: {"task": s.task, "max_context": s.max_context, "queue": len(s.queue),
                       "workers": [w.describe() for w in s.workers.values()]}
                for name, s in self.models.items()
            },
            "service_estimates": self.service.snapshot(),
        }

    # ------------------------------------------------------------------------------------ internals

    def _enqueue(self, state: ModelState, job: Job) -> None:
        bisect.insort(state.queue, job, key=lambda j: j.seq)
        self._update_queue_gauge(state)

    def _schedule(self, state: ModelState) -> None:
        workers = [w for w in state.workers.values() if w.channel_open and w.alive and not w.draining]
        if not state.queue or not any(w.free_slots > 0 for w in workers):
            return
        now = time.monotonic()
        for w in workers:
            w.slot_free_at = min((j.dispatch + j.estimate_s for j in w.jobs.values() if j.dispatch is not None),
                                 default=now)
        for ws, batch in self.policy.assign(list(state.queue), workers, now):
            self._dispatch(state, ws, batch, now)
        self._update_queue_gauge(state)

    def _dispatch(self, state: ModelState, ws: WorkerSession, batch: list[Job], now: float) -> None:
        rows = []
        for job in batch:
            state.queue.remove(job)
            job.state, job.dispatch_id = JobState.RUNNING, uuid.uuid4().hex
            job.attempts += 1
            job.dispatch, job.worker_id, job.worker_kind = now, ws.id, ws.kind
            if job.first_dispatch is None:
                job.first_dispatch = now
                self.metrics.queue_delay.labels(job.model).observe(now - job.arrival)
            job.estimate_s = self.service.estimate(ws.id, ws.kind, job.prompt_units, job.expected_output,
                                                   len(ws.jobs) + len(batch))
            ws.jobs[job.dispatch_id] = job
            ws.dispatched[job.dispatch_id] = None
            while len(ws.dispatched) > REMEMBERED_DISPATCHES:
                ws.dispatched.popitem(last=False)
            rows.append(job.row(job.dispatch_id))
        if ws.idle_since is not None:
            ws.idle_since, ws.busy_since = None, now
        self.metrics.batch_size.labels(state.name).observe(len(ws.jobs))
        ws.outbox.put_nowait(Run(rows=rows))
        logger.debug("dispatched %d job(s) to %s", len(batch), ws.id)

    def _progress(self, ws: WorkerSession, event: Progress) -> None:
        """A worker's engine report: the service model learns the cost of a step at its occupancy."""
        now = time.monotonic()
        self.service.observe_steps(ws.id, ws.kind, steps=event.steps, decode_s=event.decode_s,
                                   occupancy=event.occupancy)
        if ws.progress_at is not None and now > ws.progress_at:
            self.metrics.tokens_per_second.labels(ws.id, ws.kind).set(event.generated_tokens / (now - ws.progress_at))
        ws.progress_at = now
        self.metrics.prefill_tokens.labels(ws.id, ws.kind).inc(event.prefill_tokens)
        ws.progress = {"steps": event.steps, "generated_tokens": event.generated_tokens,
                       "prefill_tokens": event.prefill_tokens, "prefill_s": event.prefill_s,
                       "decode_s": event.decode_s, "occupancy": event.occupancy, "active": event.active,
                       "free_slots": event.free_slots}

    def _learn(self, ws: WorkerSession, job: Job, now: float) -> None:
        durations = job.worker_durations
        # a choice of an n > 1 request may have copied its siblings' prompt KV: its prefill time does not
        # measure the worker's prefill rate (prompt_units=0 leaves that rate as it was)
        self.service.observe_job(ws.id, ws.kind, prompt_units=0 if job.group is not None else job.prompt_units,
                                 prefill_s=float(durations.get("prefill_s", 0.0)),
                                 decode_s=float(durations.get("decode_s", 0.0)),
                                 observed_s=now - (job.dispatch or now))
        ws.jobs_done += 1

    def _slot_freed(self, ws: WorkerSession) -> None:
        if not ws.jobs and ws.idle_since is None:
            now = time.monotonic()
            self._account_busy(ws, now)
            ws.idle_since, ws.busy_since = now, None

    def _account_busy(self, ws: WorkerSession, now: float) -> None:
        if ws.busy_since is not None:
            self.metrics.busy_seconds.labels(ws.id, ws.kind).inc(max(0.0, now - ws.busy_since))

    def _finish(self, job: Job, final: JobState, error: Optional[ServingError]) -> None:
        job.state, job.error, job.finish = final, error, time.monotonic()
        job.events.put_nowait((job.choice, "error", error) if error is not None else (job.choice, "done", None))
        job.finished.set()
        outcome = final.value
        self.metrics.requests.labels(job.model, outcome).inc()
        t = job.timings()
        if final is JobState.DONE:
            self.metrics.jct.labels(job.model).observe(t["jct_s"])
            if t["ttft_s"] is not None:
                self.metrics.ttft.labels(job.model).observe(t["ttft_s"])
        logger.info(
            "request %s model=%s outcome=%s worker=%s kind=%s attempts=%d queue_delay_s=%s ttft_s=%s "
            "jct_s=%s prompt_tokens=%d completion_tokens=%d user=%s timings=%s",
            job.id, job.model, outcome, job.worker_id, job.worker_kind, job.attempts, t["queue_delay_s"],
            t["ttft_s"], t["jct_s"], job.prompt_tokens, job.completion_tokens, json.dumps(job.user), json.dumps(t))

    def _session_of(self, job: Job) -> Optional[WorkerSession]:
        state = self.models.get(job.model)
        ws = state.workers.get(job.worker_id or "") if state else None
        return ws if ws is not None and job.dispatch_id in ws.jobs else None

    def _retry_after(self, state: ModelState) -> int:
        workers = list(state.workers.values())
        if not workers:
            return 5
        total = sum(
            sum(self.service.estimate(w.id, w.kind, j.prompt_units, j.expected_output) for w in workers)
            / len(workers)
            for j in state.queue)
        return max(1, min(60, math.ceil(total / len(workers))))

    def _update_queue_gauge(self, state: ModelState) -> None:
        self.metrics.queue_length.labels(state.name).set(len(state.queue))

    def _update_worker_gauge(self, state: ModelState) -> None:
        for kind in ("native", "assisted", "cpu"):
            self.metrics.workers.labels(state.name, kind).set(
                sum(1 for w in state.workers.values() if w.kind == kind))
