"""Prometheus metrics of one router (own registry, so several routers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the API)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("caserve_queue_length", "Jobs waiting in the model's queue", ["model"], registry=r)
        self.workers = Gauge("caserve_workers", "Registered workers", ["model", "kind"], registry=r)
        self.queue_delay = Histogram(
            "caserve_queue_delay_seconds", "Arrival to first dispatch (router clock)", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "caserve_ttft_seconds", "Arrival to first token (router clock)", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.jct = Histogram(
            "caserve_jct_seconds", "Job completion time: arrival to finish (router clock)", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter(
            "caserve_requests", "Finished requests by outcome", ["model", "outcome"], registry=r)
        self.requeues = Counter("caserve_requeues", "Jobs requeued after losing their worker", ["model"], registry=r)
        self.rejected = Counter("caserve_rejected", "Requests refused by admission control (429)", ["model"], registry=r)
        self.busy_seconds = Counter(
            "caserve_worker_busy_seconds", "Seconds a worker spent running batches", ["worker", "kind"], registry=r)
        self.tokens = Counter(
            "caserve_generated_tokens", "Generated tokens", ["model", "worker", "kind"], registry=r)
        self.prefill_tokens = Counter(
            "caserve_prefill_tokens", "Prompt tokens prefilled by workers' engines (the n choices of a request "
            "that run together count once)", ["worker", "kind"], registry=r)
        self.tokens_per_second = Gauge(
            "caserve_worker_tokens_per_second", "Generated tokens per second over the worker's last batch",
            ["worker", "kind"], registry=r)
        self.batch_size = Histogram(
            "caserve_batch_size", "Jobs per dispatched batch", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
