"""A minimal FIFO reference server speaking the OpenAI API, for benchmark self-tests and validation.

This is *not* caserve's serving system (``caserve serve``, in :mod:`caserve.serving`); it is the smallest
thing the benchmark tools can be checked against: one FIFO queue feeding ``N`` worker threads, per-request
caserve timings in ``usage.caserve``, and two kinds of work:

* ``SleepWork``: service time = ``prefill_ms + per_token_ms * tokens`` (assisted workers times
  ``assisted_factor``), deterministic and cheap: load-generator tests.
* ``ModelWork``: real greedy decoding / encoder forward passes of a model from :mod:`caserve.models`
  (random weights when none are found locally): the "real small run" the simulator is validated against.

Run: ``python -m caserve.bench.refserver --port 8011 --native-workers 1 --assisted-workers 1 --model gpt2``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

logger = logging.getLogger(__name__)

Emit = Callable[[str], None]


class SleepWork:
    name = "sleep-model"
    random_weights = False
    task = "causal-lm"

    def __init__(self, prefill_ms: float = 5.0, per_token_ms: float = 2.0, assisted_factor: float = 1.0):
        self.prefill_ms, self.per_token_ms, self.assisted_factor = prefill_ms, per_token_ms, assisted_factor

    def generate(self, prompt: str, max_tokens: int, emit: Emit, kind: str) -> int:
        f = self.assisted_factor if kind == "assisted" else 1.0
        time.sleep(self.prefill_ms * f / 1000)
        for i in range(max_tokens):
            if i:
                time.sleep(self.per_token_ms * f / 1000)
            emit(f" t{i}")
        return max_tokens

    def embed(self, text: str, kind: str) -> list[float]:
        time.sleep(self.prefill_ms / 1000 * (self.assisted_factor if kind == "assisted" else 1.0))
        return [float(len(text) % 7), 1.0]


class ModelWork:
    """Real forward passes; one lock-free model shared by the worker threads (inference only)."""

    def __init__(self, model: str, *, shrink: bool = False, max_input_tokens: int = 256):
        import torch

        from caserve.models import load_model

        torch.set_num_threads(1)
        self.lm = load_model(model, shrink=shrink)
        self.lm.model.eval()
        self.name, self.random_weights, self.task = self.lm.name, self.lm.random_weights, self.lm.task
        self.max_input = max(8, min(max_input_tokens, self.lm.max_context // 2))
        self._torch = torch

    def _ids(self, text: str):
        ids = self.lm.tokenizer(text or " ", return_tensors="pt").input_ids[:, -self.max_input :]  # (1, T)
        return ids

    def generate(self, prompt: str, max_tokens: int, emit: Emit, kind: str) -> int:
        torch, tok, model = self._torch, self.lm.tokenizer, self.lm.model
        max_tokens = max(1, min(max_tokens, self.lm.max_context - self.max_input))
        ids = self._ids(prompt)
        with torch.inference_mode():
            if self.task == "seq2seq":
                out = model.generate(input_ids=ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
                new = out[0, 1:]
                for t in new.tolist():
                    emit(tok.decode([t]))
                return int(len(new))
            if self.task != "causal-lm":
                self.embed(prompt, kind)
                emit(" ")
                return 1
            out = model(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            emit(tok.decode(nxt[0]))
            for _ in range(max_tokens - 1):
                out = model(input_ids=nxt, **_cache_kwargs(out), use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                emit(tok.decode(nxt[0]))
        return max_tokens

    def embed(self, text: str, kind: str) -> list[float]:
        torch = self._torch
        ids = self._ids(text)
        with torch.inference_mode():
            if self.task == "seq2seq":
                hidden = self.lm.model.get_encoder()(input_ids=ids).last_hidden_state
            else:
                out = self.lm.model(input_ids=ids, output_hidden_states=True)
                hidden = out.hidden_states[-1]  # (1, T, H)
            return hidden.mean(dim=1)[0, :8].tolist()


def _cache_kwargs(out) -> dict:
    """Feed a forward output's KV cache back (``cache`` in transformers 5, ``past_key_values`` before)."""
    if out.get("cache") is not None:
        return {"cache": out["cache"]}
    return {"past_key_values": out["past_key_values"]}


@dataclass
class Job:
    kind: str  # "generate" | "embed"
    text: str
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    arrival: float = field(default_factory=time.time)
    timings: dict[str, Any] = field(default_factory=dict)


