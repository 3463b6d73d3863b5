"""Metric definitions (vLLM bench serve) and caserve timing parsing."""

from __future__ import annotations

import pytest

from caserve.bench.loadgen import parse_server_timings
from caserve.bench.metrics import MetricsError, RequestRecord, ServerTimings, compute_metrics, parse_slos, reduction_pct


def rec(i, ttft, latency, out, itl, prompt=10, ok=True, server=None):
    return RequestRecord(index=i, scheduled=0.0, success=ok, ttft=ttft, latency=latency, output_tokens=out, itl=itl,
                         prompt_tokens=prompt, server=server)


def test_vllm_definitions():
    recs = [
        rec(0, 0.1, 0.5, 5, [0.1, 0.1, 0.1, 0.1]),  # tpot = 0.4/4 = 0.1
        rec(1, 0.2, 0.2, 1, []),  # one token: no TPOT sample, TPOT 0 for goodput
        rec(2, 0.3, 0.9, 4, [0.2, 0.2, 0.2]),  # tpot = 0.6/3 = 0.2
        rec(3, 0, 0, 0, [], ok=False),
    ]
    m = compute_metrics(recs, 2.0, percentiles=[50], slos={"ttft": 250, "tpot": 150})
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_output_tokens"] == 10 and m["total_input_tokens"] == 30
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(5.0)
    assert m["total_token_throughput"] == pytest.approx(20.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["tpot_ms"]["mean"] == pytest.approx(150.0) and m["tpot_ms"]["count"] == 2
    assert m["itl_ms"]["count"] == 7 and m["itl_ms"]["mean"] == pytest.approx(1000 * 1.0 / 7)
    assert m["e2el_ms"]["median"] == pytest.approx(500.0)
    # good: req0 (ttft 100, tpot 100), req1 (ttft 200, tpot 0); req2 fails ttft and tpot
    assert m["request_goodput"] == pytest.approx(1.0)
    assert "jct_ms" not in m and m["server_timings"] == 0


def test_server_side_metrics():
    s1 = ServerTimings(arrival=10.0, dispatch=10.5, finish=11.0, worker_kind="native")
    s2 = ServerTimings(arrival=10.0, dispatch=10.0, finish=12.0, worker_kind="assisted")
    m = compute_metrics([rec(0, 0.1, 1.0, 2, [0.1], server=s1), rec(1, 0.1, 2.0, 2, [0.1], server=s2)], 1.0)
    assert m["queue_delay_ms"]["mean"] == pytest.approx(250.0)
    assert m["jct_ms"]["mean"] == pytest.approx(1500.0)
    assert m["service_ms_by_kind"]["native"]["mean"] == pytest.approx(500.0)
    assert m["service_ms_by_kind"]["assisted"]["mean"] == pytest.approx(2000.0)


def test_record_json_roundtrip():
    r = rec(0, 0.1, 1.0, 2, [0.1], server=ServerTimings(1.0, 2.0, 3.0, worker_id="w0"))
    d = r.to_json()
    assert d["server"]["queue_delay"] == 1.0 and d["server"]["jct"] == 2.0
    assert RequestRecord.from_json(d) == r


def test_parse_slos():
    assert parse_slos(["ttft:500", "e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["ttft"], ["foo:1"], ["tpot:x"], ["tpot:-1"]):
        with pytest.raises(MetricsError):
            parse_slos(bad)


def test_parse_server_timings_variants():
    body = {"usage": {"caserve": {"arrival": 1, "dispatch": 2, "finish": 4, "worker_id": 3, "worker_kind": "native"}}}
    t = parse_server_timings(body)
    assert (t.queue_delay, t.jct, t.worker_id) == (1.0, 3.0, "3")
    t2 = parse_server_timings({"timings": {"arrival_time": 1.0, "dispatch_time": 1.5, "finish_time": 2.0}})
    assert t2.jct == 1.0
    hdr = parse_server_timings(None, {"X-Caserve-Arrival": "5", "X-Caserve-Dispatch": "6", "X-Caserve-Finish": "8"})
    assert hdr.queue_delay == 1.0
    # caserve serve: top-level "timings" in the last chunk, durations in headers of non-streamed responses
    srv = {"timings": {"arrival": 100.0, "arrival_unix": 1.7e9, "dispatch": 100.25, "last_dispatch": 100.25,
                       "first_token": 100.5, "finish": 101.0, "queue_delay_s": 0.25, "jct_s": 1.0,
                       "worker_id": "w1", "worker_kind": "assisted"}}
    t3 = parse_server_timings(srv)
    assert (t3.queue_delay, t3.jct, t3.worker_kind, t3.first_token) == (0.25, 1.0, "assisted", 100.5)
    t4 = parse_server_timings(None, {"x-caserve-queue-delay-s": "0.5", "x-caserve-jct-s": "2.0", "x-caserve-worker-kind": "native"})
    assert (t4.queue_delay, t4.jct, t4.service, t4.worker_kind) == (0.5, 2.0, 1.5, "native")
    assert parse_server_timings({"usage": {"prompt_tokens": 3}}) is None
    assert parse_server_timings({"usage": {"caserve": {"arrival": "x", "dispatch": 1, "finish": 2}}}) is None


def test_reduction():
    assert reduction_pct(2.0, 0.5) == 75.0 and reduction_pct(1.0, 2.0) == -100.0 and reduction_pct(0.0, 1.0) == 0.0
