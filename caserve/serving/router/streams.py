"""Server-sent event streams of the OpenAI-compatible API: a streamed completion's chunks, built from
its job's events as the router applies the worker's, in OpenAI's chunk format."""

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


async def until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def first_event(router: Router, request: Request, job: Job) -> tuple[str, Any]:
    gone = asyncio.create_task(until_disconnected(request))
    first = asyncio.create_task(job.events.get())
    try:
        await asyncio.wait({gone, first}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not first.done():
        first.cancel()
        router.cancel(job)
        raise RequestCancelled("client disconnected")
    kind, value = first.result()
    if kind == "error":
        raise value
    return kind, value


async def cancel_on_exit(router: Router, job: Job, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        # Starlette cancels the response when the client disconnects: stop the job and free its worker.
        if not job.finished.is_set():
            logger.info("stream of request %s closed by the client; cancelling", job.id)
            router.cancel(job)


def _data(body: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``body`` as JSON."""
    return b"data: " + _encode(body) + b"\n\n"


async def sse(
    job: Job, first: tuple[str, Any], rid: str, created: int, req: S.SamplingRequest, *, chat: bool,
) -> AsyncIterator[bytes]:
    model, include_usage = req.model, req.include_usage
    offset = 0  # characters streamed so far (completions' text_offset)

    def chunk(text: Optional[str], finish: Optional[str], entries: Optional[list] = None, **extra: Any) -> bytes:
        nonlocal offset
        if chat:
            delta = {} if text is None else {"content": text}
            logprobs = S.chat_logprobs(entries) if entries and req.logprobs else None
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            obj = "chat.completion.chunk"
        else:
            logprobs = S.completion_logprobs(entries, offset) if entries and req.logprobs is not None else None
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
            obj = "text_completion"
        offset += len(text or "")
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra}
        return _data(body)

    if chat:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        yield _data(body)
    event: Optional[tuple[str, Any]] = first
    while True:
        if event is None:
            event = await job.events.get()
        kind, value = event
        event = None
        if kind == "delta":
            # Deltas that queued up meanwhile (a slow client, a busy router) go out as one chunk.
            text, entries = value
            while not job.events.empty():
                event = job.events.get_nowait()
                if event[0] != "delta":
                    break
                text, entries, event = text + event[1][0], entries + event[1][1], None
            yield chunk(text, None, entries)
        elif kind == "done":
            yield chunk(None if chat else "", job.finish_reason, timings=job.timings())
            break
        else:  # an error after the stream started: report it in-band, as OpenAI does
            yield _data(error_body(value))
            return
    if include_usage:
        usage = S.usage_body(job.prompt_tokens, job.completion_tokens)
        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model, "choices": [], "usage": usage}
        yield _data(body)
    yield b"data: [DONE]\n\n"
