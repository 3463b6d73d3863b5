"""A worker process: loads one model on its device, registers with the router and runs the batches
the router dispatches to it (messages: :mod:`caserve.serving.messages`).

The three worker kinds differ only in :func:`open_device`: ``native`` runs on the local GPU (CPU when
there is none), ``cpu`` on the local CPU, ``assisted`` on a remote ``caserve`` device whose ops run on
a GPU server. Losing the router (it restarted) means registering again with backoff; losing the GPU
server means leaving the router (so it requeues the running jobs), reconnecting with backoff,
reloading the weights and registering again.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from typing import AsyncIterator, Callable, Optional, Union

import httpx
import msgspec
import torch
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from caserve.models import load_model
from caserve.serving.credentials import router_verify
from caserve.serving.messages import (
    MAX_EVENTS, WORKER_TOKEN_HEADER, Cancel, Error, Event, EventsRequest, RegisterReply,
    RegisterRequest, Run, SessionRequest, encode, router_message_decoder,
)
from caserve.serving.worker.config import WorkerConfig
from caserve.serving.worker.engine import Engine
from caserve.serving.worker.event_stream import EventStreamError, post_lines

logger = logging.getLogger(__name__)

JSON = {"content-type": "application/json"}
NDJSON = {"content-type": "application/x-ndjson"}
PROBE_EVERY = 2  # heartbeats between device probes of an idle worker


class RouterLost(Exception):
    """The router closed our channel or forgot our session: register again."""


class DeviceLost(Exception):
    """The device (GPU server) is gone: reconnect and reload before serving again."""


class WorkerTokenRefused(Exception):
    """The router refused our worker token (401/403): fatal, retrying cannot help."""


def open_device(kind: str, gpu_server: Optional[str], token: Optional[str]) -> Union[str, torch.device]:
    """The one place where worker kinds differ: where the model's ops run."""
    if kind == "native":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return "cpu"
    from caserve.remote import connect  # the remote GPU runtime

    assert gpu_server is not None
    return connect(gpu_server, token=token)


def probe_device(device: Union[str, torch.device, None]) -> None:
    """One round trip to a remote device's GPU server (raises ConnectionLost when it is gone); local
    devices need no probe."""
    if isinstance(device, torch.device) and device.type == "caserve":
        from caserve.remote import server_stats

        server_stats(device)


