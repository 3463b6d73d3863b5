"""caserve: CPU-assisted language-model serving.

Three layers, and a deployment of them:

* :mod:`caserve.remote`  - the remote GPU runtime: a ``torch.device`` on a GPU-less node whose ATen ops
  run on a shared GPU server.
* :mod:`caserve.serving` - router, dispatch policies, workers and the OpenAI-compatible HTTP API.
* :mod:`caserve.bench`   - model zoo, datasets, arrivals, load generator, metrics, plots, simulator.
* :mod:`caserve.cluster` - cluster mode on Ray: GPU servers, router and autoscaled workers as actors.
"""

__version__ = "0.1.0"
