"""What runs on the GPU node: the listener and connections (:mod:`.listener`), each tenant's executor
(:mod:`.executor`), op templates (:mod:`.templates`), compiled replays (:mod:`.replay`) and the shared
weight store (:mod:`.blobs`). Imports :mod:`caserve.remote.wire`, never the client."""

from caserve.remote.server.gpu_server import GPUServer
from caserve.remote.server.listener import Listener, serve_forever

__all__ = ["GPUServer", "Listener", "serve_forever"]
