"""A restarted controller takes over the deployment its predecessor left running.

Every actor the controller creates is detached and named ``<cluster>-<name>`` in the ``caserve``
namespace, so it survives the controller. When Ray restarts the controller (``max_restarts=-1``) the
new one lists those names, rebuilds its bookkeeping from each actor's own ``info()`` (the GPU server a
worker uses, the node a GPU server is on), resumes the drains the router still shows, and goes on
controlling. Serving never stops: no router, GPU server or worker is restarted by a controller restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import ray

from caserve.cluster import names
from caserve.cluster.controller import deployed_names
from caserve.cluster.specs import Managed
from caserve.cluster.names import NAMESPACE

if TYPE_CHECKING:
    from caserve.cluster.controller import ClusterController

logger = logging.getLogger(__name__)


async def adopt(ctrl: "ClusterController") -> None:
    handles = {n: ray.get_actor(names.full_name(ctrl.cfg.name, n), namespace=NAMESPACE)
               for n in deployed_names(ctrl.cfg.name)}
    parsed = {n: names.parse(n) for n in handles}
    for name, handle in handles.items():
        m = parsed[name]
        assert m is not None
        if m.role == "gpu-server":
            i = int(m.gpu_index or 0)
            args, options = ctrl.specs.gpu_server(i)
            ctrl.gpu.append(Managed(name, "gpu-server", handle, args, ctrl.specs.options(name, options), i))
        elif m.role == "router":
            args, options = ctrl.specs.router()
            ctrl.router = Managed(name, "router", handle, args, ctrl.specs.options(name, options))
    ctrl.gpu.sort(key=lambda g: g.gpu_index or 0)
    await asyncio.gather(*(ctrl._refresh(m) for m in ctrl.gpu + ([ctrl.router] if ctrl.router else [])))
    by_address = {g.info.get("address"): g for g in ctrl.gpu if g.info}
    for name, handle in handles.items():
        m = parsed[name]
        assert m is not None
        if m.role == "native":
            server = next((g for g in ctrl.gpu if g.gpu_index == m.gpu_index), None)
            w = Managed(name, "native", handle, (), {}, server.gpu_index if server else None)
            if server is not None and server.info and ctrl.router and ctrl.router.info:
                args, options = ctrl.specs.native(name, ctrl.router.info["url"], server)
                w.args, w.options = args, ctrl.specs.options(name, options)
            ctrl.workers[name] = w
        elif m.role == "assisted":
            ctrl._next_assisted = max(ctrl._next_assisted, int(m.number or 0) + 1)
            w = Managed(name, "assisted", handle, (), {})
            await ctrl._refresh(w)
            server = by_address.get(w.info.get("gpu_server"))
            if server is not None and ctrl.router and ctrl.router.info:
                w.gpu_index = server.gpu_index
                args, options = ctrl.specs.assisted(name, ctrl.router.info["url"], server.info["address"])
                w.args, w.options = args, ctrl.specs.options(name, options)
            ctrl.workers[name] = w
    await ctrl._observe()
    for w in [w for w in ctrl.workers.values() if _draining(ctrl, w.name)]:
        task = asyncio.create_task(ctrl._drain_and_stop(w))
        ctrl._drains.add(task)
        task.add_done_callback(ctrl._drains.discard)
    ctrl._note(f"controller restarted: adopted {len(ctrl.gpu)} GPU server(s), "
               f"{'a' if ctrl.router else 'no'} router, {len(ctrl.workers)} worker(s)")


def _draining(ctrl: "ClusterController", name: str) -> bool:
    info: dict[str, Any] = ctrl._registered().get(name, {})
    return bool(info.get("draining"))
