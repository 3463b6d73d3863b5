"""The public OpenAI routes under random and hostile bodies, in-process (ASGI, no sockets, no model).

A router serves model ``m`` through one in-process worker that speaks the worker protocol over the
router's own HTTP routes: it takes every ``Run`` off its channel, checks that the line decodes on the
worker's side into the same rows (whatever the public API accepts, a worker must accept too), and
answers each row the way a real worker does (a token, its logprobs when asked, the prompt's when
echoed, then ``done``). Each body is a valid request with a few fields replaced by random or hostile
JSON (NaN and Infinity included, as Python's JSON parser takes them). Invariants:

- every answer is a 200 of the right shape (one choice per prompt and ``n``) or a 4xx with an OpenAI
  error object; never a 5xx, never a hang;
- nothing leaks: after every request no job is queued or running;
- the router still serves a plain request afterwards.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caserve.serving.messages import (
    WORKER_TOKEN_HEADER, Done, EventsRequest, RegisterReply, Run, TokenLogprob, Tokens, TopLogprob,
    encode, encode_line, router_message_decoder,
)
from caserve.serving.router.api import create_app
from caserve.serving.router.router import Router
from caserve.serving.router.security import RouterSecurity

TOKEN = "t" * 32
WORKERS = "http://router/internal/workers"
CONTEXT = 64
ANSWER_S = 5.0  # far more than an in-process round trip takes: a request not answered by then hangs

JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
HOSTILE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
SMALL = st.integers(-3, 8)
UNIT = st.floats(-0.5, 2.5)
# Values a client could mean, per field; each field also gets HOSTILE values.
PLAUSIBLE: dict[str, st.SearchStrategy] = {
    "max_tokens": st.integers(-2, 80), "max_completion_tokens": st.integers(-2, 80), "n": SMALL,
    "best_of": SMALL, "temperature": UNIT, "top_p": UNIT, "top_k": SMALL, "min_p": UNIT,
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": UNIT, "seed": st.integers(-(2 ** 65), 2 ** 65), "logprobs": SMALL | st.booleans(),
    "top_logprobs": SMALL, "echo": st.booleans(), "stream": st.booleans(),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "stop_token_ids": st.lists(st.integers(-2, 600), max_size=4), "ignore_eos": st.booleans(),
    "min_tokens": SMALL, "logit_bias": st.dictionaries(st.text("0123456789-x", max_size=4), st.floats(-150, 150),
                                                       max_size=3),
    "stream_options": st.just({"include_usage": True}) | st.just({"include_usage": "yes"}),
    "user": st.text(max_size=300), "model": st.sampled_from(["m", "", "other"]),
    "prompt": st.text(max_size=20) | st.lists(st.integers(-1, 600), max_size=5)
    | st.lists(st.text(max_size=5), max_size=3) | st.lists(st.lists(st.integers(0, 600), max_size=3), max_size=3),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                                "content": st.text(max_size=8)}), max_size=3),
    "response_format": st.just({"type": "json_object"}) | st.just({"type": "text"}),
    "suffix": st.text(max_size=3), "tools": st.just([]), "skip_special_tokens": st.booleans(),
    "no_such_field": HOSTILE,
}


@st.composite
def requests(draw: Any) -> tuple[str, dict[str, Any]]:
    """(route, body): a valid request of either route with 0-4 fields set to plausible or hostile values."""
    chat = draw(st.booleans())
    body: dict[str, Any] = {"model": "m", "max_tokens": 2}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    for name in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=4, unique=True)):
        body[name] = draw(PLAUSIBLE[name] | HOSTILE)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


class InProcessWorker:
    """Worker ``w`` of model ``m``: registered and fed through the router's worker routes."""

    def __init__(self, router: Router, client: httpx.AsyncClient) -> None:
        self.router, self.client = router, client
        self.session = ""
        self.rows_seen = 0

    async def register(self) -> None:
        r = await self.client.post(f"{WORKERS}/register", headers={WORKER_TOKEN_HEADER: TOKEN}, json={
            "worker_id": "w", "kind": "cpu", "model": "m", "task": "causal-lm", "max_batch": 4,
            "max_context": CONTEXT})
        assert r.status_code == 200, r.text
        self.session = msgspec.json.decode(r.content, type=RegisterReply).session
        self.ws = self.router.models["m"].workers["w"]
        self.router.channel_opened(self.ws)

    async def serve(self) -> None:
        while True:
            message = await self.ws.outbox.get()
            line = encode_line(message)
            back = router_message_decoder.decode(line)  # the worker's decoder takes what the router sent
            assert back == message
            if isinstance(back, Run):  # a Cancel or Ping needs no answer
                await self.answer(back)

    async def answer(self, run: Run) -> None:
        events: list[Any] = []
        for row in run.rows:
            self.rows_seen += 1
            params = row.params
            assert params is not None and row.task == "generate"
            assert params.max_tokens < CONTEXT and math.isfinite(params.temperature)
            prompt = None
            if params.prompt_logprobs is not None:  # echo: the prompt's logprobs, the first one null
                prompt = [TokenLogprob(id=1, token="h", logprob=None, bytes=[104]),
                          TokenLogprob(id=2, token="i", logprob=-1.0, bytes=[105],
                                       top=[TopLogprob(id=2, token="i", logprob=-1.0)] * params.prompt_logprobs)]
            if params.max_tokens > 0:
                logprobs = None
                if params.logprobs is not None:
                    logprobs = [TokenLogprob(id=3, token="a", logprob=-0.5, bytes=[97],
                                             top=[TopLogprob(id=3, token="a", logprob=-0.5)] * params.logprobs)]
                events.append(Tokens(dispatch=row.dispatch, ids=[3], text="a", logprobs=logprobs))
            events.append(Done(dispatch=row.dispatch, finish_reason="length", prompt_tokens=2,
                               prompt_logprobs=prompt))
        body = encode(EventsRequest(session=self.session, events=events))
        r = await self.client.post(f"{WORKERS}/w/events", content=body,
                                   headers={WORKER_TOKEN_HEADER: TOKEN, "content-type": "application/json"})
        assert r.status_code == 200, r.text


