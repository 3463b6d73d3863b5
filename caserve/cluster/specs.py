"""How each actor of a deployment is made: its constructor arguments and Ray options, from the cluster
config (:class:`ActorSpecs`), and the controller's record of one actor (:class:`Managed`).

A spec is ``(args, options)``: ``ray.remote(cls).options(**options).remote(*args)`` makes the actor. The
same specs serve the controller creating an actor, re-creating a dead one and adopting a running one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from caserve.cluster import names
from caserve.cluster.config import ClusterConfig

Spec = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(eq=False)
class Managed:
    """One actor the controller owns."""

    name: str
    role: str  # gpu-server | router | native | assisted
    handle: Any
    args: tuple[Any, ...]
    options: dict[str, Any]
    gpu_index: Optional[int] = None
    state: str = "starting"  # starting | running | draining | unreachable
    info: dict[str, Any] = field(default_factory=dict)
    recreated: int = 0
    created: float = field(default_factory=time.monotonic)


class ActorSpecs:
    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg

    def options(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """Named (``<cluster>-<name>``) and detached: a restarted controller finds and adopts them."""
        return {"max_restarts": -1, "max_task_retries": 0, "name": names.full_name(self.cfg.name, name),
                "namespace": names.NAMESPACE, "lifetime": "detached", **options}

    def gpu_server(self, i: int) -> Spec:
        resources = {self.cfg.resources.gpu_node: 0.001} if self.cfg.resources.gpu_node else {}
        return (self.cfg, i), {"num_gpus": 1, "num_cpus": self.cfg.gpu_server.num_cpus, "resources": resources,
                               **_selector(self.cfg.resources.gpu_node_labels)}

    def router(self) -> Spec:
        r = self.cfg.router
        return (self.cfg,), {"num_cpus": r.num_cpus, "resources": {r.resource: 0.001} if r.resource else {}}

    def assisted(self, name: str, router_url: str, gpu_address: str) -> Spec:
        resources = {self.cfg.resources.cpu_node: 1} if self.cfg.resources.cpu_node else {}
        return ((self.cfg, name, "assisted", router_url, gpu_address, None),
                {"num_cpus": self.cfg.assisted.cpus_per_worker, "resources": resources,
                 **_selector(self.cfg.resources.cpu_node_labels)})

    def native(self, name: str, router_url: str, server: Managed) -> Spec:
        """Beside ``server`` as it is now: its node (hard affinity) and its GPU ids."""
        strategy = NodeAffinitySchedulingStrategy(node_id=server.info["node_id"], soft=False)
        cuda = ",".join(server.info.get("gpu_ids", []))
        return ((self.cfg, name, "native", router_url, None, cuda),
                {"num_cpus": self.cfg.resources.native_num_cpus, "scheduling_strategy": strategy})


def _selector(labels: dict[str, str]) -> dict[str, Any]:
    """Ray's ``label_selector`` option, only when labels are configured (older Ray has no such option)."""
    return {"label_selector": dict(labels)} if labels else {}