class FifoPool:
    """One FIFO queue, ``native`` + ``assisted`` worker threads."""

    def __init__(self, work, native: int, assisted: int):
        self.work = work
        self.q: "queue.Queue[Optional[Job]]" = queue.Queue()
        kinds = ["native"] * native + ["assisted"] * assisted
        self.threads = [threading.Thread(target=self._run, args=(f"{k}-{i}", k), daemon=True) for i, k in enumerate(kinds)]
        for t in self.threads:
            t.start()

    def _run(self, wid: str, kind: str) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            tm = job.timings
            tm.update(arrival=job.arrival, dispatch=time.time(), worker_id=wid, worker_kind=kind)

            def emit(text: str) -> None:
                tm.setdefault("first_token", time.time())
                job.loop.call_soon_threadsafe(job.out.put_nowait, ("tok", text))
                time.sleep(0)  # yield the GIL so the event loop streams this token now, not after decoding

            try:
                if job.kind == "embed":
                    result: Any = self.work.embed(job.text, kind)
                else:
                    result = self.work.generate(job.text, job.max_tokens, emit, kind)
                tm["finish"] = time.time()
                job.loop.call_soon_threadsafe(job.out.put_nowait, ("done", result))
            except Exception as exc:  # noqa: BLE001 - reported to the one client, worker keeps going
                logger.exception("worker %s failed", wid)
                job.loop.call_soon_threadsafe(job.out.put_nowait, ("error", repr(exc)))

    def submit(self, job: Job) -> None:
        self.q.put(job)

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)


def build_app(work, *, native: int = 1, assisted: int = 0) -> FastAPI:
    app = FastAPI(title="caserve bench reference server")
    pool = FifoPool(work, native, assisted)
    app.state.pool = pool

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": work.name, "object": "model", "random_weights": work.random_weights,
                                             "workers": {"native": native, "assisted": assisted}}]}

    async def _submit(kind: str, text: str, max_tokens: int) -> Job:
        job = Job(kind, text, max_tokens, asyncio.get_running_loop(), asyncio.Queue())
        pool.submit(job)
        return job

    async def _completion(body: dict, chat: bool):
        if chat:
            msgs = body.get("messages") or []
            text = " ".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
        else:
            text = body.get("prompt")
            text = text if isinstance(text, str) else " ".join(map(str, text or []))
        try:
            max_tokens = int(body.get("max_tokens") or 16)
        except (TypeError, ValueError):
            raise HTTPException(400, "max_tokens must be an integer")
        if max_tokens < 1 or max_tokens > 4096:
            raise HTTPException(400, "max_tokens must be in 1..4096")
        rid = f"cmpl-{uuid.uuid4().hex[:12]}"
        job = await _submit("generate", text, max_tokens)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def choice(t: str) -> dict:
            return {"index": 0, "delta": {"content": t}} if chat else {"index": 0, "text": t}

        async def events():
            n = 0
            while True:
                what, val = await job.out.get()
                if what == "tok":
                    n += 1
                    yield f"data: {json.dumps({'id': rid, 'object': obj, 'choices': [choice(val)]})}\n\n"
                elif what == "error":
                    yield f"data: {json.dumps({'error': {'message': val}})}\n\n"
                    return
                else:
                    usage = {"prompt_tokens": len(text.split()), "completion_tokens": int(val), "caserve": job.timings}
                    yield f"data: {json.dumps({'id': rid, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                    return

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        parts = []
        while True:
            what, val = await job.out.get()
            if what == "tok":
                parts.append(val)
            elif what == "error":
                raise HTTPException(500, val)
            else:
                break
        content = "".join(parts)
        ch = {"index": 0, "message": {"role": "assistant", "content": content}} if chat else {"index": 0, "text": content}
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": int(val), "caserve": job.timings}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "choices": [ch], "usage": usage}

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await _completion(await _json(req), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        return await _completion(await _json(req), chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(req: Request):
        body = await _json(req)
        text = body.get("input")
        text = text if isinstance(text, str) else " ".join(map(str, text or []))
        job = await _submit("embed", text, 0)
        what, val = await job.out.get()
        if what == "error":
            raise HTTPException(500, val)
        usage = {"prompt_tokens": len(text.split()), "total_tokens": len(text.split()), "caserve": job.timings}
        return JSONResponse({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": val}], "usage": usage})

    return app


async def _json(req: Request) -> dict:
    try:
        body = await req.json()
    except ValueError:
        raise HTTPException(400, "body is not JSON")
    if not isinstance(body, dict):
        raise HTTPException(400, "body must be a JSON object")
    return body


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--model", default="sleep", help="'sleep' or a caserve.models name/path")
    p.add_argument("--native-workers", type=int, default=1)
    p.add_argument("--assisted-workers", type=int, default=0)
    p.add_argument("--prefill-ms", type=float, default=5.0)
    p.add_argument("--per-token-ms", type=float, default=2.0)
    p.add_argument("--assisted-factor", type=float, default=1.0)
    p.add_argument("--shrink", action="store_true", help="zoo models: the shrunk architecture")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = (SleepWork(a.prefill_ms, a.per_token_ms, a.assisted_factor) if a.model == "sleep"
            else ModelWork(a.model, shrink=a.shrink))
    import uvicorn

    uvicorn.run(build_app(work, native=a.native_workers, assisted=a.assisted_workers), host=a.host, port=a.port,
                log_level="warning")


if __name__ == "__main__":
    main()