def check_answer(route: str, body: dict[str, Any], r: httpx.Response) -> None:
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code != 200:
        assert 400 <= r.status_code < 500
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        return
    if body.get("stream") is True:
        lines = [x for x in r.text.split("\n\n") if x]
        assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
        return
    answer = r.json()
    prompts = body.get("prompt", "hi")
    count = len(prompts) if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else 1
    if route.endswith("chat/completions"):
        count = 1
    assert len(answer["choices"]) == count * body.get("n", 1)
    for choice in answer["choices"]:
        assert (choice["message"]["content"] if "message" in choice else choice["text"]) is not None


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=st.lists(requests(), min_size=1, max_size=4))
def test_random_and_hostile_bodies_get_an_answer_and_leave_nothing_behind(cases) -> None:
    async def scenario() -> None:
        router = Router(policy="fcfs", max_queue=64)
        app = create_app(router, RouterSecurity(TOKEN))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
            worker = InProcessWorker(router, client)
            await worker.register()
            serving = asyncio.ensure_future(worker.serve())
            try:
                for route, body in cases:
                    content = json.dumps(body, allow_nan=True)  # NaN and Infinity as Python's parser takes them
                    r = await asyncio.wait_for(client.post(route, content=content, headers={
                        "content-type": "application/json"}), ANSWER_S)
                    check_answer(route, body, r)
                    state = router.models["m"]
                    assert not state.queue and not state.workers["w"].jobs  # nothing queued or running
                seen = worker.rows_seen
                r = await asyncio.wait_for(client.post("/v1/completions", json={
                    "model": "m", "prompt": "hi", "max_tokens": 2}), ANSWER_S)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "a"
                assert worker.rows_seen == seen + 1
            finally:
                serving.cancel()
                if serving.done() and not serving.cancelled() and serving.exception() is not None:
                    raise serving.exception()  # type: ignore[misc]

    asyncio.run(scenario())
