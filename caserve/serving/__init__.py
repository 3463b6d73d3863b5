"""Serving: an OpenAI-compatible router dispatching to GPU-native, CPU-assisted and CPU workers.

Both processes import :mod:`~caserve.serving.messages` (every router <-> worker message, msgspec) and
:mod:`~caserve.serving.errors`, and never each other's package.

Router process (``caserve serve``):

* :mod:`~caserve.serving.router.api`        public HTTP routes (``/v1/...``, ``/health``, ``/metrics``)
* :mod:`~caserve.serving.router.schemas`    request models and response builders of those routes
* :mod:`~caserve.serving.router.router`     one queue per model, worker sessions, requeueing, timings
* :mod:`~caserve.serving.router.policies`   dispatch policies (FCFS, ECT) and the service-time model
* :mod:`~caserve.serving.router.worker_api` the router side of the router <-> worker protocol
* :mod:`~caserve.serving.router.jobs`, :mod:`~caserve.serving.router.metrics`, :mod:`~caserve.serving.errors`
* :mod:`~caserve.serving.launch`     the process layout of ``caserve serve``

Worker process (``caserve worker``):

* :mod:`~caserve.serving.worker.worker`     device choice per kind, registration, reconnection
* :mod:`~caserve.serving.worker.engine`     batched generation / embeddings / classification
* :mod:`~caserve.serving.worker.sampling`   per-row sampling and streaming text deltas
"""
