"""A restarted controller takes over the deployment its predecessor left running.

Every actor the controller creates is detached and named (:mod:`caserve.cluster.names`), so it survives
the controller. When Ray restarts the controller (``max_restarts=-1``) the new one calls :func:`adopt`:
it lists those names and rebuilds the bookkeeping from each actor's own ``info()`` (the GPU server a
worker uses, the node a GPU server is on) as an :class:`Adopted` value, which the controller installs
before resuming the drains the router still shows and going on controlling. Serving never stops: no
router, GPU server or worker is restarted by a controller restart.

Adoption knows the controller only through what it is handed (the specs and a refresh callable); it
imports nothing of it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

import ray

from caserve.cluster import names
from caserve.cluster.specs import ActorSpecs, Managed

logger = logging.getLogger(__name__)

Refresh = Callable[[Managed], Awaitable[None]]  # reads an actor's info() into Managed.info and .state


@dataclass
class Adopted:
    """What a restarted controller takes over."""

    gpu: list[Managed] = field(default_factory=list)  # by GPU index
    router: Optional[Managed] = None
    workers: dict[str, Managed] = field(default_factory=dict)
    next_assisted: int = 0  # assisted worker numbers are not reused


def deployed_names(cluster: str) -> list[str]:
    """Short names of deployment ``cluster``'s live named actors."""
    return names.ours(cluster, ray.util.list_named_actors(all_namespaces=True))


async def adopt(cluster: str, specs: ActorSpecs, refresh: Refresh) -> Adopted:
    """Find deployment ``cluster``'s actors and rebuild how each was made (its spec), so that one that
    dies later can be made again. A worker whose GPU server or router is unknown keeps empty args."""
    handles = {n: ray.get_actor(names.full_name(cluster, n), namespace=names.NAMESPACE)
               for n in deployed_names(cluster)}
    parsed = {n: names.parse(n) for n in handles}
    out = Adopted()
    for name, handle in handles.items():
        m = parsed[name]
        assert m is not None
        if m.role == "gpu-server":
            i = int(m.gpu_index or 0)
            args, options = specs.gpu_server(i)
            out.gpu.append(Managed(name, "gpu-server", handle, args, specs.options(name, options), i))
        elif m.role == "router":
            args, options = specs.router()
            out.router = Managed(name, "router", handle, args, specs.options(name, options))
    out.gpu.sort(key=lambda g: g.gpu_index or 0)
    await asyncio.gather(*(refresh(m) for m in out.gpu + ([out.router] if out.router else [])))
    router_url = out.router.info.get("url") if out.router and out.router.info else None
    by_address = {g.info.get("address"): g for g in out.gpu if g.info}
    for name, handle in handles.items():
        m = parsed[name]
        assert m is not None
        if m.role == "native":
            server = next((g for g in out.gpu if g.gpu_index == m.gpu_index), None)
            w = Managed(name, "native", handle, (), {}, server.gpu_index if server else None)
            if server is not None and server.info and router_url:
                args, options = specs.native(name, router_url, server)
                w.args, w.options = args, specs.options(name, options)
            out.workers[name] = w
        elif m.role == "assisted":
            out.next_assisted = max(out.next_assisted, int(m.number or 0) + 1)
            w = Managed(name, "assisted", handle, (), {})
            await refresh(w)
            server = by_address.get(w.info.get("gpu_server"))
            if server is not None and router_url:
                w.gpu_index = server.gpu_index
                args, options = specs.assisted(name, router_url, server.info["address"])
                w.args, w.options = args, specs.options(name, options)
            out.workers[name] = w
    return out
