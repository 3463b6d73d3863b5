"""Faults with real processes: a worker SIGKILLed mid-request (its request is requeued, continued on
another worker and answered exactly once, streamed or not) and a router restarted (workers register
again by themselves)."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from serving_procs import TINY, Cluster, Proc, openai_client

MAX_TOKENS = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("faults"))
    try:
        c.router()
        c.worker("w1", "--step-delay", "0.02")
        c.worker("w2", "--step-delay", "0.02")
        c.wait_workers({"w1", "w2"})
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> str:
    """The uninterrupted greedy answer (all workers hold the same seeded weights)."""
    resp = openai_client(cluster.url).completions.create(
        model=TINY, prompt="fault", max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    return resp.choices[0].text


def proc_of(c: Cluster, worker_id: str) -> Proc:
    return next(p for p in c.procs if p.name == worker_id)


def running_worker(c: Cluster) -> str:
    c.wait_for("a request running", lambda: any(w["running"] for w in c.workers()))
    return next(w["id"] for w in c.workers() if w["running"])


def answered_once(c: Cluster, request_id: str) -> bool:
    router_log = "\n".join(p.log.read_text(errors="replace") for p in c.procs if p.name.startswith("router"))
    return router_log.count(f"request {request_id} ") == 1


def test_worker_killed_mid_stream_is_continued_elsewhere_exactly_once(cluster: Cluster, reference: str) -> None:
    c = cluster
    requeues = c.metric("caserve_requeues_total")
    stream = openai_client(c.url).completions.create(
        model=TINY, prompt="fault", max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    parts, usage, timings, victim = [], None, None, None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.text)
        usage = chunk.usage or usage
        timings = (chunk.model_extra or {}).get("timings") or timings
        if victim is None and len(parts) == 10:
            victim = running_worker(c)
            proc_of(c, victim).kill()
    assert victim is not None
    assert "".join(parts) == reference  # nothing lost, nothing repeated
    assert usage.completion_tokens == MAX_TOKENS
    assert timings["attempts"] == 2 and timings["worker_id"] not in (None, victim)
    assert c.metric("caserve_requeues_total") == requeues + 1
    assert answered_once(c, timings["request_id"])
    assert victim not in {w["id"] for w in c.workers()}


def test_worker_killed_mid_request_is_requeued_and_answered_once(cluster: Cluster, reference: str) -> None:
    c = cluster
    c.worker("w3", "--step-delay", "0.02")
    c.wait_for("two live workers", lambda: len(c.workers()) == 2)
    client = openai_client(c.url)
    with cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.completions.create, model=TINY, prompt="fault", max_tokens=MAX_TOKENS,
                             temperature=0, extra_body={"ignore_eos": True})
        victim = running_worker(c)
        c.wait_for("some tokens generated", lambda: c.metric("caserve_generated_tokens_total", worker=victim) >= 5)
        proc_of(c, victim).kill()
        resp = future.result()
    t = resp.model_extra["timings"]
    assert resp.choices[0].text == reference
    assert resp.usage.completion_tokens == MAX_TOKENS
    assert t["attempts"] == 2 and t["worker_id"] != victim
    assert answered_once(c, t["request_id"])


def test_router_restart_workers_register_again(cluster: Cluster) -> None:
    c = cluster
    live = {w["id"] for w in c.workers()}
    assert len(live) == 1
    (live_worker,) = live
    router = next(p for p in c.procs if p.name == "router")
    router.kill()
    c.router(name="router-2")
    c.wait_workers(live)
    assert proc_of(c, live_worker).alive()  # the same worker process, registered again
    resp = openai_client(c.url).completions.create(model=TINY, prompt="after restart", max_tokens=4)
    assert resp.model_extra["timings"]["worker_id"] == live_worker