def device_lost_errors() -> tuple[type[BaseException], ...]:
    try:
        from caserve.remote.wire.errors import ConnectionLost
    except ImportError:
        return ()
    return (ConnectionLost,)


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine: Optional[Engine] = None
        self.device: Union[str, torch.device, None] = None
        self.verify: Optional[ssl.SSLContext] = None  # what an https router's certificate is checked against

    async def run_forever(self) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        while True:
            if self.engine is None:
                self.engine = await self._load_with_backoff()
            try:
                await self._serve_router()
            except DeviceLost:
                logger.warning("worker %s: device lost; reconnecting and reloading", self.config.worker_id)
                self.engine = None

    async def _load_with_backoff(self) -> Engine:
        """Open the device and load the model, retrying forever (0.5 s doubling to 5 s) while the device
        or the model cannot be reached; a missing package (ImportError) is not retried."""
        retrying = AsyncRetrying(retry=retry_if_exception_type((OSError, RuntimeError, *device_lost_errors())),
                                 wait=wait_exponential(multiplier=0.5, max=5.0),
                                 before_sleep=self._log_retry("cannot open device/model"))
        async for attempt in retrying:
            with attempt:
                return await asyncio.to_thread(self._load)
        raise AssertionError("unreachable: the retries never stop")

    def _log_retry(self, what: str) -> Callable[[RetryCallState], None]:
        def log(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            pause = state.next_action.sleep if state.next_action is not None else 0.0
            logger.warning("worker %s: %s (%s: %s); retrying in %.1fs", self.config.worker_id, what,
                           type(exc).__name__, exc, pause)
        return log

    def _load(self) -> Engine:
        c = self.config
        device = self.device = open_device(c.kind, c.gpu_server, c.token)
        lm = load_model(c.model, device=device, shrink=c.shrink, task=c.task)  # type: ignore[arg-type]
        logger.info("worker %s: loaded %s (%s) on %s", c.worker_id, lm.label, lm.task, device)
        if c.kind == "assisted" and c.graph:
            from caserve.remote import graph_mode

            graph_mode(lm.model)  # a decode step of a batch shape becomes one message after two steps
        # Every kind runs the same slot engine: one static KV cache of max_batch x max_len, fixed shapes (what
        # graph mode captures on a remote device), decode one step ahead on a remote device.
        engine = Engine(lm, max_batch=c.max_batch, max_len=c.max_len, batching=c.batching,
                        step_delay_s=c.step_delay_s)
        engine.warm_up()
        return engine

    async def _serve_router(self) -> None:
        """Register and serve; on losing the router, register again (with backoff while it stays
        unreachable). Raises DeviceLost, or WorkerTokenRefused when the router refuses our token."""
        headers = {WORKER_TOKEN_HEADER: self.config.router_token}
        self.verify = router_verify(self.config.router_ca)
        # trust_env=False: workers dial the router directly, whatever HTTP(S)_PROXY says (the event stream
        # has its own connection, and a proxy that buffers would hold the channel's and the events' lines)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0), headers=headers,
                                     verify=self.verify, trust_env=False) as client:
            while True:
                reply = await self._register_with_backoff(client)
                try:
                    await _Session(self, client, reply).run()
                except (httpx.HTTPError, RouterLost) as exc:
                    logger.warning("worker %s: lost the router (%s: %s); registering again",
                                   self.config.worker_id, type(exc).__name__, exc)

    async def _register_with_backoff(self, client: httpx.AsyncClient) -> RegisterReply:
        """Register, retrying forever (0.2 s doubling to 5 s) while the router is unreachable or refuses."""
        retrying = AsyncRetrying(retry=retry_if_exception_type((httpx.HTTPError, RouterLost)),
                                 wait=wait_exponential(multiplier=0.2, max=5.0),
                                 before_sleep=self._log_retry("router unavailable"))
        async for attempt in retrying:
            with attempt:
                return await self._register(client)
        raise AssertionError("unreachable: the retries never stop")

    async def _register(self, client: httpx.AsyncClient) -> RegisterReply:
        assert self.engine is not None and self.config.worker_id is not None
        c, lm = self.config, self.engine.lm
        request = RegisterRequest(worker_id=c.worker_id, kind=c.kind, model=c.served_model_name or c.model,  # type: ignore[arg-type]
                                  task=lm.task, max_batch=c.max_batch, max_context=self.engine.context,
                                  batching=c.batching)  # type: ignore[arg-type]
        resp = await client.post(f"{c.router_url}/internal/workers/register", content=encode(request), headers=JSON)
        if resp.status_code in (401, 403):  # not retried: the same token would be refused again
            raise WorkerTokenRefused(f"the router at {c.router_url} refused this worker's token "
                                     f"({resp.status_code}); check --worker-token-file")
        resp.raise_for_status()
        try:
            reply = msgspec.json.decode(resp.content, type=RegisterReply)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise RouterLost(f"malformed registration reply: {exc}") from None
        logger.info("worker %s: registered with %s", c.worker_id, c.router_url)
        return reply


