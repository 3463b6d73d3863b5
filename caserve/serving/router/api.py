"""The OpenAI-compatible HTTP API of the router (FastAPI).

Routes are thin: validate (``schemas``), build jobs, hand them to the :class:`Router`, wait and render
(or stream: :mod:`caserve.serving.router.streams`). Every :class:`ServingError` becomes its one HTTP
status with an OpenAI-style error body here.
Timings (router monotonic clock, see ``jobs.Job.timings``) are returned as a top-level ``timings``
object (a list when a request has several prompts or choices), in the last chunk of each choice of a
stream, and as ``x-caserve-*`` headers on non-streamed responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from typing import Any, AsyncIterator, Optional, Union

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from caserve.serving.router import schemas as S
from caserve.serving.errors import (
    BadRequest, ContextLengthExceeded, NotFound, RequestCancelled, ServingError, error_body,
)
from caserve.serving.messages import TASK_CLASSIFY, TASK_EMBED, TASK_GENERATE, ChatMessage, SamplingParams
from caserve.serving.router.jobs import Job
from caserve.serving.router.metrics import CONTENT_TYPE_LATEST
from caserve.serving.router.router import Router
from caserve.serving.router.security import Access, RouterGuard, RouterSecurity, access_of
from caserve.serving.router.streams import (
    ChoiceEvents, cancel_on_exit, done_before_disconnect, first_events, sse,
)
from caserve.serving.router.worker_api import make_worker_routes

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256


def create_app(router: Router, security: RouterSecurity) -> FastAPI:
    """The router's ASGI app: public routes, worker routes, and :class:`RouterGuard` in front of both."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(router.reap_forever())
        try:
            yield
        finally:
            reaper.cancel()

    app = FastAPI(title="caserve", lifespan=lifespan)
    app.state.router = router
    app.include_router(make_worker_routes(router))
    _install_error_handlers(app)
    app.add_middleware(RouterGuard, security=security)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if access_of(request.scope) is Access.ANONYMOUS:
            return {"status": "ok"}  # liveness only: workers, queues and job ids need the API key
        return {"status": "ok", **router.describe()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [S.model_card(m.name, m.created) for m in router.models.values()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        state = router.model(model)
        return S.model_card(state.name, state.created)

    def check_context(req: S.SamplingRequest, params: SamplingParams) -> None:
        """A max_tokens the context cannot hold is a 400 here; prompt + max_tokens is checked by the worker."""
        limit = router.model(req.model, TASK_GENERATE).max_context
        if not params.fit_context and limit is not None and params.max_tokens >= limit:
            raise ContextLengthExceeded(
                f"max_tokens is {params.max_tokens}, but this model's maximum context length is {limit} "
                f"tokens (prompt included)", param="max_tokens")

    @app.post("/v1/completions", response_model=None)
    async def completions(req: S.CompletionRequest, request: Request) -> Union[JSONResponse, StreamingResponse]:
        req.check_supported()
        params = SamplingParams(**req.sampling_params(COMPLETION_DEFAULT_MAX_TOKENS))
        check_context(req, params)
        jobs = []
        for prompt in req.prompts():
            key = "prompt" if isinstance(prompt, str) else "prompt_ids"
            jobs += _choice_jobs(req, {key: prompt}, params, prompt_units=len(prompt))
        return await _run_generation(router, request, req, jobs, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: S.ChatCompletionRequest, request: Request) -> Union[JSONResponse, StreamingResponse]:
        req.check_supported()
        params = SamplingParams(**req.sampling_params(CHAT_DEFAULT_MAX_TOKENS))
        check_context(req, params)
        messages = [ChatMessage(role=m.role, content=m.text()) for m in req.messages]
        jobs = _choice_jobs(req, {"messages": messages}, params,
                            prompt_units=sum(len(m.content) for m in messages))
        return await _run_generation(router, request, req, jobs, chat=True)

    async def run_encoder(model: str, task: str, inputs: list, request: Request, user: Optional[str]) -> Job:
        """Queue one embedding or classification job and wait for it."""
        job = Job(model, task, {"inputs": inputs}, prompt_units=sum(len(x) for x in inputs), user=user)
        router.submit([job])
        await _wait(router, request, [job])
        return job

    @app.post("/v1/embeddings")
    async def embeddings(req: S.EmbeddingRequest, request: Request) -> JSONResponse:
        job = await run_encoder(req.model, TASK_EMBED, req.inputs(), request, req.user)
        vectors: list[list[float]] = job.result
        if req.dimensions is not None:
            if vectors and req.dimensions > len(vectors[0]):
                raise BadRequest(f"dimensions must be at most {len(vectors[0])}", param="dimensions")
            vectors = [_unit(v[: req.dimensions]) for v in vectors]  # shortened, then unit length again
        data = [{"object": "embedding", "index": i, "embedding": S.encode_embedding(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        body = {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens},
                "timings": job.timings()}
        return JSONResponse(body, headers=_timing_headers(job))

    @app.post("/v1/classifications")
    async def classifications(req: S.ClassificationRequest, request: Request) -> JSONResponse:
        job = await run_encoder(req.model, TASK_CLASSIFY, req.inputs(), request, req.user)
        data = [{"index": i, **r} for i, r in enumerate(job.result)]
        body = {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens},
                "timings": job.timings()}
        return JSONResponse(body, headers=_timing_headers(job))

    return app


def _choice_jobs(req: S.SamplingRequest, prompt: dict[str, Any], params: SamplingParams, *,
                 prompt_units: int) -> list[Job]:
    """One job per choice of one prompt (``best_of`` candidates when that is more than ``n``); with a seed,
    choice j draws with seed + j (different choices, reproducible). The choices of a request share a
    ``prompt_group``, so that a worker that runs them together prefills their prompt once."""
    n = req.candidates
    if n == 1 or params.seed is None:
        choices = [params] * n
    else:
        choices = [msgspec.structs.replace(params, seed=params.seed + j) for j in range(n)]
    group = {"prompt_group": uuid.uuid4().hex} if n > 1 else {}
    return [Job(req.model, TASK_GENERATE, {**prompt, **group, "params": p}, prompt_units=prompt_units,
                max_tokens=p.max_tokens, stream=req.stream, user=req.user) for p in choices]


def _unit(v: list[float]) -> list[float]:
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v] if norm > 0 else v


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = "We could not parse the JSON body of your request."
        else:
            message = "; ".join(_describe(e) for e in errors[:5])
        return JSONResponse(error_body(BadRequest(message, param=".".join(loc) or None)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = NotFound(str(exc.detail)) if exc.status_code == 404 else BadRequest(str(exc.detail))
        return JSONResponse(error_body(err), status_code=exc.status_code)


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    return f"{where}: {error.get('msg')}" if where else str(error.get("msg"))


async def _wait(router: Router, request: Request, jobs: list[Job]) -> None:
    """Wait for all jobs; cancel them if the client disconnects first; raise the first job error."""
    all_done = asyncio.ensure_future(asyncio.gather(*(j.finished.wait() for j in jobs)))
    if not await done_before_disconnect(request, all_done):
        for job in jobs:
            router.cancel(job)
        logger.info("client disconnected; cancelled %d job(s)", len(jobs))
        raise RequestCancelled("client disconnected")
    for job in jobs:
        if job.error is not None:
            raise job.error


def _timing_headers(job: Job) -> dict[str, str]:
    t = job.timings()
    return {
        "x-caserve-request-id": job.id,
        "x-caserve-worker-id": str(t["worker_id"]),
        "x-caserve-worker-kind": str(t["worker_kind"]),
        "x-caserve-queue-delay-s": str(t["queue_delay_s"]),
        "x-caserve-jct-s": str(t["jct_s"]),
    }


async def _run_generation(
    router: Router, request: Request, req: S.SamplingRequest, jobs: list[Job], *, chat: bool,
) -> Union[JSONResponse, StreamingResponse]:
    events = ChoiceEvents(jobs)  # before submitting: the jobs put their events in its queue
    router.submit(jobs)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = S.now_unix()
    if not req.stream:
        await _wait(router, request, jobs)
        shown = _best(jobs, req.n, req.candidates)
        choices = [_choice(i, job, req) for i, job in enumerate(shown)]
        body = {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model, "choices": choices, "system_fingerprint": None,
            # every candidate was computed: usage counts them all, as OpenAI bills best_of
            "usage": S.usage_body(sum(j.prompt_tokens for j in jobs), sum(j.completion_tokens for j in jobs)),
            "timings": shown[0].timings() if len(shown) == 1 else [j.timings() for j in shown],
        }
        return JSONResponse(body, headers=_timing_headers(shown[0]))

    # Wait for the first event before answering, so that a worker-side error is still a plain 4xx.
    first = await first_events(router, request, events)
    chunks = sse(events, first, rid, created, req, chat=chat)
    return StreamingResponse(cancel_on_exit(router, jobs, chunks), media_type="text/event-stream",
                             headers={"x-caserve-request-id": jobs[0].id})


def _best(jobs: list[Job], n: int, candidates: int) -> list[Job]:
    """Of each prompt's ``candidates`` (consecutive jobs), the ``n`` with the highest mean logprob per
    generated token, best first (ties keep their order; a candidate without tokens comes last)."""
    if candidates == n:
        return jobs

    def mean_logprob(job: Job) -> float:
        values = [e.logprob for e in job.logprobs if e.logprob is not None]
        return sum(values) / len(values) if values else -math.inf

    out: list[Job] = []
    for start in range(0, len(jobs), candidates):
        out += sorted(jobs[start:start + candidates], key=mean_logprob, reverse=True)[:n]
    return out


def _choice(index: int, job: Job, req: S.SamplingRequest) -> dict[str, Any]:
    if isinstance(req, S.ChatCompletionRequest):
        logprobs = S.chat_logprobs(job.logprobs) if req.logprobs else None
        return {"index": index, "message": {"role": "assistant", "content": job.text},
                "finish_reason": job.finish_reason, "logprobs": logprobs}
    assert isinstance(req, S.CompletionRequest)
    text, entries = job.text, list(job.logprobs)
    if req.echo:  # the prompt as given (a token-id prompt as the worker decoded it), then the completion
        text = job.echo_text + text
        entries = list(job.prompt_logprobs or []) + entries
    logprobs = S.completion_logprobs(entries) if req.logprobs is not None else None
    return {"index": index, "text": text, "finish_reason": job.finish_reason, "logprobs": logprobs}
