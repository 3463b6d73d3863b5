"""The router <-> worker messages at the router's HTTP edge, in-process (ASGI, no sockets): hostile or
malformed worker bodies are refused with a 400 that names the problem, nothing of a refused body is
applied, and the router keeps serving with its exactly-once guarantees."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caserve.serving.messages import (
    MAX_EVENTS, MAX_IDS, Progress, Cancel, Done, EventsRequest, Ping, RegisterReply, Row, Run, SamplingParams,
    WORKER_TOKEN_HEADER, Tokens, encode, encode_line, events_decoder, router_message_decoder,
)
from caserve.serving.router.api import create_app
from caserve.serving.router.jobs import Job, JobState
from caserve.serving.router.router import Router
from caserve.serving.router.security import RouterSecurity

BASE = "http://router/internal/workers"
TOKEN = "t" * 32  # the worker token (router security is tested in test_serving_security)


def job() -> Job:
    return Job("m", "generate", {"prompt": "hi", "params": SamplingParams(max_tokens=4)}, prompt_units=2, max_tokens=4)


async def setup() -> tuple[Router, httpx.AsyncClient, dict[str, str]]:
    """A router with workers a and b registered over HTTP (channels marked open), one running job each."""
    router = Router(policy="fcfs", max_queue=8)
    app = create_app(router, RouterSecurity(TOKEN))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router",
                               headers={WORKER_TOKEN_HEADER: TOKEN})
    sessions = {}
    for wid in ("a", "b"):
        r = await client.post(f"{BASE}/register", json={"worker_id": wid, "kind": "cpu", "model": "m",
                                                         "task": "causal-lm", "max_batch": 1, "max_context": 64})
        assert r.status_code == 200, r.text
        sessions[wid] = msgspec.json.decode(r.content, type=RegisterReply).session
        ws = router.models["m"].workers[wid]
        router.channel_opened(ws)
        router.submit([job()])
        assert len(ws.jobs) == 1
    return router, client, sessions


def running(router: Router, wid: str) -> Job:
    (j,) = router.models["m"].workers[wid].jobs.values()
    return j


async def post_events(client: httpx.AsyncClient, wid: str, session: str, events: Any) -> httpx.Response:
    return await client.post(f"{BASE}/{wid}/events", json={"session": session, "events": events})


HOSTILE = [
    ("ids", lambda d: [{"type": "tokens", "dispatch": d, "ids": "abc"}]),
    ("ids", lambda d: [{"type": "tokens", "dispatch": d, "ids": [-1]}]),
    ("ids", lambda d: [{"type": "tokens", "dispatch": d, "ids": [1] * (MAX_IDS + 1)}]),
    ("dispatch", lambda d: [{"type": "done", "finish_reason": "stop"}]),
    ("dispatch", lambda d: [{"type": "done", "dispatch": 7}]),
    ("type", lambda d: [{"type": "explode", "dispatch": d}]),
    ("type", lambda d: [{"dispatch": d, "ids": [1]}]),
    ("finish_reason", lambda d: [{"type": "done", "dispatch": d, "finish_reason": "because"}]),
    ("prompt_tokens", lambda d: [{"type": "done", "dispatch": d, "prompt_tokens": "many"}]),
    ("unknown field", lambda d: [{"type": "tokens", "dispatch": d, "ids": [1], "admin": True}]),
    ("steps", lambda d: [{"type": "progress", "steps": -3}]),
    ("events", lambda d: [{"type": "progress"}] * (MAX_EVENTS + 1)),
    ("events", lambda d: {"type": "progress"}),
    # logprob entries (sampling-api): bytes are bytes, at most MAX_LOGPROBS alternatives, typed fields
    ("bytes", lambda d: [{"type": "tokens", "dispatch": d, "ids": [1],
                          "logprobs": [{"id": 1, "token": "a", "logprob": -1.0, "bytes": [256]}]}]),
    ("top", lambda d: [{"type": "tokens", "dispatch": d, "ids": [1], "logprobs": [
        {"id": 1, "token": "a", "logprob": -1.0, "top": [{"id": 2, "token": "b", "logprob": -2.0}] * 21}]}]),
    ("logprob", lambda d: [{"type": "tokens", "dispatch": d, "ids": [1],
                            "logprobs": [{"id": 1, "token": "a", "logprob": "high"}]}]),
    ("prompt_logprobs", lambda d: [{"type": "done", "dispatch": d, "prompt_logprobs": [{"id": -4, "token": "a",
                                                                                        "logprob": None}]}]),
    # a valid event first: a refused body is applied not at all
    ("text", lambda d: [{"type": "tokens", "dispatch": d, "ids": [5], "text": "x"},
                        {"type": "tokens", "dispatch": d, "ids": [6], "text": 3}]),
]


@pytest.mark.parametrize("field,make", HOSTILE, ids=[f"{i}-{h[0]}" for i, h in enumerate(HOSTILE)])
def test_malformed_events_are_refused_and_nothing_is_applied(field: str, make: Any) -> None:
    async def scenario() -> None:
        router, client, sessions = await setup()
        j = running(router, "a")
        r = await post_events(client, "a", sessions["a"], make(j.dispatch_id))
        assert r.status_code == 400
        assert field.split()[0] in r.json()["error"]["message"]
        assert j.state is JobState.RUNNING and j.generated_ids == [] and j.text == ""
        # still serving: the same worker's well-formed events are applied, exactly once
        done = [{"type": "tokens", "dispatch": j.dispatch_id, "ids": [1], "text": "a"},
                {"type": "done", "dispatch": j.dispatch_id, "finish_reason": "length"},
                {"type": "done", "dispatch": j.dispatch_id, "finish_reason": "stop"}, {"type": "progress"}]
        r = await post_events(client, "a", sessions["a"], done)
        assert r.status_code == 200, r.text
        assert j.state is JobState.DONE and j.text == "a" and j.finish_reason == "length"
        assert router.models["m"].workers["a"].jobs_done == 1
        await client.aclose()

    asyncio.run(scenario())


def test_non_json_and_unknown_session_bodies() -> None:
    async def scenario() -> None:
        router, client, sessions = await setup()
        r = await client.post(f"{BASE}/a/events", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed EventsRequest" in r.json()["error"]["message"]
        r = await client.post(f"{BASE}/a/heartbeat", json={"session": sessions["a"], "extra": 1})
        assert r.status_code == 400
        r = await post_events(client, "a", sessions["b"], [{"type": "progress"}])  # b's session, a's path
        assert r.status_code == 404
        r = await client.post(f"{BASE}/register", json={"worker_id": "c", "kind": "gpu", "model": "m",
                                                         "task": "causal-lm", "max_batch": 1, "max_context": 64})
        assert r.status_code == 400 and "kind" in r.json()["error"]["message"]
        r = await client.post(f"{BASE}/register", json={"worker_id": "c", "kind": "cpu", "model": "m",
                                                         "task": "causal-lm", "max_batch": 0, "max_context": 64})
        assert r.status_code == 400 and "max_batch" in r.json()["error"]["message"]
        assert set(router.models["m"].workers) == {"a", "b"}
        await client.aclose()

    asyncio.run(scenario())


def test_a_worker_cannot_touch_another_workers_job() -> None:
    async def scenario() -> None:
        router, client, sessions = await setup()
        ja, jb = running(router, "a"), running(router, "b")
        # a names b's dispatch id (and one that was never sent to anyone): refused whole
        for bad in (jb.dispatch_id, "0" * 32):
            r = await post_events(client, "a", sessions["a"],
                                  [{"type": "tokens", "dispatch": ja.dispatch_id, "ids": [1], "text": "a"},
                                   {"type": "done", "dispatch": bad}])
            assert r.status_code == 400 and "never sent" in r.json()["error"]["message"]
        assert ja.generated_ids == [] and jb.state is JobState.RUNNING and jb.generated_ids == []
        # a stale dispatch id of this session (its job was cancelled) is accepted and ignored
        router.cancel(ja)
        assert isinstance(router.models["m"].workers["a"].outbox.get_nowait(), Run)
        assert router.models["m"].workers["a"].outbox.get_nowait() == Cancel(dispatch=ja.dispatch_id)
        r = await post_events(client, "a", sessions["a"], [{"type": "done", "dispatch": ja.dispatch_id}])
        assert r.status_code == 200 and ja.state is JobState.CANCELLED
        r = await post_events(client, "b", sessions["b"], [{"type": "done", "dispatch": jb.dispatch_id}])
        assert r.status_code == 200 and jb.state is JobState.DONE
        await client.aclose()

    asyncio.run(scenario())


def test_messages_round_trip_and_the_worker_refuses_malformed_channel_lines() -> None:
    run = Run(rows=[Row(dispatch="d", job="j", task="generate", prompt="x", params=SamplingParams(max_tokens=3),
                        prefix_ids=[1, 2], prefix_chars_sent=1)])
    for message in (run, Cancel(dispatch="d"), Ping()):
        line = encode_line(message)
        assert line.endswith(b"\n") and router_message_decoder.decode(line) == message
    assert json.loads(encode_line(Ping())) == {"type": "ping"}
    assert json.loads(encode(Cancel(dispatch="d"))) == {"type": "cancel", "dispatch": "d"}
    for bad in (b'{"type":"run","rows":[]}', b'{"type":"run","rows":[{"dispatch":"d"}]}', b'{"type":"reboot"}',
                b'{"type":"cancel"}', b"[1,2]"):
        with pytest.raises(msgspec.ValidationError):
            router_message_decoder.decode(bad)
    events = [Tokens(dispatch="d", ids=[3], text="x"), Done(dispatch="d", embeddings=[[0.5, 0.5]]), Progress(steps=2, occupancy=3)]
    body = encode(EventsRequest(session="s", events=events))
    assert events_decoder.decode(body).events == events


def test_router_and_worker_packages_do_not_import_each_other() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "caserve" / "serving"
    for side, other in (("router", "worker"), ("worker", "router")):
        for path in (root / side).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(m.startswith(f"caserve.serving.{other}") for m in mods), (path.name, mods)


# ---------------------------------------------------------------------------------------------- event streams
# A worker sends its events as one chunked POST for its whole session, an EventsRequest per line.


async def stream_events(client: httpx.AsyncClient, wid: str, chunks: Any) -> httpx.Response:
    """POST ``chunks`` (an async iterator of bytes) as a chunked body: no Content-Length."""
    return await client.post(f"{BASE}/{wid}/events", content=chunks,
                             headers={"content-type": "application/x-ndjson"})


def line(session: str, events: list) -> bytes:
    return json.dumps({"session": session, "events": events}).encode() + b"\n"


def test_an_event_stream_applies_each_line_as_it_arrives() -> None:
    async def scenario() -> None:
        router, client, sessions = await setup()
        j = running(router, "a")
        seen = []

        async def body():
            yield line(sessions["a"], [{"type": "tokens", "dispatch": j.dispatch_id, "ids": [1], "text": "a"}])
            yield b"\n"  # blank lines are skipped
            seen.append((list(j.generated_ids), j.state))  # the router applied the first line already
            yield line(sessions["a"], [{"type": "progress", "steps": 1}])[:7]  # a line split across chunks
            yield line(sessions["a"], [{"type": "progress", "steps": 1}])[7:]
            yield line(sessions["a"], [{"type": "tokens", "dispatch": j.dispatch_id, "ids": [2], "text": "b"},
                                       {"type": "done", "dispatch": j.dispatch_id, "finish_reason": "length"}])

        r = await stream_events(client, "a", body())
        assert r.status_code == 200, r.text
        assert seen == [([1], JobState.RUNNING)]
        assert j.state is JobState.DONE and j.text == "ab" and j.generated_ids == [1, 2]
        assert router.models["m"].workers["a"].progress["steps"] == 1
        await client.aclose()

    asyncio.run(scenario())


BAD_LINES = [
    (400, "malformed", lambda s, d: b'{"session": "' + s.encode() + b'", "events": [{"type": "explode"}]}\n'),
    (400, "malformed", lambda s, d: b"{not json\n"),
    (400, "never sent", lambda s, d: line(s, [{"type": "done", "dispatch": "0" * 32}])),
    (404, "no live session", lambda s, d: line("f" * 32, [{"type": "done", "dispatch": d}])),
]


@pytest.mark.parametrize("status,message,make", BAD_LINES, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_LINES)])
def test_a_bad_line_ends_the_stream_with_the_lines_before_it_applied(status: int, message: str, make: Any) -> None:
    async def scenario() -> None:
        router, client, sessions = await setup()
        ja, jb = running(router, "a"), running(router, "b")
        sent = []

        async def body():
            for chunk in (line(sessions["a"], [{"type": "tokens", "dispatch": ja.dispatch_id, "ids": [1], "text": "a"}]),
                          make(sessions["a"], ja.dispatch_id),
                          line(sessions["a"], [{"type": "done", "dispatch": ja.dispatch_id}])):
                sent.append(chunk)
                yield chunk

        r = await stream_events(client, "a", body())
        assert r.status_code == status and message in r.json()["error"]["message"]
        assert len(sent) == 2  # nothing after the bad line was read
        assert ja.state is JobState.RUNNING and ja.generated_ids == [1] and jb.generated_ids == []
        # still serving: a new stream of the same session finishes the job, exactly once
        async def finish():
            yield line(sessions["a"], [{"type": "done", "dispatch": ja.dispatch_id, "finish_reason": "length"},
                                       {"type": "done", "dispatch": ja.dispatch_id, "finish_reason": "stop"}])

        r = await stream_events(client, "a", finish())
        assert r.status_code == 200 and ja.state is JobState.DONE and ja.finish_reason == "length"
        assert jb.state is JobState.RUNNING
        await client.aclose()

    asyncio.run(scenario())


def test_an_event_stream_bounds_each_line_not_the_whole_stream() -> None:
    async def scenario() -> None:
        router = Router(policy="fcfs", max_queue=8)
        app = create_app(router, RouterSecurity(TOKEN, worker_max_body_bytes=2000))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router",
                                   headers={WORKER_TOKEN_HEADER: TOKEN})
        r = await client.post(f"{BASE}/register", json={"worker_id": "a", "kind": "cpu", "model": "m",
                                                         "task": "causal-lm", "max_batch": 1, "max_context": 64})
        session = msgspec.json.decode(r.content, type=RegisterReply).session
        progress = line(session, [{"type": "progress", "steps": 1}])

        async def many():  # 100 lines, far over the limit in all, each well under it
            for _ in range(100):
                yield progress

        r = await stream_events(client, "a", many())
        assert r.status_code == 200 and 100 * len(progress) > 2000
        sent = []

        async def endless():  # one line that never ends: refused once it passes the limit
            for _ in range(10_000):
                sent.append(1)
                yield b" " * 100

        r = await stream_events(client, "a", endless())
        assert r.status_code == 413 and len(sent) <= 25
        async def long_line():  # a complete line over the limit in one chunk
            yield b'{"session": "' + session.encode() + b'", "events": []' + b" " * 3000 + b"}\n"

        r = await stream_events(client, "a", long_line())
        assert r.status_code == 413
        await client.aclose()

    asyncio.run(scenario())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20))
def test_an_event_stream_cut_anywhere_gives_the_same_text(texts: list[str], cuts: list[int]) -> None:
    """Lines (with multi-byte text) cut into chunks at arbitrary byte offsets arrive whole and in order."""
    async def scenario() -> None:
        router, client, sessions = await setup()
        j = running(router, "a")
        data = b"".join(line(sessions["a"], [{"type": "tokens", "dispatch": j.dispatch_id, "ids": [i], "text": t}])
                        for i, t in enumerate(texts))
        bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})

        async def body():
            for lo, hi in zip(bounds, bounds[1:]):
                yield data[lo:hi]

        r = await stream_events(client, "a", body())
        assert r.status_code == 200, r.text
        assert j.text == "".join(texts) and j.generated_ids == list(range(len(texts)))
        await client.aclose()

    asyncio.run(scenario())


def test_an_event_stream_cut_off_by_a_disconnect_keeps_its_whole_lines() -> None:
    """A worker that dies mid-line: the whole lines before the cut are applied, the partial one is not, the
    route ends quietly (no exception escapes to the server), and a new stream of the session goes on."""
    async def scenario() -> None:
        router, client, sessions = await setup()
        j = running(router, "a")
        app = client._transport.app  # type: ignore[attr-defined]
        whole = line(sessions["a"], [{"type": "tokens", "dispatch": j.dispatch_id, "ids": [1], "text": "a"}])
        cut = line(sessions["a"], [{"type": "tokens", "dispatch": j.dispatch_id, "ids": [2], "text": "b"}])[:-9]
        messages = [{"type": "http.request", "body": whole + cut, "more_body": True}, {"type": "http.disconnect"}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:  # the answer goes nowhere: the worker is gone
            pass

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/internal/workers/a/events", "raw_path": b"/internal/workers/a/events",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("router", 80),
                 "headers": [(b"host", b"router"), (b"content-type", b"application/x-ndjson"),
                             (WORKER_TOKEN_HEADER.lower().encode(), TOKEN.encode())]}
        await app(scope, receive, send)  # returns: nothing raised out of the route
        assert j.generated_ids == [1] and j.text == "a" and j.state is JobState.RUNNING

        async def finish():
            yield line(sessions["a"], [{"type": "tokens", "dispatch": j.dispatch_id, "ids": [2], "text": "b"},
                                       {"type": "done", "dispatch": j.dispatch_id, "finish_reason": "length"}])

        r = await stream_events(client, "a", finish())
        assert r.status_code == 200 and j.state is JobState.DONE and j.text == "ab"
        await client.aclose()

    asyncio.run(scenario())
