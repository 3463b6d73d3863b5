"""When ``caserve serve`` may say "ready": every worker it started has registered, opened its channel and
sent a heartbeat since (its session answers), and a probe request of the model's task has been answered
end to end through the public API. Also the example commands it prints, which fit that task."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Optional

import httpx

from caserve.serving.router.router import Router

logger = logging.getLogger(__name__)

POLL_S = 0.2
REPORT_EVERY_S = 30.0  # how often a start-up that is still waiting says what it waits for

# A probe of each job task: (route, body without "model").
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "causal-lm": ("/v1/completions", {"prompt": "ready?", "max_tokens": 1, "temperature": 0}),
    "seq2seq": ("/v1/completions", {"prompt": "ready?", "max_tokens": 1, "temperature": 0}),
    "embedding": ("/v1/embeddings", {"input": "ready?"}),
    "classification": ("/v1/classifications", {"input": "ready?"}),
}


def answering(router: Router, model: str, expected: set[str], opened: dict[str, float]) -> set[str]:
    """The expected worker ids whose current session has its channel open and has been heard from (a
    heartbeat or events) since the channel was first seen open. ``opened`` remembers, per session, when."""
    state = router.models.get(model)
    if state is None:
        return set()
    now, ready = time.monotonic(), set()
    for ws in state.workers.values():
        if ws.id not in expected or not ws.alive or not ws.channel_open:
            continue
        seen_open = opened.setdefault(ws.session, now)
        if ws.last_seen > seen_open:
            ready.add(ws.id)
    return ready


async def probe(url: str, model: str, task: str, headers: Optional[dict[str, str]] = None,
                verify: ssl.SSLContext | bool = True) -> Optional[str]:
    """One request of the model's task through the public API; None when it was answered, else why not."""
    route, body = PROBES.get(task, PROBES["causal-lm"])
    try:
        async with httpx.AsyncClient(timeout=120.0, verify=verify) as client:
            resp = await client.post(f"{url}{route}", json={"model": model, **body}, headers=headers or {})
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if resp.status_code == 200 else f"HTTP {resp.status_code}: {resp.text[:200]}"


async def wait_ready(router: Router, url: str, model: str, expected: set[str],
                     headers: Optional[dict[str, str]] = None, verify: ssl.SSLContext | bool = True) -> str:
    """Wait until every worker of ``expected`` answers and a probe request succeeds; returns the model's
    task. Logs what it still waits for every REPORT_EVERY_S (it waits as long as it takes: a worker that
    cannot start is restarted by ``serve`` and reported in the log)."""
    opened: dict[str, float] = {}
    last_report = time.monotonic()
    while True:
        ready = answering(router, model, expected, opened)
        state = router.models.get(model)
        if ready >= expected and state is not None and state.task is not None:
            problem = await probe(url, model, state.task, headers, verify)
            if problem is None:
                return state.task
            logger.warning("start-up probe of %s failed (%s); trying again", model, problem)
            await asyncio.sleep(1.0)
        if time.monotonic() - last_report > REPORT_EVERY_S:
            last_report = time.monotonic()
            logger.warning("not ready yet: waiting for worker(s) %s of %s", ", ".join(sorted(expected - ready)), model)
        await asyncio.sleep(POLL_S)


def usage_text(url: str, model: str, task: Optional[str], *, workers: int = 0, random_weights: bool = False,
               api_key: bool = False, ca: Optional[str] = None) -> str:
    """How to call a ready server, for the model's task (None: no worker started here yet); ``ca``: the CA
    file that checks an HTTPS router's certificate."""
    cacert = f" --cacert {ca}" if ca else ""
    post = f"  curl{cacert} {url}/v1/{{route}} -H 'Content-Type: application/json' \\\n       -d '{{body}}'\n"
    sdk = f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='none'); print({{call}})\"\n"
    lines = [f"ready: {workers} worker(s) registered and answered" if workers else "ready: the router alone",
             f"caserve is serving {model} at {url}"]
    if task in ("causal-lm", "seq2seq"):
        lines.append(post.format(route="completions", body=(
            f'{{"model": "{model}", "prompt": "Hello", "max_tokens": 16, "temperature": 0}}')).rstrip("\n"))
        if task == "causal-lm":
            call = (f"c.chat.completions.create(model='{model}', messages=[dict(role='user', content='Hello')], "
                    f"max_tokens=16).choices[0].message.content")
        else:
            call = f"c.completions.create(model='{model}', prompt='Hello', max_tokens=16, temperature=0).choices[0].text"
        lines.append(sdk.format(call=call).rstrip("\n"))
    elif task == "embedding":
        lines.append(post.format(route="embeddings", body=f'{{"model": "{model}", "input": "Hello"}}').rstrip("\n"))
        lines.append(sdk.format(call=f"len(c.embeddings.create(model='{model}', input='Hello').data[0].embedding)")
                     .rstrip("\n"))
    elif task == "classification":
        lines.append(post.format(route="classifications", body=f'{{"model": "{model}", "input": "Hello"}}')
                     .rstrip("\n"))
    else:
        lines.append(f"  no workers were started here: attach some with  caserve worker --router {url} ...")
    lines.append(f"  health: {url}/health   metrics: {url}/metrics   Ctrl-C stops everything")
    if ca:
        lines.append(f"  HTTPS: clients check the certificate against {ca} (openai: SSL_CERT_FILE={ca}; workers on "
                     "other hosts: caserve worker --router-ca FILE)")
    if random_weights:
        lines.append(f"  ({model} has random weights: its text is noise, its timings are real)")
    if api_key:
        lines.append("  this router requires its API key: add -H 'Authorization: Bearer KEY' (curl), api_key=KEY (openai)")
    return "\n".join(lines)
