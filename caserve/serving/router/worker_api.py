"""The router <-> worker protocol, router side: plain HTTP + JSON, the worker always dials the router.

::

    worker                                   router
      | POST /internal/workers/register  --->  | {worker_id, kind, model, task, max_batch, max_context}
      | <--- {session, heartbeat_s}            |
      | GET  /internal/workers/{id}/channel -> | long-lived NDJSON stream, router -> worker:
      | <--- {"type":"run","rows":[...]}       |   a batch to run (each row has a dispatch id)
      | <--- {"type":"cancel","dispatch":d}    |   the client of row d went away
      | <--- {"type":"ping"}                   |   keep-alive, every ping_s
      | POST /internal/workers/{id}/events --> | {session, events:[...]}, in order, one POST at a time:
      |                                        |   tokens{dispatch, ids, text} done{dispatch, finish_reason,
      |                                        |   prompt_tokens, result?, durations} error{dispatch,
      |                                        |   error_type, message} batch_done{prefill_s, decode_s,
      |                                        |   steps, generated_tokens}
      | POST /internal/workers/{id}/heartbeat  | {session}, every heartbeat_s
      | POST /internal/workers/{id}/unregister | {session}: leaving (its running jobs are requeued)

    controller                               router
      | POST /internal/workers/{id}/drain  --> | no new batches for that worker (before stopping it)
      | <--- {worker_id, draining, running}    |   running == 0: it can be stopped, nothing to requeue

A channel that closes (worker killed, worker gave up its GPU server) loses the session at once and
requeues its jobs; silent workers are dropped after the heartbeat timeout. Any 404 on a session
means the router no longer knows it (e.g. the router restarted): the worker registers again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from caserve.serving.router.router import Router, WorkerSession

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
PING_S = 1.0


class RegisterRequest(BaseModel):
    worker_id: str = Field(min_length=1, max_length=200)
    kind: str = Field(pattern="^(native|assisted|cpu)$")
    model: str = Field(min_length=1)
    task: str
    max_batch: int = Field(ge=1, le=1024)
    max_context: int = Field(ge=1)


class SessionRequest(BaseModel):
    session: str


class EventsRequest(SessionRequest):
    events: list[dict[str, Any]]


def make_worker_routes(router: Router) -> APIRouter:
    api = APIRouter(prefix="/internal/workers")

    @api.post("/register")
    async def register(req: RegisterRequest) -> dict[str, Any]:
        ws = router.register(**req.model_dump())
        return {"session": ws.session, "heartbeat_s": HEARTBEAT_S}

    @api.get("/{worker_id}/channel")
    async def channel(worker_id: str, session: str) -> StreamingResponse:
        ws = router.session(worker_id, session)
        return StreamingResponse(_channel_lines(router, ws), media_type="application/x-ndjson")

    @api.post("/{worker_id}/events")
    async def events(worker_id: str, req: EventsRequest) -> dict[str, bool]:
        router.handle_events(router.session(worker_id, req.session), req.events)
        return {"ok": True}

    @api.post("/{worker_id}/heartbeat")
    async def heartbeat(worker_id: str, req: SessionRequest) -> dict[str, bool]:
        router.session(worker_id, req.session)
        return {"ok": True}

    @api.post("/{worker_id}/unregister")
    async def unregister(worker_id: str, req: SessionRequest) -> dict[str, bool]:
        router.worker_lost(router.session(worker_id, req.session), "unregistered")
        return {"ok": True}

    @api.post("/{worker_id}/drain")
    async def drain(worker_id: str) -> dict[str, Any]:
        return router.drain(worker_id)

    return api


async def _channel_lines(router: Router, ws: WorkerSession) -> AsyncIterator[bytes]:
    router.channel_opened(ws)
    try:
        yield b'{"type":"ping"}\n'
        while ws.alive:
            try:
                message = await asyncio.wait_for(ws.outbox.get(), timeout=PING_S)
            except asyncio.TimeoutError:
                message = {"type": "ping"}
            if message is None:
                break
            yield json.dumps(message).encode() + b"\n"
    finally:
        # Runs when the worker's connection drops (starlette cancels the stream) or the session ends.
        router.worker_lost(ws, "channel closed")
