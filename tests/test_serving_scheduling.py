"""Scheduling end to end over loopback with real processes: static batching (the baseline) and continuous
batching (a request joins a running worker's free slot), admission control (429), client-disconnect
cancellation, and FCFS vs ECT dispatch between a fast and a slow worker.

Workers are slowed with ``--step-delay`` (seconds per decode step) so that "running" lasts long enough
to act on; no assertion is about speed."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from serving_procs import TINY, Cluster, openai_client


def complete(url: str, max_tokens: int, prompt: str = "go", **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra})


@pytest.fixture(scope="module")
def one_slow_worker(tmp_path_factory: pytest.TempPathFactory):
    """Router with --max-queue 3 and one static-batching worker (4 slots, 10 ms per decode step)."""
    c = Cluster(tmp_path_factory.mktemp("sched"))
    try:
        c.router("--max-queue", "3")
        c.worker("w0", "--max-batch", "4", "--step-delay", "0.01", "--batching", "static")
        c.wait_workers({"w0"})
        yield c
    finally:
        c.stop()


def running(c: Cluster) -> list[str]:
    return [j for w in c.workers() for j in w["running"]]


def wait_idle(c: Cluster, done_before: int = 0) -> dict:
    """The single worker once nothing is queued or running and it has finished more than ``done_before``."""
    c.wait_for("worker idle", lambda: not c.health()["models"][TINY]["queue"] and all(
        not w["busy"] and w["jobs_done"] > done_before for w in c.workers()), timeout=60)
    return c.workers()[0]


def test_queued_compatible_requests_run_as_one_batch(one_slow_worker: Cluster) -> None:
    c = one_slow_worker
    with cf.ThreadPoolExecutor(4) as pool:
        first = pool.submit(complete, c.url, 200)  # >= 2 s: time to queue the others
        c.wait_for("first request running", lambda: len(running(c)) == 1)
        rest = [pool.submit(complete, c.url, 8, prompt=p) for p in ("a", "bb", "ccc")]
        c.wait_for("three requests queued", lambda: c.health()["models"][TINY]["queue"] == 3)
        responses = [f.result() for f in [first, *rest]]
    assert all(r.status_code == 200 for r in responses)
    timings = [r.json()["timings"] for r in responses[1:]]
    assert len({t["last_dispatch"] for t in timings}) == 1  # dispatched together ...
    assert {t["worker_id"] for t in timings} == {"w0"}
    assert min(t["last_dispatch"] for t in timings) >= responses[0].json()["timings"]["finish"]  # static: after it
    wait_idle(c)
    assert [r.json()["usage"]["completion_tokens"] for r in responses[1:]] == [8, 8, 8]
    assert c.metric("caserve_batch_size_count") - c.metric("caserve_batch_size_bucket", le="2.0") >= 1


def test_full_queue_answers_429_with_retry_after(one_slow_worker: Cluster) -> None:
    c = one_slow_worker
    with cf.ThreadPoolExecutor(4) as pool:
        first = pool.submit(complete, c.url, 200)  # >= 2 s: time to queue the others
        c.wait_for("first request running", lambda: len(running(c)) == 1)
        queued = [pool.submit(complete, c.url, 4) for _ in range(3)]
        c.wait_for("queue full", lambda: c.health()["models"][TINY]["queue"] == 3)
        refused = complete(c.url, 4)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert all(f.result().status_code == 200 for f in [first, *queued])  # admitted ones all finish
    assert c.metric("caserve_rejected_total", model=TINY) >= 1
    assert complete(c.url, 2).status_code == 200  # and the queue accepts again


def freed_quickly(c: Cluster, before: int, cancelled: int = 1) -> None:
    """The cancelled requests' slots are free again: a new request on the static worker (which admits only
    when all its slots are free) finishes long before the 800 steps of a cancelled one would."""
    c.wait_for("cancelled", lambda: c.metric("caserve_requests_total", outcome="cancelled") == before + cancelled)
    t0 = time.monotonic()
    assert complete(c.url, 3).status_code == 200
    assert time.monotonic() - t0 < 5.0  # 800 steps take >= 8 s (10 ms each)
    assert not running(c)


def test_stream_disconnect_cancels_and_frees_the_worker(one_slow_worker: Cluster) -> None:
    c = one_slow_worker
    before = c.metric("caserve_requests_total", outcome="cancelled")
    with httpx.stream("POST", f"{c.url}/v1/completions", timeout=60, json={
            "model": TINY, "prompt": "long", "max_tokens": 800, "stream": True, "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # leaving the block closes the connection mid-stream
    freed_quickly(c, before)


def test_stream_of_three_choices_disconnect_cancels_each(one_slow_worker: Cluster) -> None:
    c = one_slow_worker
    before = c.metric("caserve_requests_total", outcome="cancelled")
    seen: set[int] = set()
    with httpx.stream("POST", f"{c.url}/v1/completions", timeout=60, json={
            "model": TINY, "prompt": "long", "max_tokens": 800, "n": 3, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.update(choice["index"] for choice in json.loads(line[len("data: "):])["choices"])
            if seen == {0, 1, 2}:
                break  # every choice streams; leaving the block closes the connection mid-stream
    assert seen == {0, 1, 2}
    freed_quickly(c, before, cancelled=3)


def test_non_stream_disconnect_cancels_and_frees_the_worker(one_slow_worker: Cluster) -> None:
    c = one_slow_worker
    before = c.metric("caserve_requests_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{c.url}/v1/completions", timeout=httpx.Timeout(60, read=1.0), json={
            "model": TINY, "prompt": "long", "max_tokens": 800, "ignore_eos": True})
    freed_quickly(c, before)


@pytest.fixture(scope="module")
def continuous_worker(tmp_path_factory: pytest.TempPathFactory):
    """One continuous-batching worker (4 slots, 10 ms per decode step)."""
    c = Cluster(tmp_path_factory.mktemp("continuous"))
    try:
        c.router()
        c.worker("w0", "--max-batch", "4", "--step-delay", "0.01")
        c.wait_workers({"w0"})
        yield c
    finally:
        c.stop()


def test_short_request_joins_a_running_worker_and_finishes_long_before_the_long_one(continuous_worker) -> None:
    c = continuous_worker
    with cf.ThreadPoolExecutor(2) as pool:
        long = pool.submit(complete, c.url, 400)  # >= 4 s
        c.wait_for("long request running", lambda: len(running(c)) == 1)
        short = complete(c.url, 4, prompt="short")
        long_t = long.result().json()["timings"]
    short_t = short.json()["timings"]
    assert short_t["worker_id"] == long_t["worker_id"] == "w0"
    assert short_t["queue_delay_s"] < 0.5  # it took a free slot at once
    assert short_t["finish"] < long_t["finish"]
    assert short_t["jct_s"] < 0.2 * long_t["jct_s"]
    health = c.workers()[0]
    assert health["batching"] == "continuous" and health["max_batch"] == 4


@pytest.fixture(scope="module", params=["fcfs", "ect"])
def fast_and_slow(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A router with the given policy, a fast worker (10 ms/step) and a slow one (200 ms/step)."""
    c = Cluster(tmp_path_factory.mktemp(request.param))
    try:
        c.router("--policy", request.param)
        c.worker("fast", "--step-delay", "0.01", "--max-batch", "1", "--max-len", "256", kind="native")  # one slot each
        c.worker("slow", "--step-delay", "0.2", "--max-batch", "1", "--max-len", "256", kind="cpu")
        c.wait_workers({"fast", "slow"})
        yield request.param, c
    finally:
        c.stop()


