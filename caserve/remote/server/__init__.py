"""What runs on the GPU node, from the socket inwards:

- :mod:`.listener`: accept loops, connection limits and deadlines, TLS, ``serve_forever``;
- :mod:`.connection`: one client's handshake and its SUBMIT frames;
- :mod:`.gpu_server`: the server's state (device, tenants, trust groups, tokens, limits, stats);
- :mod:`.executor`: the ``Executor`` interface a connection drives and ``Tenant``, its implementation
  (records, templates, sync requests), with its storages and quota in :mod:`.tenant_memory` and its
  graphs in :mod:`.tenant_graphs`;
- :mod:`.templates` (DefineOp checked and built), :mod:`.metacheck` (a template's meta call),
  :mod:`.opsurface` (the allow and deny lists);
- :mod:`.runner` (eager Run records compiled per template), :mod:`.replay` (graph programs),
  :mod:`.cudagraph` (captured steps as CUDA graphs);
- :mod:`.uploads` (uploads in parts), :mod:`.blobs` (a trust group's shared weights), :mod:`.errors` (a
  tenant's typed errors).

Imports :mod:`caserve.remote.wire`, never the client."""

from caserve.remote.server.gpu_server import GPUServer
from caserve.remote.server.listener import Listener, serve_forever

__all__ = ["GPUServer", "Listener", "serve_forever"]
