"""Router-side state of one request (a *job*) and its timings.

All times are ``time.monotonic()`` seconds of the router's host: queue delay, time to first token and
job completion time (JCT) are differences of two router-clock readings, never of a router and a worker
clock. Worker-reported durations (prefill, decode) are kept as durations.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from caserve.serving.errors import ServingError
from caserve.serving.messages import Row, TokenLogprob

_seq = itertools.count()


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Job:
    """One request. ``payload`` is what a worker needs to run it (the fields of a :class:`Row` that say
    what to run: prompt, prompt_ids, messages, inputs, params); the rest is the router's bookkeeping."""

    model: str
    task: str
    payload: dict[str, Any]
    prompt_units: int  # router-side prompt size (characters of text, or token ids): the ECT feature
    max_tokens: int = 0  # 0 for embeddings and classification
    stream: bool = False
    user: Optional[str] = None  # the request's ``user`` field (OpenAI's end-user id), for the log
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    seq: int = field(default_factory=lambda: next(_seq))  # arrival order, for requeueing in place
    arrival: float = field(default_factory=time.monotonic)
    arrival_unix: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    attempts: int = 0
    dispatch_id: Optional[str] = None
    worker_id: Optional[str] = None
    worker_kind: Optional[str] = None
    first_dispatch: Optional[float] = None
    dispatch: Optional[float] = None
    estimate_s: float = 0.0  # the service model's estimate of this attempt, made at dispatch
    first_token: Optional[float] = None
    finish: Optional[float] = None
    # generation results (token ids kept so that a requeued job continues where it stopped)
    generated_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one entry per generated token, if asked
    prompt_logprobs: Optional[list[TokenLogprob]] = None  # echo: one per prompt token (the first's logprob None)
    prompt_text: Optional[str] = None  # echo: the worker's decode of the prompt
    worker_durations: dict[str, float] = field(default_factory=dict)
    result: Any = None  # embeddings / classification output
    error: Optional[ServingError] = None
    choice: int = 0  # the job's index among its request's jobs (the choice index clients see)
    # (choice, "prompt" | "delta" | "done" | "error", value) as the router applies the worker's events;
    # a request's jobs share one queue (``streams.ChoiceEvents``)
    events: "asyncio.Queue[tuple[int, str, Any]]" = field(default_factory=asyncio.Queue)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys may share a padded batch (per-row sampling makes all generations compatible)."""
        return self.task

    @property
    def group(self) -> Optional[str]:
        """The ``prompt_group`` of the n choices of one request (None for a request of one choice)."""
        return self.payload.get("prompt_group")

    @property
    def echo(self) -> bool:
        """Whether the request asked for its prompt back (``echo``: the worker scores the prompt)."""
        params = self.payload.get("params")
        return params is not None and params.prompt_logprobs is not None

    @property
    def echo_text(self) -> str:
        """echo: the prompt as given (a token-id prompt as the worker decoded it)."""
        prompt = self.payload.get("prompt")
        return prompt if isinstance(prompt, str) else self.prompt_text or ""

    @property
    def expected_output(self) -> int:
        return self.max_tokens

    def row(self, dispatch_id: str) -> Row:
        """The job as a row of a batch. A requeued job continues: the tokens generated so far, and how
        much of their text the client already has."""
        return Row(dispatch=dispatch_id, job=self.id, task=self.task,  # type: ignore[arg-type]
                   prefix_ids=list(self.generated_ids), prefix_chars_sent=len(self.text), **self.payload)

    def timings(self) -> dict[str, Any]:
        """The per-request timing record returned to clients and logged (router monotonic clock)."""

        def diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
            return None if a is None or b is None else round(a - b, 6)

        return {
            "request_id": self.id,
            "clock": "router-monotonic",
            "arrival": self.arrival,
            "arrival_unix": self.arrival_unix,
            "dispatch": self.first_dispatch,
            "last_dispatch": self.dispatch,
            "first_token": self.first_token,
            "finish": self.finish,
            "queue_delay_s": diff(self.first_dispatch, self.arrival),
            "ttft_s": diff(self.first_token, self.arrival),
            "jct_s": diff(self.finish, self.arrival),
            "worker_id": self.worker_id,
            "worker_kind": self.worker_kind,
            "attempts": self.attempts,
            "worker_durations": dict(self.worker_durations),
        }
