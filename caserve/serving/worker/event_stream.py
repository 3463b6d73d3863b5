"""The worker's event stream to the router: one long chunked POST, written with h11 over an asyncio
connection (TLS through the stdlib's ssl where the router's URL is ``https``).

The stream carries a line per engine step for as long as a session lasts, so its cost per write is
paid at every decode step, on the worker's one core, under the engine's GIL. A general HTTP client
pays for cancel scopes, timeouts and a loop yield on each write; here a write is an h11 chunk handed to
the transport, and a deadline is armed only while the router is not reading (the transport holds
unsent bytes). The router answers when the body ends, or at once when it refuses a line (the
answer is noticed even while no line is being written). The connection goes to the router's host
directly: the worker's other requests use its httpx client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import AsyncIterator, Optional

import h11
import httpx

CONNECT_S = 5.0  # to open the connection (TLS handshake included)
WRITE_S = 10.0  # while the router reads none of what was written
ANSWER_S = 10.0  # for the router's answer once the body has ended
GRACE_S = 1.0  # for an answer that may explain a failed write (the router answered and closed)
MAX_ANSWER = 64 * 1024  # bytes of an answer kept (the router's are a few dozen)


class EventStreamError(Exception):
    """The stream failed: the router could not be reached, stopped reading, broke the protocol or closed
    the connection without answering."""


async def post_lines(url: str, headers: dict[str, str], lines: AsyncIterator[bytes], *,
                     verify: Optional[ssl.SSLContext] = None) -> tuple[int, bytes]:
    """POST ``lines`` to ``url`` as one chunked body. Returns the router's status and body: once the body
    has ended (``lines`` is exhausted), or as soon as the router answers before that (it refused a line;
    the rest of ``lines`` is then not taken). Raises :class:`EventStreamError` on any failure of the
    connection. ``verify``: what an ``https`` router's certificate is checked against (the system's trust
    store when None)."""
    target = httpx.URL(url)
    if target.scheme not in ("http", "https") or not target.host:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = target.port or (443 if target.scheme == "https" else 80)
    context = (verify or ssl.create_default_context()) if target.scheme == "https" else None
    try:
        async with asyncio.timeout(CONNECT_S):
            reader, writer = await asyncio.open_connection(
                target.host, port, ssl=context, server_hostname=target.host if context else None)
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        raise EventStreamError(f"cannot connect to {target.host}:{port}: {exc!r}") from None
    conn = h11.Connection(h11.CLIENT)
    host = target.netloc.decode("ascii")
    request = h11.Request(method="POST", target=target.raw_path,
                          headers=[("host", host), ("transfer-encoding", "chunked"), *headers.items()])
    answer = asyncio.create_task(_read_answer(conn, reader))
    body = asyncio.create_task(_write_body(conn, writer, request, lines))
    try:
        await asyncio.wait({answer, body}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            failed = body.exception()
            if failed is not None and not isinstance(failed, EventStreamError):
                raise failed  # from ``lines``: not the connection's failure
            try:
                async with asyncio.timeout(GRACE_S if failed else ANSWER_S):
                    await asyncio.wait({answer})
            except TimeoutError:
                raise EventStreamError(f"no answer from the router: {failed!r}" if failed
                                       else "no answer from the router after the body ended") from None
        return answer.result()
    finally:
        for task in (body, answer):
            task.cancel()
        await asyncio.gather(body, answer, return_exceptions=True)
        if writer.transport.get_write_buffer_size():  # the router is not reading: closing would wait for it
            writer.transport.abort()
        else:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):  # ssl.SSLError is an OSError
                async with asyncio.timeout(GRACE_S):
                    await writer.wait_closed()


async def _write_body(conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request,
                      lines: AsyncIterator[bytes]) -> None:
    transport = writer.transport
    try:
        writer.write(conn.send(request))
        async for line in lines:
            if line:  # h11 refuses an empty chunk: it would end the body
                writer.write(conn.send(h11.Data(data=line)))  # type: ignore[arg-type]
                if transport.get_write_buffer_size():  # the router is behind: wait, not forever
                    async with asyncio.timeout(WRITE_S):
                        await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))  # type: ignore[arg-type]
        async with asyncio.timeout(WRITE_S):
            await writer.drain()
    except (OSError, TimeoutError, h11.LocalProtocolError) as exc:
        raise EventStreamError(f"writing the event stream failed: {exc!r}") from None


async def _read_answer(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status: Optional[int] = None
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(16 * 1024)
                conn.receive_data(data)  # b"": the router closed the connection
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data) and len(body) < MAX_ANSWER:
                body += event.data[:MAX_ANSWER - len(body)]
            elif isinstance(event, h11.EndOfMessage):
                assert status is not None
                return status, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise EventStreamError("the router closed the connection without answering")
    except (OSError, h11.RemoteProtocolError) as exc:
        raise EventStreamError(f"reading the router's answer failed: {exc!r}") from None
