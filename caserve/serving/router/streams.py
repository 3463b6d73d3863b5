"""Server-sent event streams of the OpenAI-compatible API: a streamed completion's chunks, built from
its jobs' events as the router applies the worker's, in OpenAI's chunk format.

A request streams one job per choice (``n`` choices of each prompt, in OpenAI's order: prompt by
prompt, ``index = prompt * n + choice``). Each chunk carries one choice, named by its ``index``; a
choice ends with its own chunk holding its ``finish_reason`` and ``timings``, and the stream ends (after
the usage chunk, when asked for) once every choice has ended.
"""

from __future__ import annotations

import asyncio
import collections
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

Event = tuple[int, str, Any]  # (choice index, "delta" | "done" | "error", value)


async def until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ChoiceEvents:
    """The events of a request's jobs, merged in the order they come, each with its job's index. A job's
    deltas that queued up meanwhile (a slow client, a busy router) come joined as one."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.live = set(range(len(jobs)))  # jobs whose "done" or "error" has not been taken yet
        self.waiting: dict[asyncio.Future[tuple[str, Any]], int] = {}  # a pending get per live job
        self.ready: collections.deque[Event] = collections.deque()

    async def next(self) -> Event:
        while not self.ready:
            if len(self.jobs) == 1:  # one choice: no task per event
                kind, value = await self.jobs[0].events.get()
                self.ready.append((0, kind, value))
                break
            armed = set(self.waiting.values())
            for index in sorted(self.live - armed):
                self.waiting[asyncio.ensure_future(self.jobs[index].events.get())] = index
            done, _ = await asyncio.wait(self.waiting, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=self.waiting.__getitem__):
                index = self.waiting.pop(future)
                self.ready.append((index, *future.result()))
        index, kind, value = self.ready.popleft()
        if kind != "delta":
            self.live.discard(index)
            return index, kind, value
        text, entries = value
        queue = self.jobs[index].events  # no get of this job is pending now: take what waits in it
        while not queue.empty():
            later = queue.get_nowait()
            if later[0] != "delta":
                self.ready.appendleft((index, *later))
                break
            text, entries = text + later[1][0], entries + later[1][1]
        return index, kind, (text, entries)

    def close(self) -> None:
        for future in self.waiting:
            future.cancel()
        self.waiting.clear()


def cancel_unfinished(router: Router, jobs: list[Job], why: str) -> None:
    for job in jobs:
        if not job.finished.is_set():
            logger.info("request %s: %s; cancelling", job.id, why)
            router.cancel(job)


async def first_event(router: Router, request: Request, events: ChoiceEvents) -> Event:
    """The first event of any choice, before the response starts: a worker-side error then is still a
    plain 4xx (and the other choices are cancelled). A client gone meanwhile cancels them all."""
    gone = asyncio.create_task(until_disconnected(request))
    first = asyncio.create_task(events.next())
    try:
        await asyncio.wait({gone, first}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not first.done():
        first.cancel()
        events.close()
        cancel_unfinished(router, events.jobs, "client disconnected")
        raise RequestCancelled("client disconnected")
    index, kind, value = first.result()
    if kind == "error":
        events.close()
        cancel_unfinished(router, events.jobs, "another choice failed")
        raise value
    return index, kind, value


async def cancel_on_exit(router: Router, events: ChoiceEvents, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        # Starlette cancels the response when the client disconnects: stop the jobs and free their slots
        # (also the other choices' after one failed).
        events.close()
        cancel_unfinished(router, events.jobs, "stream closed")


def _data(body: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``body`` as JSON."""
    return b"data: " + _encode(body) + b"\n\n"


async def sse(
    events: ChoiceEvents, first: Event, rid: str, created: int, req: S.SamplingRequest, *, chat: bool,
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
    index, kind, value = first
    while True:
        if kind == "delta":
            text, entries = value
            yield chunk(index, text, None, entries)
        elif kind == "done":
            job = jobs[index]
            yield chunk(index, None if chat else "", job.finish_reason, timings=job.timings())
        else:  # an error after the stream started: report it in-band, as OpenAI does, and end the stream
            yield _data(error_body(value))
            return
        if not events.live:  # every choice has ended
            break
        index, kind, value = await events.next()
    if include_usage:
        usage = S.usage_body(sum(j.prompt_tokens for j in jobs), sum(j.completion_tokens for j in jobs))
        yield _data({"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"
