"""Serving: an OpenAI-compatible router dispatching to GPU-native, CPU-assisted and CPU workers.

Router process (``caserve serve``):

* :mod:`~caserve.serving.api`        public HTTP routes (``/v1/...``, ``/health``, ``/metrics``)
* :mod:`~caserve.serving.schemas`    request models and response builders of those routes
* :mod:`~caserve.serving.router`     one queue per model, worker sessions, requeueing, timings
* :mod:`~caserve.serving.policies`   dispatch policies (FCFS, ECT) and the service-time model
* :mod:`~caserve.serving.worker_api` the router side of the router <-> worker protocol
* :mod:`~caserve.serving.jobs`, :mod:`~caserve.serving.metrics`, :mod:`~caserve.serving.errors`
* :mod:`~caserve.serving.launch`     the process layout of ``caserve serve``

Worker process (``caserve worker``):

* :mod:`~caserve.serving.worker`     device choice per kind, registration, reconnection
* :mod:`~caserve.serving.engine`     batched generation / embeddings / classification
* :mod:`~caserve.serving.sampling`   per-row sampling and streaming text deltas
"""
