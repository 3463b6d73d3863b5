"""Server-sent event streams of the OpenAI-compatible API: a streamed completion's chunks, built from
its jobs' events as the router applies the worker's, in OpenAI's chunk format.

A request streams one job per choice (``n`` choices of each prompt, in OpenAI's order: prompt by
prompt, ``index = prompt * n + choice``). Each chunk carries one choice, named by its ``index``; a
choice ends with its own chunk holding its ``finish_reason`` and ``timings``, and the stream ends (after
the usage chunk, when asked for) once every choice has ended.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Optional

import msgspec
from fastapi import Request

from caserve.serving.errors import RequestCancelled, error_body
from caserve.serving.router import schemas as S
from caserve.serving.router.jobs import Job
from caserve.serving.router.router import Router

logger = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode

Event = tuple[int, str, Any]  # (choice index, "prompt" | "delta" | "done" | "error", value)
ENDS = ("done", "error")  # a choice's last event


async def until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def done_before_disconnect(request: Request, task: asyncio.Future[Any]) -> bool:
    """Wait for ``task`` or the client's disconnect, whichever comes first. False (and ``task``
    cancelled) when the client went away first."""
    gone = asyncio.create_task(until_disconnected(request))
    try:
        await asyncio.wait({gone, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return True
    task.cancel()
    return False


class ChoiceEvents:
    """The events of a request's jobs (one per choice) in the order the router applies them. Made before
    the jobs are submitted: they share one queue, and each of their events names its job's index
    (``Job.choice``), so that waiting costs the same for one choice as for many."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        for index, job in enumerate(jobs):
            job.choice, job.events = index, self.queue
        self.live = len(jobs)  # choices whose end ("done" or "error") has not been taken yet

    async def take(self) -> list[Event]:
        """The events that came since the last take (waiting for one), a choice's deltas that queued up
        meanwhile (a slow client, a busy router) joined as one."""
        came = [await self.queue.get()]
        while not self.queue.empty():
            came.append(self.queue.get_nowait())
        out: list[Event] = []
        open_delta: dict[int, int] = {}  # choice -> where in ``out`` its latest delta is, until it ends
        for index, kind, value in came:
            at = open_delta.get(index)
            if kind == "delta" and at is not None:
                text, entries = out[at][2]
                out[at] = (index, kind, (text + value[0], entries + value[1]))
                continue
            if kind == "delta":
                open_delta[index] = len(out)
            else:
                open_delta.pop(index, None)
                if kind in ENDS:
                    self.live -= 1
            out.append((index, kind, value))
        return out


def cancel_unfinished(router: Router, jobs: list[Job], why: str) -> None:
    for job in jobs:
        if not job.finished.is_set():
            logger.info("request %s: %s; cancelling", job.id, why)
            router.cancel(job)


async def first_events(router: Router, request: Request, events: ChoiceEvents) -> list[Event]:
    """The first events of any choice, before the response starts: an error among them is still a plain
    4xx (and the other choices are cancelled). A client gone meanwhile cancels them all."""
    first = asyncio.create_task(events.take())
    if not await done_before_disconnect(request, first):
        cancel_unfinished(router, events.jobs, "client disconnected")
        raise RequestCancelled("client disconnected")
    taken = first.result()
    for _, kind, value in taken:
        if kind == "error":
            cancel_unfinished(router, events.jobs, "another choice failed")
            raise value
    return taken


async def cancel_on_exit(router: Router, jobs: list[Job], chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        # Starlette cancels the response when the client disconnects: stop the jobs and free their slots
        # (also the other choices' after one failed).
        cancel_unfinished(router, jobs, "stream closed")


def _data(body: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``body`` as JSON."""
    return b"data: " + _encode(body) + b"\n\n"


async def sse(
    events: ChoiceEvents, first: list[Event], rid: str, created: int, req: S.SamplingRequest, *, chat: bool,
) -> AsyncIterator[bytes]:
    jobs = events.jobs
    model, include_usage = req.model, req.include_usage
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * len(jobs)  # characters streamed so far per choice (completions' text_offset)

    def chunk(index: int, text: Optional[str], finish: Optional[str], entries: Optional[list] = None,
              **extra: Any) -> bytes:
        if chat:
            delta = {} if text is None else {"content": text}
            logprobs = S.chat_logprobs(entries) if entries and req.logprobs else None
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            logprobs = (S.completion_logprobs(entries, offsets[index])
                        if entries and req.logprobs is not None else None)
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        offsets[index] += len(text or "")
        return _data({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra})

    if chat:
        for index in range(len(jobs)):
            yield _data({"id": rid, "object": obj, "created": created, "model": model, "choices": [
                {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    taken = first
    while True:
        for index, kind, value in taken:
            if kind == "delta":
                text, entries = value
                yield chunk(index, text, None, entries)
            elif kind == "prompt":  # echo: the prompt (and its logprobs) before the choice's tokens
                yield chunk(index, jobs[index].echo_text, None, jobs[index].prompt_logprobs)
            elif kind == "done":
                job = jobs[index]
                yield chunk(index, None if chat else "", job.finish_reason, timings=job.timings())
            else:  # an error after the stream started: report it in-band, as OpenAI does, and end the stream
                yield _data(error_body(value))
                return
        if not events.live:  # every choice has ended
            break
        taken = await events.take()
    if include_usage:
        usage = S.usage_body(sum(j.prompt_tokens for j in jobs), sum(j.completion_tokens for j in jobs))
        yield _data({"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"
