"""The open-loop load generator against a small in-process OpenAI-compatible server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bench_helpers import serve_app  # noqa: F401 - fixture
from caserve.bench.datasets import BenchRequest, synthetic
from caserve.bench.loadgen import LoadGenConfig, run_load_sync, server_info
from caserve.bench.refserver import SleepWork, build_app
from caserve.bench.run import WorkloadSpec, bench_serve, load_result, save_result


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_metrics(serve_app, endpoint):  # noqa: F811
    url = serve_app(build_app(SleepWork(prefill_ms=20, per_token_ms=10), native=2))
    reqs = synthetic(6, output_len=5, spread=0.0)
    recs, dur = run_load_sync(reqs, np.linspace(0, 0.2, 6), LoadGenConfig(url=url, endpoint=endpoint, progress=False))
    assert all(r.success for r in recs), [r.error for r in recs]
    for r in recs:
        assert r.output_tokens == 5 and len(r.itl) == 4
        assert r.ttft >= 0.019 and r.latency >= r.ttft + 4 * 0.009
        assert r.server is not None and r.server.worker_kind == "native"
        assert r.server.service >= 0.02 + 4 * 0.01 - 1e-3
    assert dur >= 0.2


def test_open_loop_sends_on_schedule(serve_app):  # noqa: F811
    # One worker, 0.3 s per request, a request every 0.05 s: a closed loop would send the 2nd at >= 0.3 s.
    url = serve_app(build_app(SleepWork(prefill_ms=300, per_token_ms=0), native=1))
    offsets = np.array([0.0, 0.05, 0.1, 0.15])
    recs, _ = run_load_sync(synthetic(4, output_len=1), offsets, LoadGenConfig(url=url, progress=False))
    starts = np.array([r.start for r in recs])
    assert np.all(starts < offsets + 0.1)
    q = [r.server.queue_delay for r in recs]
    assert q[0] < 0.05 and q[3] > 0.6  # the queue built up on the server, not in the client


def test_embeddings_and_failures(serve_app):  # noqa: F811
    url = serve_app(build_app(SleepWork(prefill_ms=1), native=1))
    cls = [BenchRequest("a fine film", 3, 0, "classify", 1)]
    (r,), _ = run_load_sync(cls, np.zeros(1), LoadGenConfig(url=url, progress=False))
    assert r.success and r.server is not None and r.prompt_tokens == 3
    bad = [BenchRequest("x", 1, 99999)]  # server rejects max_tokens > 4096
    (r,), _ = run_load_sync(bad, np.zeros(1), LoadGenConfig(url=url, progress=False))
    assert not r.success and "HTTP 400" in r.error
    (r,), _ = run_load_sync(cls, np.zeros(1), LoadGenConfig(url="http://127.0.0.1:9", progress=False, timeout_s=2))
    assert not r.success and r.error


def test_bench_serve_document(serve_app, tmp_path):  # noqa: F811
    url = serve_app(build_app(SleepWork(prefill_ms=2, per_token_ms=1), native=1))
    assert server_info(url)["id"] == "sleep-model"
    doc = bench_serve(url, WorkloadSpec(dataset="sharegpt", num_requests=8, rate=50.0, output_len=4),
                      slos={"ttft": 10000}, progress=False, label="t")
    m = doc["metrics"]
    assert m["completed"] == 8 and m["total_output_tokens"] == 32 and m["request_goodput"] == m["request_throughput"]
    assert m["jct_ms"]["count"] == 8 and doc["meta"]["random_weights"] is False and "CPU" in doc["meta"]["hardware"]
    path = save_result(doc, tmp_path / "r.json")
    assert load_result(path)["metrics"]["completed"] == 8


def test_error_chunk_mid_stream_fails_the_request(serve_app):  # noqa: F811
    class Boom(SleepWork):
        def generate(self, prompt, max_tokens, emit, kind):
            emit(" one")
            raise RuntimeError("device lost")

    url = serve_app(build_app(Boom(prefill_ms=1), native=1))
    (r,), _ = run_load_sync(synthetic(1, output_len=4), np.zeros(1), LoadGenConfig(url=url, progress=False))
    assert not r.success and "device lost" in r.error


def test_timeout_is_a_silence_not_a_total(serve_app):  # noqa: F811
    """``timeout_s`` bounds a wait for the next bytes, not a whole request: a stream that keeps sending
    for longer than it succeeds (a long queue on an overloaded server is a measurement), a server that
    says nothing for longer fails the request."""
    url = serve_app(build_app(SleepWork(prefill_ms=10, per_token_ms=250), native=1))
    (r,), _ = run_load_sync(synthetic(1, output_len=6), np.zeros(1), LoadGenConfig(url=url, progress=False, timeout_s=0.8))
    assert r.success and r.latency > 1.2, r.error  # 5 gaps of 0.25 s, each shorter than the timeout
    url = serve_app(build_app(SleepWork(prefill_ms=1500, per_token_ms=0), native=1))
    (r,), _ = run_load_sync(synthetic(1, output_len=2), np.zeros(1), LoadGenConfig(url=url, progress=False, timeout_s=0.8))
    assert not r.success and "Timeout" in r.error
    time.sleep(1.0)  # the server finishes the request the client gave up on before the fixture stops it
