"""The router side of the router <-> worker protocol: plain HTTP + JSON, the worker always dials the router.

The messages are the structs of :mod:`caserve.serving.messages` (its docstring draws the exchange);
every body is decoded into them on receipt, and a malformed one is answered 400 and logged.
Every request carries the router's worker token (header ``X-Caserve-Worker-Token``), checked by
``security.RouterGuard`` before any route runs (401 missing, 403 wrong). A worker id held by a live
session cannot be registered again (409), and a session has at most one channel (409).

The worker's events come the other way as one long chunked POST (an ``EventsRequest`` per line, read
and applied line by line; the route refuses a line over the worker body limit with 413): one HTTP
request per session, not one per engine step. A stream cut off mid-line (the worker stopped or died)
keeps the whole lines before the cut and drops the partial one.

A channel that closes (worker killed, worker gave up its GPU server) loses the session at once and
requeues its jobs; silent workers are dropped after the heartbeat timeout. Any 404 on a session
means the router no longer knows it (e.g. the router restarted): the worker registers again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, TypeVar

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from caserve.serving.errors import BadRequest, Conflict, PayloadTooLarge
from caserve.serving.messages import (
    EventsRequest, Ok, Ping, RegisterReply, RegisterRequest, SessionRequest, encode, encode_line,
    events_decoder,
)
from caserve.serving.router.router import Router, WorkerSession
from caserve.serving.router.security import LINE_LIMIT_SCOPE_KEY, refusals

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
PING_S = 1.0
T = TypeVar("T")

_PING_LINE = encode_line(Ping())
_OK = encode(Ok())
_DECODERS: dict[type, msgspec.json.Decoder] = {
    RegisterRequest: msgspec.json.Decoder(RegisterRequest),
    SessionRequest: msgspec.json.Decoder(SessionRequest),
    EventsRequest: events_decoder,
}


async def _decode(request: Request, kind: type[T]) -> T:
    """The body as ``kind``, or a 400 that names what is wrong (logged: a worker sent it)."""
    return _decode_bytes(await request.body(), request, kind)


def _decode_bytes(body: bytes, request: Request, kind: type[T]) -> T:
    try:
        return _DECODERS[kind].decode(body)  # type: ignore[no-any-return]
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        refusals.warning("refused a malformed %s from %s at %s: %s", kind.__name__,
                         request.client.host if request.client else "?", request.url.path, exc)
        raise BadRequest(f"malformed {kind.__name__}: {exc}") from None


async def _lines(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's non-empty lines as they arrive; a 413 as soon as one is longer than ``limit`` bytes."""
    buf = bytearray()
    async for chunk in request.stream():
        start = len(buf)  # buf holds no newline before this
        buf += chunk
        end = buf.find(b"\n", start)
        while end >= 0:
            if end > limit:
                break
            line = bytes(buf[:end])
            del buf[:end + 1]
            if line.strip():
                yield line
            end = buf.find(b"\n")
        if end > limit or len(buf) > limit:
            raise PayloadTooLarge(f"an events line is over this router's limit of {limit} bytes")
    if buf.strip():
        yield bytes(buf)


def _json(message: Any) -> Response:
    return Response(encode(message), media_type="application/json")


def make_worker_routes(router: Router) -> APIRouter:
    api = APIRouter(prefix="/internal/workers", include_in_schema=False)

    @api.post("/register")
    async def register(request: Request) -> Response:
        req = await _decode(request, RegisterRequest)
        ws = router.register(**msgspec.structs.asdict(req))
        return _json(RegisterReply(session=ws.session, heartbeat_s=HEARTBEAT_S))

    @api.get("/{worker_id}/channel")
    async def channel(worker_id: str, session: str) -> StreamingResponse:
        ws = router.session(worker_id, session)
        if ws.channel_open:
            raise Conflict("this session already has a channel open", param="session")
        return StreamingResponse(_channel_lines(router, ws), media_type="application/x-ndjson")

    @api.post("/{worker_id}/events")
    async def events(worker_id: str, request: Request) -> Response:
        """One EventsRequest, or (a chunked body, as a worker sends for as long as its session lasts)
        one per line, each applied as it arrives. A bad line is answered at once (400, 404 or 413), with
        the lines before it applied and nothing after it read."""
        line_limit = request.scope.get(LINE_LIMIT_SCOPE_KEY)
        if line_limit is None:  # a body the guard has already read whole
            req = await _decode(request, EventsRequest)
            router.handle_events(router.session(worker_id, req.session), req.events)
        else:
            try:
                async for line in _lines(request, line_limit):
                    req = _decode_bytes(line, request, EventsRequest)
                    router.handle_events(router.session(worker_id, req.session), req.events)
            except ClientDisconnect:  # the worker stopped or died mid-stream; its channel's end handles that
                logger.info("worker %s: its event stream ended without a last line (disconnected); "
                            "the whole lines before were applied", worker_id)
        return Response(_OK, media_type="application/json")

    @api.post("/{worker_id}/heartbeat")
    async def heartbeat(worker_id: str, request: Request) -> Response:
        router.session(worker_id, (await _decode(request, SessionRequest)).session)
        return Response(_OK, media_type="application/json")

    @api.post("/{worker_id}/unregister")
    async def unregister(worker_id: str, request: Request) -> Response:
        ws = router.session(worker_id, (await _decode(request, SessionRequest)).session)
        router.worker_lost(ws, "unregistered")
        return Response(_OK, media_type="application/json")

    @api.post("/{worker_id}/drain")
    async def drain(worker_id: str) -> Response:
        return _json(router.drain(worker_id))

    return api


async def _channel_lines(router: Router, ws: WorkerSession) -> AsyncIterator[bytes]:
    router.channel_opened(ws)
    try:
        yield _PING_LINE
        while ws.alive:
            try:
                message = await asyncio.wait_for(ws.outbox.get(), timeout=PING_S)
            except asyncio.TimeoutError:
                message = Ping()
            if message is None:
                break
            yield encode_line(message)
    finally:
        # Runs when the worker's connection drops (starlette cancels the stream) or the session ends.
        router.worker_lost(ws, "channel closed")