class _Session:
    """One registration: a channel reader, a heartbeat, an in-order event sender and the engine's loop
    (in a thread: rows from ``Run`` messages join its slots as they arrive)."""

    def __init__(self, worker: Worker, client: httpx.AsyncClient, reply: RegisterReply) -> None:
        self.worker, self.client, self.session = worker, client, reply.session
        self.heartbeat_s = reply.heartbeat_s
        self.session_body = encode(SessionRequest(session=reply.session))
        self.base = f"{worker.config.router_url}/internal/workers/{worker.config.worker_id}"
        # Events for the router, a list per engine step (sent in order, as few POSTs as the backlog
        # allows); None: leave the router.
        self.outbox: asyncio.Queue[Optional[list[Event]]] = asyncio.Queue()
        self.cancelled: set[str] = set()
        self.cancel_all = threading.Event()
        self.stop = threading.Event()
        self.engine_thread: Optional[asyncio.Future[None]] = None  # the engine loop now running, if any
        self.device_lost = False

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read_channel())
                tg.create_task(self._heartbeat())
                tg.create_task(self._send_events())
                tg.create_task(self._run_engine())
        except ExceptionGroup as group:
            # Several tasks may fail together (leaving the router closes the channel): the device
            # matters most, then the router; anything else is a bug and propagates.
            if self.device_lost or group.subgroup(DeviceLost) is not None:
                raise DeviceLost() from None
            for kind in (RouterLost, httpx.HTTPError):
                sub = group.subgroup(kind)
                if sub is not None:
                    raise sub.exceptions[0] from None
            raise
        finally:
            self.cancel_all.set()  # this session's rows are the router's to requeue now
            self.stop.set()
            if self.engine_thread is not None:  # let its step end before anything touches the engine again
                await asyncio.gather(self.engine_thread, return_exceptions=True)
            engine = self.worker.engine
            if engine is not None:
                engine.abandon()

    async def _read_channel(self) -> None:
        timeout = httpx.Timeout(10.0, connect=5.0, read=10.0)  # the router pings every second
        async with self.client.stream("GET", f"{self.base}/channel", params={"session": self.session},
                                      timeout=timeout) as resp:
            if resp.status_code == 404:
                raise RouterLost("session unknown")
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line:
                    continue
                try:
                    message = router_message_decoder.decode(line)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    raise RouterLost(f"malformed channel line {line[:80]!r}: {exc}") from None
                if isinstance(message, Run):
                    assert self.worker.engine is not None
                    self.worker.engine.submit(message.rows)
                elif isinstance(message, Cancel):
                    self.cancelled.add(message.dispatch)
        raise RouterLost("channel closed")

    async def _heartbeat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.heartbeat_s)
            beats += 1
            engine = self.worker.engine
            if beats % PROBE_EVERY == 0 and (engine is None or not engine.busy):
                await self._probe_device()
                if engine is None or not engine.busy:  # checked again after the await: a run may have come
                    self.cancelled.clear()  # nothing runs: no cancellation is still to be applied
            resp = await self.client.post(f"{self.base}/heartbeat", content=self.session_body, headers=JSON)
            if resp.status_code == 404:
                raise RouterLost("session unknown")
            resp.raise_for_status()

    async def _probe_device(self) -> None:
        """An idle assisted worker notices a dead GPU server without waiting for a request."""
        try:
            await asyncio.to_thread(probe_device, self.worker.device)
        except device_lost_errors() as exc:
            logger.warning("worker %s: GPU server unreachable: %s", self.worker.config.worker_id, exc)
            self.device_lost = True
            self.outbox.put_nowait(None)

    async def _send_events(self) -> None:
        """One long POST for the whole session (:mod:`~caserve.serving.worker.event_stream`): its chunked
        body carries an ``EventsRequest`` per line, written as the engine's steps hand events over (what
        queued meanwhile goes in one line). Leaving (None in the outbox) ends the body after the last
        events, then unregisters. A refusal or a lost connection is losing the router."""
        leaving = False

        async def lines() -> AsyncIterator[bytes]:
            nonlocal leaving
            while not leaving:
                batches = [await self.outbox.get()]
                while not self.outbox.empty() and batches[-1] is not None:
                    batches.append(self.outbox.get_nowait())
                leaving = batches[-1] is None
                payload = [e for batch in batches if batch is not None for e in batch]
                for start in range(0, len(payload), MAX_EVENTS):
                    events = payload[start:start + MAX_EVENTS]
                    yield encode(EventsRequest(session=self.session, events=events)) + b"\n"

        try:
            headers = {WORKER_TOKEN_HEADER: self.worker.config.router_token, **NDJSON}
            status, answer = await post_lines(f"{self.base}/events", headers, lines(), verify=self.worker.verify)
        except EventStreamError as exc:
            raise RouterLost(str(exc)) from None
        if status == 404:
            raise RouterLost("session unknown")
        if status != 200:
            raise RouterLost(f"the router refused the event stream ({status}): {answer[:200]!r}")
        if not leaving:
            raise RouterLost("the router ended the event stream")
        await self.client.post(f"{self.base}/unregister", content=self.session_body, headers=JSON)
        raise DeviceLost()

    async def _run_engine(self) -> None:
        """The engine's loop, in a thread, for as long as this session lasts. A device failure leaves the
        router (it requeues the rows); any other failure fails the rows the engine held and goes on."""
        engine = self.worker.engine
        assert engine is not None
        loop = asyncio.get_running_loop()

        def flush(events: list[Event]) -> None:  # from the engine's thread, once per step
            loop.call_soon_threadsafe(self.outbox.put_nowait, events)

        def is_cancelled(dispatch: str) -> bool:
            return self.cancel_all.is_set() or dispatch in self.cancelled

        while not self.stop.is_set():
            self.engine_thread = loop.run_in_executor(None, engine.serve, flush, is_cancelled, self.stop)
            try:
                await asyncio.shield(self.engine_thread)
            except device_lost_errors() as exc:
                logger.warning("worker %s: lost the GPU server: %s", self.worker.config.worker_id, exc)
                self.device_lost = True
                self.outbox.put_nowait(None)  # flush what was generated, then leave: the router requeues
                return
            except Exception as exc:  # a bug or an op the device refused: fail these rows, keep serving
                logger.exception("worker %s: engine step failed", self.worker.config.worker_id)
                message = f"{type(exc).__name__}: {exc}"
                self.outbox.put_nowait([Error(dispatch=dispatch, error_type="internal", message=message)
                                        for dispatch in engine.abandon()])
