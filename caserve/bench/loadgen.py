"""Open-loop load generator against any OpenAI-compatible server.

Requests leave at their precomputed arrival offsets whether or not earlier ones have finished (open loop),
so a slow server builds a queue instead of slowing the load down. Generation requests stream (SSE) so TTFT
and inter-token gaps can be measured; classification requests go to ``/v1/embeddings``.

The client is aiohttp's: on a small machine the load generator shares the CPU with the server it
measures, and aiohttp reads a streamed token in about a third of the CPU time httpx takes (docs/results.md,
section 6), which leaves more of the machine to the server.

Timing points of one streamed request (client clock, ``time.perf_counter``)::

    send ---- chunk 1 ---- chunk 2 ---- ... ---- chunk k ---- [usage chunk] ---- [DONE]
    |<- TTFT ->|<- ITL ->|                        |
    |<---------------------- E2E latency ------------>|
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

import aiohttp
import httpx
import numpy as np

from caserve.bench.datasets import BenchRequest
from caserve.bench.metrics import RequestRecord, ServerTimings

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

Endpoint = Literal["completions", "chat", "embeddings", "auto"]
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "embeddings": "/v1/embeddings"}


class LoadGenError(RuntimeError):
    """The target server is unreachable or the run could not start."""


@dataclass
class LoadGenConfig:
    url: str
    model: Optional[str] = None
    endpoint: Endpoint = "auto"
    timeout_s: float = 600.0  # to connect, and the longest wait for the next bytes of a response
    max_concurrency: Optional[int] = None
    progress: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)


# --- caserve per-request timings -------------------------------------------------------------------
_KEYS = {
    "arrival": ("arrival", "arrival_time", "t_arrival", "arrived", "arrival_ts"),
    "dispatch": ("dispatch", "dispatch_time", "t_dispatch", "dispatched", "dispatch_ts", "start"),
    "first_token": ("first_token", "first_token_time", "t_first_token", "first_token_ts"),
    "finish": ("finish", "finish_time", "t_finish", "finished", "finish_ts", "end"),
    "worker_id": ("worker_id", "worker"),
    "worker_kind": ("worker_kind", "kind"),
}


def _first(d: Mapping[str, Any], names: Sequence[str]) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return None


def parse_server_timings(payload: Optional[Mapping[str, Any]], headers: Optional[Mapping[str, str]] = None) -> Optional[ServerTimings]:
    """caserve's per-request timings from a response body (top-level ``timings`` as ``caserve serve``
    returns them in the last stream chunk or the body; also ``usage.caserve``, ``usage.timings``,
    ``caserve``) or ``x-caserve-*`` headers (absolute times, or ``queue-delay-s`` + ``jct-s``).
    Anything absent or malformed -> ``None``."""
    cands: list[Mapping[str, Any]] = []
    if payload:
        usage = payload.get("usage") or {}
        for holder in (usage, payload):
            if isinstance(holder, Mapping):
                for key in ("caserve", "timings", "caserve_timings"):
                    if isinstance(holder.get(key), Mapping):
                        cands.append(holder[key])
    if headers:
        h = {k.lower(): v for k, v in headers.items()}
        hd = {k[len("x-caserve-"):].replace("-", "_"): v for k, v in h.items() if k.startswith("x-caserve-")}
        if hd:
            cands.append(hd)
    for c in cands:
        vals = {k: _first(c, names) for k, names in _KEYS.items()}
        try:
            if vals["arrival"] is None and c.get("queue_delay_s") is not None and c.get("jct_s") is not None:
                # only durations given (caserve's x-caserve-queue-delay-s / -jct-s headers): arrival = 0
                vals.update(arrival=0.0, dispatch=float(c["queue_delay_s"]), finish=float(c["jct_s"]))
            if vals["arrival"] is None or vals["dispatch"] is None or vals["finish"] is None:
                continue
            return ServerTimings(
                arrival=float(vals["arrival"]),
                dispatch=float(vals["dispatch"]),
                finish=float(vals["finish"]),
                first_token=None if vals["first_token"] is None else float(vals["first_token"]),
                worker_id=None if vals["worker_id"] is None else str(vals["worker_id"]),
                worker_kind=None if vals["worker_kind"] is None else str(vals["worker_kind"]),
            )
        except (TypeError, ValueError):
            logger.debug("unparseable caserve timings %r", c)
    return None


# --- one request -----------------------------------------------------------------------------------
def _endpoint_for(req: BenchRequest, cfg: LoadGenConfig) -> str:
    if cfg.endpoint != "auto":
        return cfg.endpoint
    return "embeddings" if req.task == "classify" and req.output_len == 0 else "completions"


def _body(req: BenchRequest, endpoint: str, cfg: LoadGenConfig) -> dict[str, Any]:
    body: dict[str, Any] = {"model": cfg.model} if cfg.model else {}
    if endpoint == "embeddings":
        body["input"] = req.prompt
    else:
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        body.update(
            max_tokens=max(1, req.output_len),
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            ignore_eos=True,
        )
    body.update(cfg.extra_body)
    return body


async def send_one(client: aiohttp.ClientSession, req: BenchRequest, rec: RequestRecord, cfg: LoadGenConfig, t0: float) -> None:
    """Send ``req`` and fill ``rec`` in place. Never raises for request-level failures."""
    endpoint = _endpoint_for(req, cfg)
    url = cfg.url.rstrip("/") + PATHS[endpoint]
    body = _body(req, endpoint, cfg)
    st = time.perf_counter()
    rec.start = st - t0
    rec.prompt_tokens = req.prompt_len
    try:
        if endpoint == "embeddings":
            async with client.post(url, json=body) as resp:
                text = await resp.text()
                rec.latency = rec.ttft = time.perf_counter() - st
                if resp.status != 200:
                    rec.error = f"HTTP {resp.status}: {text[:200]}"
                    return
                data = json.loads(text)
                usage = data.get("usage") or {}
                rec.prompt_tokens = int(usage.get("prompt_tokens") or req.prompt_len)
                rec.server = parse_server_timings(data, resp.headers)
                rec.success = True
            return
        await _stream(client, url, body, rec, st)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        rec.success = False


async def _stream(client: aiohttp.ClientSession, url: str, body: dict, rec: RequestRecord, st: float) -> None:
    chunks = 0
    last = st
    async with client.post(url, json=body) as resp:
        if resp.status != 200:
            text = (await resp.read()).decode(errors="replace")
            rec.error = f"HTTP {resp.status}: {text[:200]}"
            return
        async for raw in resp.content:  # one SSE line at a time, as it arrives
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data_s = line[len(b"data:"):].strip()
            if data_s == b"[DONE]":
                continue
            data = json.loads(data_s)
            now = time.perf_counter()
            if data.get("error"):  # an error reported mid-stream fails the request
                err = data["error"]
                rec.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                return
            if data.get("choices"):
                if chunks == 0:
                    rec.ttft = now - st
                else:
                    rec.itl.append(now - last)
                last = now
                chunks += 1
            usage = data.get("usage")
            if usage:
                rec.output_tokens = int(usage.get("completion_tokens") or 0)
                rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
            srv = parse_server_timings(data)
            if srv is not None:
                rec.server = srv
        if rec.server is None:
            rec.server = parse_server_timings(None, resp.headers)
    if chunks == 0:
        rec.error = "stream ended without any choice chunk"
        return
    rec.latency = last - st
    if rec.output_tokens == 0:
        rec.output_tokens = chunks  # no usage reported: one token per streamed chunk
    rec.success = True


# --- the run -----------------------------------------------------------------------------------------
async def run_load(
    requests: Sequence[BenchRequest], offsets: np.ndarray, cfg: LoadGenConfig
) -> tuple[list[RequestRecord], float]:
    """Replay ``requests`` at ``offsets`` (s, shape (n,)); returns records and the run duration (s)."""
    if len(requests) != len(offsets):
        raise LoadGenError(f"{len(requests)} requests but {len(offsets)} arrival offsets")
    records = [RequestRecord(index=i, scheduled=float(o)) for i, o in enumerate(offsets)]
    if cfg.model is None:  # servers such as caserve serve require "model": use the server's first
        cfg.model = server_info(cfg.url).get("id")
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = _progress(len(requests), cfg.progress)
    # No connection limit (an open loop); a line may hold a long chunk (logprobs, usage and timings). No
    # limit on a whole request either: one that queues long on an overloaded server is a measurement.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout_s, sock_read=cfg.timeout_s)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), read_bufsize=2**20, timeout=timeout)
    async with session as client:
        t0 = time.perf_counter()

        async def fire(i: int) -> None:
            delay = t0 + float(offsets[i]) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                await send_one(client, requests[i], records[i], cfg, t0)
            else:
                async with sem:
                    await send_one(client, requests[i], records[i], cfg, t0)
            if bar is not None:
                bar.update(1)

        await asyncio.gather(*(fire(i) for i in range(len(requests))))
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    failed = [r for r in records if not r.success]
    if failed:
        logger.warning("%d/%d requests failed; first error: %s", len(failed), len(records), failed[0].error)
    return records, duration


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")


def run_load_sync(requests: Sequence[BenchRequest], offsets: np.ndarray, cfg: LoadGenConfig) -> tuple[list[RequestRecord], float]:
    return asyncio.run(run_load(requests, offsets, cfg))


def wait_healthy(url: str, *, timeout_s: float = 120.0, proc=None) -> None:
    """Poll ``url/health`` until 200; raise :class:`LoadGenError` on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LoadGenError(f"server process exited with code {proc.returncode} before becoming healthy")
        try:
            r = httpx.get(url.rstrip("/") + "/health", timeout=2.0, trust_env=False)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.25)
    raise LoadGenError(f"{url} not healthy after {timeout_s:.0f}s (last: {last})")


def server_info(url: str) -> dict[str, Any]:
    """``/v1/models`` of the target (first model's entry), or ``{}`` when unavailable."""
    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", timeout=5.0, trust_env=False)
        data = r.json().get("data") or []
        return dict(data[0]) if data else {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}
