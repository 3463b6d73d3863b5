"""Driver side of ``caserve cluster up|down|status``: connect to Ray, start or find the controller.

The controller is a detached named actor (``<name>-controller`` in Ray namespace ``caserve``), so
``status`` and ``down`` work from any driver connected to the same Ray cluster, and the deployment
outlives the ``up`` command when it joined an existing Ray cluster (``--address``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Optional

import ray

from caserve.cluster.config import ClusterConfig
from caserve.cluster.adopt import deployed_names
from caserve.cluster.controller import ClusterController
from caserve.cluster.errors import AlreadyRunning, NotRunning
from caserve.cluster.names import NAMESPACE, controller_name, full_name

logger = logging.getLogger(__name__)


def runtime_env() -> dict[str, Any]:
    """Forward this driver's PYTHONPATH to every actor (a source checkout); an installed caserve needs nothing."""
    path = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": path}} if path else {}


def connect(address: Optional[str] = None, **local: Any) -> bool:
    """Join the Ray cluster at ``address`` (or start a local one with ``local`` resources). Returns
    whether this call started/joined Ray (and so should shut it down); an already connected driver
    (tests) is used as it is."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=runtime_env(), log_to_driver=False)
    else:
        ray.init(namespace=NAMESPACE, runtime_env=runtime_env(), log_to_driver=False, include_dashboard=False,
                 **local)
    return True


def local_resources(cfg: ClusterConfig, gpus: Optional[int] = None) -> dict[str, Any]:
    """``ray.init`` arguments for a one-host Ray instance: this host advertises the config's custom
    resources (it is both the GPU node and the CPU node), ``gpus`` GPUs when given, and at least as many
    logical CPUs as the whole layout reserves (a small host is oversubscribed rather than left pending)."""
    n_gpu = cfg.gpu_servers if cfg.gpu_servers is not None else (gpus or 1)
    reserved = (cfg.router.num_cpus + cfg.assisted.max * cfg.assisted.cpus_per_worker
                + n_gpu * (cfg.gpu_server.num_cpus + cfg.native_workers_per_gpu_server * cfg.resources.native_num_cpus))
    cpus = max(os.cpu_count() or 1, math.ceil(reserved))
    resources: dict[str, float] = {}
    if cfg.resources.cpu_node:
        resources[cfg.resources.cpu_node] = float(max(cfg.assisted.max, 1))
    if cfg.resources.gpu_node:
        resources[cfg.resources.gpu_node] = float(max(gpus or 1, cfg.gpu_servers or 1))
    if cfg.router.resource:
        resources[cfg.router.resource] = 1.0
    out: dict[str, Any] = {"resources": resources, "num_cpus": cpus}
    if gpus is not None:
        out["num_gpus"] = gpus
    return out


def serve_until_interrupted(name: str, poll_s: float = 5.0) -> None:
    """Keep the driver (and so a local Ray instance) alive until Ctrl-C, then take the cluster down."""
    try:
        while True:
            time.sleep(poll_s)
            find_controller(name)
    except KeyboardInterrupt:
        logger.info("interrupted: taking the cluster down")
    except NotRunning:
        logger.info("cluster '%s' was taken down", name)
        return
    finally:
        try:
            down(name)
        except NotRunning:
            pass
        ray.shutdown()


def find_controller(name: str = "caserve") -> Any:
    try:
        return ray.get_actor(controller_name(name), namespace=NAMESPACE)
    except ValueError:
        raise NotRunning(f"no caserve cluster '{name}' in this Ray cluster (run `caserve cluster up`)") from None


def up(cfg: ClusterConfig) -> dict[str, Any]:
    """Create the controller and wait until the minimum layout serves; returns its status."""
    try:
        find_controller(cfg.name)
    except NotRunning:
        pass
    else:
        raise AlreadyRunning(f"caserve cluster '{cfg.name}' is already up (`caserve cluster down` first)")
    leftovers = deployed_names(cfg.name)
    if leftovers:
        raise AlreadyRunning(f"actors of caserve cluster '{cfg.name}' still exist without a controller "
                             f"({', '.join(leftovers)}): `caserve cluster down --name {cfg.name}` first")
    cfg = cfg.with_secrets()  # resolved once: a restarted controller gets the same token with its arguments
    # Restartable: a restarted controller adopts the (detached) actors of its predecessor.
    controller = ray.remote(ClusterController).options(
        name=controller_name(cfg.name), namespace=NAMESPACE, lifetime="detached", num_cpus=0,
        max_restarts=-1, runtime_env=runtime_env()).remote(cfg)
    try:
        return ray.get(controller.start.remote(), timeout=cfg.ready_timeout_s + 30)
    except BaseException:
        logger.error("cluster did not come up; stopping what was started")
        _stop(controller)
        _kill_leftovers(cfg.name)
        raise


def status(name: str = "caserve") -> dict[str, Any]:
    return ray.get(find_controller(name).status.remote(), timeout=60)


def down(name: str = "caserve") -> None:
    """Drain and stop every worker, then the router, the GPU servers and the controller; then kill
    whatever actor of the cluster is left (a controller that was killed for good leaves its actors)."""
    try:
        controller = find_controller(name)
    except NotRunning:
        if not deployed_names(name):
            raise
        controller = None
    if controller is not None:
        _stop(controller)
    _kill_leftovers(name)


def _kill_leftovers(name: str) -> None:
    for short in deployed_names(name):
        logger.warning("killing leftover actor %s-%s", name, short)
        try:
            ray.kill(ray.get_actor(full_name(name, short), namespace=NAMESPACE), no_restart=True)
        except ValueError:  # gone meanwhile
            pass


def _stop(controller: Any) -> None:
    try:
        ray.get(controller.shutdown.remote(), timeout=600)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        logger.warning("controller shutdown failed (%s); killing it", exc)
    ray.kill(controller, no_restart=True)


def _bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_status(s: dict[str, Any]) -> str:
    """The human form of :func:`status` (``--json`` prints the dict itself)."""
    lines = [f"caserve cluster '{s['name']}', model {s['model']}", "", "nodes:"]
    for n in s["nodes"]:
        extra = " ".join(f"{k}={v:g}" for k, v in n["custom"].items())
        lines.append(f"  {n['node_id'][:12]} {n['ip']:<15} {'alive' if n['alive'] else 'DEAD':5} "
                     f"cpus={n['cpus']:g} gpus={n['gpus']:g} {extra}")
    r = s["router"]
    lines += ["", f"router: {r.get('url', '-')} ({r.get('state')}, node {str(r.get('node_id', '-'))[:12]}, "
                  f"process restarts {r.get('child_restarts', 0)})", "",
              "GPU servers:"]
    for g in s["gpu_servers"]:
        lines.append(f"  {g['name']:<8} {g.get('address', '-'):<22} {g['state']:<11} device={g.get('device', '-')} "
                     f"gpus={','.join(g.get('gpu_ids', [])) or '-'} tenants={g['tenants']} "
                     f"tenant_bytes={_bytes(g['tenant_bytes'])} stored={_bytes(g['stored_bytes'])} "
                     f"allocated={_bytes(g['device_allocated'])} workers={','.join(g['assisted_workers']) or '-'}")
    for kind, workers in s["workers"].items():
        lines += ["", f"{kind} workers ({len(workers)}):"]
        for w in workers:
            where = f" -> {w['gpu_server']}" if w.get("gpu_server") else ""
            lines.append(f"  {w['name']:<12} {w['state']:<11} registered={w['registered']} busy={w['busy']} "
                         f"running={w['running']} restarts={w.get('child_restarts', 0)}+{w.get('recreated', 0)} "
                         f"node={str(w.get('node_id', '-'))[:12]}{where}")
    q, a = s["queue"], s["autoscale"]
    lines += ["", f"queue: {q['length']} waiting, delay {q['delay_s']:.2f}s (target {q['target_delay_s']:.2f}s)",
              f"autoscale: {a['assisted']} assisted in [{a['min']}, {a['max']}], draining {a['draining'] or '-'}",
              "", "recent events:", *(f"  {e}" for e in s["events"])]
    return "\n".join(lines)
