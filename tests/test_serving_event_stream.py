"""The worker's event stream (caserve.serving.worker.event_stream) against a scripted router: lines
arrive whole and in order, over TLS too; a refusal is noticed at once, even while no line is written;
every way the other side can fail (nothing listening, closing, garbage, not reading, another
certificate, random bytes) ends in EventStreamError, within its deadline, never a hang. Last, against
the router's own app on a socket: lines apply as they come, and a bad line or a wrong token is
answered."""

from __future__ import annotations

import asyncio
import random
import ssl
from typing import AsyncIterator, Optional

import h11
import httpx
import msgspec
import pytest
import uvicorn

from caserve.serving.credentials import router_verify
from caserve.serving.messages import WORKER_TOKEN_HEADER, RegisterReply, SamplingParams
from caserve.serving.router.api import create_app
from caserve.serving.router.jobs import Job, JobState
from caserve.serving.router.router import Router
from caserve.serving.router.security import RouterSecurity
from caserve.serving.worker import event_stream
from caserve.serving.worker.event_stream import EventStreamError, post_lines
from serving_procs import self_signed_cert

TOKEN = {WORKER_TOKEN_HEADER: "t" * 32, "content-type": "application/x-ndjson"}


class ScriptedRouter:
    """An HTTP/1.1 server on 127.0.0.1 that records one request and answers as ``mode`` says:
    ``ok`` (200 after the body), ``refuse`` (400 after the first chunk), ``close`` (closes without
    answering), ``garbage`` (a non-HTTP answer), ``stall`` (never reads) or ``bytes`` (``raw`` as the
    answer after the body)."""

    def __init__(self, mode: str, *, answer: bytes = b'{"ok":true}', raw: bytes = b"",
                 tls: Optional[ssl.SSLContext] = None) -> None:
        self.mode, self.answer, self.raw, self.tls = mode, answer, raw, tls
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.target = b""
        self.server: Optional[asyncio.AbstractServer] = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/internal/workers/w1/events?x=1"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.mode == "stall":
                await asyncio.sleep(60)
                return
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    self.headers, self.target = dict(event.headers), event.target
                elif isinstance(event, h11.Data):
                    self.body += event.data
                    if self.mode == "refuse":
                        await self._answer(conn, writer, 400, b'{"error":"bad line"}')
                        return
                elif isinstance(event, h11.EndOfMessage):
                    if self.mode == "ok":
                        await self._answer(conn, writer, 200, self.answer)
                    elif self.mode == "garbage":
                        writer.write(b"SURPRISE\r\n\r\n")
                        await writer.drain()
                    elif self.mode == "bytes":
                        writer.write(self.raw)
                        await writer.drain()
                    return
        finally:
            writer.close()

    @staticmethod
    async def _answer(conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(conn.send(h11.Response(status_code=status, headers=[("content-length", str(len(body)))])))
        writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await writer.drain()


async def _lines(items: list[bytes], then: Optional[asyncio.Event] = None,
                 taken: Optional[list[bytes]] = None) -> AsyncIterator[bytes]:
    for item in items:
        if taken is not None:
            taken.append(item)
        yield item
    if then is not None:  # a worker whose engine is idle: no line comes for a while
        await then.wait()


def _run(coro, timeout: float = 30.0):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


def _server_tls(cert: tuple[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert[0], cert[1])
    return context


def _lines_of_every_size() -> list[bytes]:
    rng = random.Random(7)
    return [bytes(rng.randrange(32, 127) for _ in range(n)) + b"\n" for n in (1, 10, 1000, 70_000, 300_000, 5)]


def test_every_line_arrives_in_order_with_the_token_and_the_answer_comes_back() -> None:
    items = _lines_of_every_size()

    async def go():
        router = ScriptedRouter("ok")
        async with router as url:
            status, answer = await post_lines(url, TOKEN, _lines(items + [b""]))
        return router, status, answer

    router, status, answer = _run(go())
    assert (status, answer) == (200, b'{"ok":true}')
    assert bytes(router.body) == b"".join(items)  # the empty item is skipped, not taken as the body's end
    assert router.target == b"/internal/workers/w1/events?x=1"
    assert router.headers[WORKER_TOKEN_HEADER.lower().encode()] == b"t" * 32
    assert router.headers[b"transfer-encoding"] == b"chunked"
    assert router.headers[b"host"].startswith(b"127.0.0.1:")


def test_tls_carries_the_stream_and_a_certificate_from_another_ca_is_refused(cert, tmp_path) -> None:
    items = _lines_of_every_size()

    async def go(verify):
        router = ScriptedRouter("ok", tls=_server_tls(cert))
        async with router as url:
            return router, await post_lines(url, TOKEN, _lines(items), verify=verify)

    router, (status, _) = _run(go(ssl.create_default_context(cafile=cert[0])))
    assert status == 200 and bytes(router.body) == b"".join(items)
    other, _ = self_signed_cert(tmp_path, "other", cn="x")
    with pytest.raises(EventStreamError, match="cannot connect"):
        _run(go(ssl.create_default_context(cafile=str(other))))
    with pytest.raises(EventStreamError):  # the system's trust store does not know a self-signed router
        _run(go(None))
    # What the worker passes: its --router-ca alone, or the system's trust store, always checked.
    for ca, count in ((cert[0], 1), (None, None)):
        context = router_verify(ca)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert count is None or len(context.get_ca_certs()) == count
    status, _ = _run(go(router_verify(cert[0])))[1]
    assert status == 200


def test_a_refusal_is_noticed_at_once_while_the_worker_has_nothing_to_send() -> None:
    taken: list[bytes] = []

    async def go():
        never = asyncio.Event()
        async with ScriptedRouter("refuse") as url:
            return await post_lines(url, TOKEN, _lines([b"first\n"], then=never, taken=taken))

    status, answer = _run(go(), timeout=10)  # waiting for the next line would never end
    assert status == 400 and b"bad line" in answer
    assert taken == [b"first\n"]


@pytest.mark.parametrize("mode", ["close", "garbage"])
def test_a_router_that_does_not_answer_properly_is_an_error(mode: str) -> None:
    async def go():
        async with ScriptedRouter(mode) as url:
            return await post_lines(url, TOKEN, _lines([b"a\n", b"b\n"]))

    with pytest.raises(EventStreamError):
        _run(go())


def test_nothing_listening_is_an_error() -> None:
    async def go():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await post_lines(f"http://127.0.0.1:{port}/events", TOKEN, _lines([b"a\n"]))

    with pytest.raises(EventStreamError, match="cannot connect"):
        _run(go())
    with pytest.raises(ValueError):
        _run(post_lines("ftp://127.0.0.1/events", TOKEN, _lines([b"a\n"])))


def test_a_router_that_stops_reading_fails_the_stream_after_the_write_deadline(monkeypatch) -> None:
    monkeypatch.setattr(event_stream, "WRITE_S", 0.5)
    taken: list[bytes] = []
    line = b"x" * (1 << 20) + b"\n"

    async def go():
        async with ScriptedRouter("stall") as url:
            return await post_lines(url, TOKEN, _lines([line] * 512, taken=taken))

    with pytest.raises(EventStreamError, match="writing"):
        _run(go(), timeout=20)
    assert len(taken) < 512  # it stopped taking lines once the router was behind


def test_an_answer_is_kept_only_up_to_its_limit() -> None:
    big = b"y" * (event_stream.MAX_ANSWER * 3)

    async def go():
        async with ScriptedRouter("ok", answer=big) as url:
            return await post_lines(url, TOKEN, _lines([b"a\n"]))

    status, answer = _run(go())
    assert status == 200 and answer == big[:event_stream.MAX_ANSWER]


def test_random_answers_end_in_an_answer_or_an_error_never_a_hang() -> None:
    rng = random.Random(12)
    seeds = [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"HTTP/1.1 404 Not Found\r\n\r\n",
             b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", b"HTTP/1.0 200\r\n\r\n"]
    outcomes = set()
    for i in range(40):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(0, 4)):  # a few flipped or dropped bytes
            at = rng.randrange(len(raw))
            if rng.random() < 0.5:
                raw[at] = rng.randrange(256)
            else:
                del raw[at]
        if i % 5 == 0:
            raw = bytearray(rng.randbytes(rng.randrange(1, 200)))

        async def go():
            async with ScriptedRouter("bytes", raw=bytes(raw)) as url:
                return await post_lines(url, TOKEN, _lines([b"a\n"]))

        try:
            status, _ = _run(go(), timeout=15)
            assert 100 <= status <= 999
            outcomes.add("answer")
        except EventStreamError:
            outcomes.add("error")
    assert outcomes == {"answer", "error"}  # both kinds were exercised


def test_against_the_router_lines_apply_as_they_come_and_a_bad_line_is_answered_while_the_worker_waits() -> None:
    """The real router app on a real socket: the worker's stream applies a line before the next is sent;
    a bad line gets its 400 while the worker has nothing more to send, with the lines before it applied
    and the job still running; a new stream of the same session then finishes the job exactly once."""
    secret = "s" * 32
    headers = {WORKER_TOKEN_HEADER: secret, "content-type": "application/x-ndjson"}

    def line(session: str, events: list) -> bytes:
        return msgspec.json.encode({"session": session, "events": events}) + b"\n"

    async def scenario() -> None:
        router = Router(policy="fcfs", max_queue=8)
        server = uvicorn.Server(uvicorn.Config(create_app(router, RouterSecurity(secret)), host="127.0.0.1",
                                               port=0, log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}/internal/workers"
        try:
            async with httpx.AsyncClient(headers={WORKER_TOKEN_HEADER: secret}) as client:
                r = await client.post(f"{base}/register", json={"worker_id": "a", "kind": "cpu", "model": "m",
                                                                "task": "causal-lm", "max_batch": 1, "max_context": 64})
                assert r.status_code == 200, r.text
            session = msgspec.json.decode(r.content, type=RegisterReply).session
            ws = router.models["m"].workers["a"]
            router.channel_opened(ws)
            router.submit([Job("m", "generate", {"prompt": "hi", "params": SamplingParams(max_tokens=4)},
                               prompt_units=2, max_tokens=4)])
            (job,) = ws.jobs.values()
            applied: list[list[int]] = []
            never = asyncio.Event()

            async def body():
                yield line(session, [{"type": "tokens", "dispatch": job.dispatch_id, "ids": [1], "text": "a"}])
                await asyncio.sleep(0.2)
                applied.append(list(job.generated_ids))  # the router applied the first line meanwhile
                yield line(session, [{"type": "done", "dispatch": "0" * 32}])  # never sent to this session
                await never.wait()  # an idle worker: nothing more to send

            status, answer = await asyncio.wait_for(post_lines(f"{base}/a/events", headers, body()), 10)
            assert status == 400 and b"never sent" in answer
            assert applied == [[1]] and job.state is JobState.RUNNING and job.generated_ids == [1]

            async def finish():
                yield line(session, [{"type": "done", "dispatch": job.dispatch_id, "finish_reason": "length"},
                                     {"type": "done", "dispatch": job.dispatch_id, "finish_reason": "stop"}])

            status, answer = await post_lines(f"{base}/a/events", headers, finish())
            assert status == 200 and job.state is JobState.DONE and job.finish_reason == "length"
            wrong = {**headers, WORKER_TOKEN_HEADER: "w" * 32}
            status, _ = await post_lines(f"{base}/a/events", wrong, finish())
            assert status in (401, 403)
        finally:
            server.should_exit = True
            await serving

    _run(scenario())