def test_policy_decides_between_waiting_for_fast_and_taking_slow(fast_and_slow) -> None:
    policy, c = fast_and_slow
    client = openai_client(c.url)
    with cf.ThreadPoolExecutor(2) as pool:  # warm-up: one request on each worker teaches the estimates
        list(pool.map(lambda _: complete(c.url, 5), range(2)))
    c.wait_for("estimates for both workers",
                lambda: {"fast", "slow"} <= set(c.health()["service_estimates"]) and not running(c))
    with cf.ThreadPoolExecutor(2) as pool:
        long = pool.submit(client.completions.create, model=TINY, prompt="long", max_tokens=100, temperature=0,
                           extra_body={"ignore_eos": True})
        c.wait_for("long request running", lambda: len(running(c)) == 1)
        busy = [w["id"] for w in c.workers() if w["running"]][0]
        short = client.completions.create(model=TINY, prompt="short", max_tokens=20, temperature=0,
                                          extra_body={"ignore_eos": True})
        long_t = long.result().model_extra["timings"]
    short_t = short.model_extra["timings"]
    assert long_t["worker_id"] == busy
    if policy == "fcfs":  # the shared FIFO never waits while a worker is idle
        assert short_t["worker_id"] != busy
    else:  # ECT: 20 steps on the slow worker (~4 s) end later than waiting for the fast one (~1.2 s)
        assert busy == "fast"
        assert short_t["worker_id"] == "fast"
        assert short_t["dispatch"] >= long_t["finish"]  # it waited for the fast worker to finish
