"""Evaluation: workloads, load generation, metrics, plots and a cluster simulator (see docs/bench.md).

Pipeline: ``datasets`` + ``arrivals`` -> ``loadgen`` (against any OpenAI-compatible server) -> ``metrics``
-> result JSON (``run``) -> ``compare`` / ``matrix`` (server subprocesses per configuration) -> ``plots``;
``sim`` projects measured service times to large clusters. ``refserver`` is a minimal FIFO server used to
test and validate the tools themselves; ``remote_overhead`` measures the remote runtime per token. ``cli`` holds
the ``caserve bench ...`` sub-commands and ``caserve sim``.
"""
