"""The remote GPU runtime: a ``torch.device`` on a GPU-less node whose ATen ops run on a GPU server.

    import caserve.remote
    dev = caserve.remote.connect("gpu-node:7070", token="...")
    model.to(dev)
    out = model.generate(**inputs.to(dev))

Layout: :mod:`caserve.remote.wire` (the wire format, its limits, sockets), :mod:`caserve.remote.client`
(what runs on the CPU node), :mod:`caserve.remote.server` (the GPU server) and :mod:`caserve.remote.local`
(the in-process channel, the only module that knows both sides).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.wire.errors import ConnectionLost, HandshakeError, QuotaExceeded, RemoteError, RemoteOpError

__all__ = [
    "connect", "disconnect", "fetch_later", "graph_mode", "stats", "server_stats", "ConnectionLost", "HandshakeError", "QuotaExceeded",
    "RemoteError", "RemoteOpError",
]


def connect(address: str | None = None, token: str | None = None, *, transport: str = "auto",
            server: Any = None, timeout: float = 10.0, tls_ca: str | None = None) -> torch.device:
    """Open a session on a GPU server and return its ``torch.device("caserve", N)``.

    ``address`` is ``host:port``; on the same host the server's Unix socket is used when it exists
    (``transport="tcp"`` forces TCP). ``token`` defaults to ``$CASERVE_TOKEN``. ``tls_ca`` (default
    ``$CASERVE_TLS_CA``): TCP goes over TLS to a server whose certificate chains to that CA file. ``server`` connects to an
    in-process :class:`caserve.remote.server.GPUServer` instead (tests, single-process use).
    """
    from caserve.remote.client import device, session
    from caserve.remote.wire.transport import SocketChannel

    device.install()
    token = token if token is not None else os.environ.get("CASERVE_TOKEN") or None
    if server is not None:
        from caserve.remote.local import LocalChannel  # imports the server: only when one is given

        channel = LocalChannel(server)
    elif address is None:
        raise ValueError("connect() needs a GPU server address host:port (or server=)")
    else:
        channel = SocketChannel.connect(address, transport=transport, timeout=timeout, tls_ca=tls_ca)
    sess = session.register(lambda index: session.Session.open(channel, token, index))
    # The remote generator starts from the local seed, so torch.manual_seed() before connect() counts.
    sess.emit(P.Seed(torch.initial_seed()))
    return sess.device


def graph_mode(model: torch.nn.Module, capture: bool = True) -> torch.nn.Module:
    """Record ``model``'s forward on its caserve device and replay repeats with one message each
    (see :mod:`caserve.remote.client.graph`); with ``capture``, a forward that repeats exactly is replayed
    without running its Python (:mod:`caserve.remote.client.capture`). Returns the model."""
    from caserve.remote.client.graph import enable

    return enable(model, capture)


def fetch_later(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Ask for a caserve tensor's values without waiting: returns a function that waits for them and
    gives a CPU tensor. The GPU server answers after the ops sent before and goes on with later ones, so
    a decode loop can send step t+1 before it reads step t's tokens."""
    from caserve.remote.client.dispatch import fetch_later as later

    return later(tensor)


def disconnect(device: torch.device | str) -> None:
    """Close the device's session; the server frees everything it held."""
    from caserve.remote.client.session import session_of

    session_of(device).close()


def stats(device: torch.device | str) -> dict[str, Any]:
    """Client-side counters of the device's session (ops, frames, bytes, syncs)."""
    from caserve.remote.client.session import session_of

    session = session_of(device)
    graphs = session.graph_cache  # None until graph mode records a forward on this device
    return {**session.stats.snapshot(), "graph_replays": graphs.replays if graphs else 0,
            "step_replays": graphs.step_replays if graphs else 0,
            "graph_fallbacks": graphs.fallbacks if graphs else 0, "graphs": len(graphs.graphs) if graphs else 0}


def server_stats(device: torch.device | str) -> dict[str, Any]:
    """The GPU server's figures as seen from this tenant (one round trip)."""
    from caserve.remote.client.session import session_of

    value, _ = session_of(device).sync(P.Stats())
    return value
