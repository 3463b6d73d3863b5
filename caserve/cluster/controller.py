"""The cluster controller: a detached Ray actor that places, watches and scales everything.

::

    ClusterController (detached, async actor, no resources)
     ├─ GPUServerActor × gpu_servers        1 GPU each (+ resources.gpu_node)
     ├─ WorkerActor native × n per server   same node as its GPU server (node affinity), its GPU ids
     ├─ RouterActor                         caserve serve, no local workers
     └─ WorkerActor assisted × [min, max]   1 of resources.cpu_node each, GPU server by tenant load

Every actor is detached and named, so it outlives the controller; a controller Ray restarted adopts
them (:mod:`caserve.cluster.adopt`).

Every ``control_interval_s`` the controller (1) asks every actor for its info; an actor Ray reports as
dead for good is created again (Ray itself restarts crashed ones: ``max_restarts=-1``); (2) reads the
router's ``/metrics`` and ``/health``; (3) lets :class:`~caserve.cluster.autoscale.Autoscaler` size the
assisted pool. A scale-down drains: ``POST /internal/workers/{id}/drain`` (the router sends it no new
batch), wait until the router shows it running nothing, then stop it, so no request is requeued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Optional

import httpx
import ray

from caserve.cluster.actors import GPUServerActor, RouterActor, WorkerActor, reconstructed
from caserve.cluster.autoscale import Autoscaler, QueueDelayEstimator, parse_router_metrics
from caserve.cluster.config import ClusterConfig
from caserve.cluster import names
from caserve.cluster.adopt import adopt
from caserve.cluster.errors import ClusterError, StartupTimeout
from caserve.cluster.placement import ServerLoad, least_loaded
from caserve.cluster.specs import ActorSpecs, Managed
from caserve.serving.credentials import router_verify
from caserve.serving.messages import WORKER_TOKEN_HEADER

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0
OBSERVE_TIMEOUT_S = 3.0  # an actor still pending placement must not stall the control loop
DRAIN_POLL_S = 0.25


class ClusterController:
    def __init__(self, cfg: ClusterConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
        self.cfg = cfg if cfg.worker_token else cfg.with_secrets()  # `cluster up` resolved them already
        self.specs = ActorSpecs(self.cfg)
        self.gpu: list[Managed] = []
        self.router: Optional[Managed] = None
        self.workers: dict[str, Managed] = {}
        self.estimator = QueueDelayEstimator()
        self.autoscaler = Autoscaler(cfg.assisted)
        self.events: deque[str] = deque(maxlen=50)
        self.health: dict[str, Any] = {}
        self.queue_length = 0
        self._next_assisted = 0
        self._loop: Optional[asyncio.Task[None]] = None
        self._drains: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._full_noted = False
        # The worker token opens drain, and all of /health and /metrics when the router has an API key.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(CALL_TIMEOUT_S, connect=3.0),
                                       headers={WORKER_TOKEN_HEADER: str(self.cfg.worker_token)},
                                       verify=router_verify(self.cfg.router.tls.client_ca))
        if reconstructed():  # Ray restarted this controller: take over what the previous one ran
            self._loop = asyncio.get_running_loop().create_task(self._adopt_then_control())

    # ------------------------------------------------------------------------------------ public

    async def start(self) -> dict[str, Any]:
        """Place the whole layout and wait until it serves: GPU servers up, the router answering,
        ``assisted.min`` assisted and every native worker registered. Then run the control loop."""
        if self._loop is not None:
            return await self.status()
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        await self._place_gpu_servers(deadline)
        self.router = self._create(names.ROUTER, "router", RouterActor, *self.specs.router())
        await self._refresh(self.router, timeout_s=max(1.0, deadline - time.monotonic()))
        if self.router.state != "running":
            raise StartupTimeout(f"the router was not placed/started (free CPUs, "
                                 f"'{self.cfg.router.resource}' resource?)")
        for server in self.gpu:
            for j in range(self.cfg.native_workers_per_gpu_server):
                self._create_native(server, j)
        for _ in range(self.cfg.assisted.min):
            await self._create_assisted()
        await self._wait_ready(deadline)
        self._loop = asyncio.create_task(self._control_forever())
        return await self.status()

    async def status(self) -> dict[str, Any]:
        gpu = []
        for server in self.gpu:
            stats = await self._call(server.handle.stats.remote())
            gpu.append({"name": server.name, "state": server.state, "recreated": server.recreated, **server.info,
                        "assisted_workers": sorted(w.name for w in self._assisted() if w.gpu_index == server.info.get("index")),
                        "tenants": len(stats["tenants"]) if stats else None,
                        "tenant_bytes": stats["tenant_bytes"] if stats else None,
                        "stored_bytes": stats["stored_bytes"] if stats else None,
                        "device_allocated": stats["device_allocated"] if stats else None})
        registered = self._registered()
        workers: dict[str, list[dict[str, Any]]] = {"native": [], "assisted": []}
        for w in self.workers.values():
            reg = registered.get(w.name, {})
            workers[w.role].append({"name": w.name, "state": w.state, "registered": w.name in registered,
                                    "busy": reg.get("busy"), "running": len(reg.get("running", [])),
                                    "recreated": w.recreated, **w.info})
        model = self.health.get("models", {}).get(self.cfg.model, {})
        return {
            "name": self.cfg.name, "model": self.cfg.model, "nodes": _nodes(),
            "router": {"state": self.router.state if self.router else None, **(self.router.info if self.router else {})},
            "gpu_servers": gpu, "workers": workers,
            "queue": {"length": model.get("queue", self.queue_length), "delay_s": round(self.estimator.delay_s, 3),
                      "target_delay_s": self.cfg.assisted.target_queue_delay_s},
            "autoscale": {"min": self.cfg.assisted.min, "max": self.cfg.assisted.max,
                          "assisted": len([w for w in self._assisted() if w.state != "draining"]),
                          "draining": [w.name for w in self._assisted() if w.state == "draining"]},
            "events": list(self.events)[-10:],
        }

    async def shutdown(self) -> None:
        """Drain every worker, then stop workers, router and GPU servers, in that order."""
        self._stopping = True
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        await asyncio.gather(*(self._drain_and_stop(w) for w in list(self.workers.values())), return_exceptions=True)
        await asyncio.gather(*self._drains, return_exceptions=True)
        for m in ([self.router] if self.router else []) + self.gpu:
            await self._stop(m)
        await self._http.aclose()
        self._note("cluster stopped")

    # ------------------------------------------------------------------------------------ placement

    def _create(self, name: str, role: str, cls: type, args: tuple[Any, ...], options: dict[str, Any],
                gpu_index: Optional[int] = None) -> Managed:
        opts = self.specs.options(name, options)
        handle = ray.remote(cls).options(**opts).remote(*args)
        self._note(f"created {name}")
        return Managed(name, role, handle, args, opts, gpu_index)

    async def _place_gpu_servers(self, deadline: float) -> None:
        count = self.cfg.gpu_servers
        if count is None:
            count = int(ray.cluster_resources().get("GPU", 0))
        if count == 0 and (self.cfg.assisted.max or self.cfg.native_workers_per_gpu_server):
            raise ClusterError("no GPU servers: the Ray cluster has no GPUs (set gpu_servers, or add GPU nodes)")
        for i in range(count):
            self.gpu.append(self._create(names.gpu_server(i), "gpu-server", GPUServerActor, *self.specs.gpu_server(i),
                                         gpu_index=i))
        for server in self.gpu:
            await self._refresh(server, timeout_s=max(1.0, deadline - time.monotonic()))
            if server.state == "dead":
                port = self.cfg.gpu_server.base_port + int(server.gpu_index or 0)
                raise StartupTimeout(f"{server.name} died while starting (port {port} in use, or no device? "
                                     f"see the GPUServerActor's Ray log)")
            if server.state != "running":
                raise StartupTimeout(f"{server.name} was not placed/started (enough GPUs and "
                                     f"'{self.cfg.resources.gpu_node}' resources?)")

    def _create_native(self, server: Managed, j: int) -> None:
        name = names.native(int(server.gpu_index or 0), j)
        args, options = self.specs.native(name, self._router_url(), server)
        self.workers[name] = self._create(name, "native", WorkerActor, args, options, gpu_index=server.gpu_index)

    async def _create_assisted(self) -> Managed:
        index = await self._pick_gpu_server()
        server = self.gpu[index]
        name = names.assisted(self._next_assisted)
        self._next_assisted += 1
        w = self._create(name, "assisted", WorkerActor, *self.specs.assisted(name, self._router_url(), server.info["address"]),
                         gpu_index=index)
        self.workers[name] = w
        self._note(f"{name} -> GPU server {index} ({server.info['address']})")
        return w

    async def _pick_gpu_server(self) -> int:
        registered = self._registered()
        loads = []
        for server in self.gpu:
            stats = await self._call(server.handle.stats.remote())
            if stats is None:
                continue
            pending = sum(1 for w in self._assisted() if w.gpu_index == server.gpu_index and w.name not in registered)
            loads.append(ServerLoad(int(server.gpu_index or 0), len(stats["tenants"]), int(stats["stored_bytes"]), pending))
        return least_loaded(loads)

    def _router_url(self) -> str:
        assert self.router is not None and self.router.info, "router must be up before workers"
        return str(self.router.info["url"])

    # ------------------------------------------------------------------------------------ the loop

    async def _wait_ready(self, deadline: float) -> None:
        assert self.router is not None
        while time.monotonic() < deadline:
            await self._observe()
            registered = self._registered()
            want = [w for w in self.workers.values()]
            if self.router.state == "running" and self.health and all(w.name in registered for w in want):
                self._note("ready")
                return
            await asyncio.sleep(0.5)
        missing = [w.name for w in self.workers.values() if w.name not in self._registered()]
        raise StartupTimeout(f"not ready after {self.cfg.ready_timeout_s:.0f}s: router {self.router.state}, "
                             f"unregistered workers {missing}")

    async def _adopt_then_control(self) -> None:
        try:
            await self._adopt()
        except Exception:  # noqa: BLE001 - keep controlling whatever was adopted
            logger.exception("adopting the running deployment failed")
        await self._control_forever()

    async def _adopt(self) -> None:
        """Install what the predecessor left running, then resume the drains the router still shows."""
        adopted = await adopt(self.cfg.name, self.specs, self._refresh)
        self.gpu, self.router, self.workers = adopted.gpu, adopted.router, adopted.workers
        self._next_assisted = max(self._next_assisted, adopted.next_assisted)
        await self._observe()
        registered = self._registered()
        for w in [w for w in self.workers.values() if registered.get(w.name, {}).get("draining")]:
            task = asyncio.create_task(self._drain_and_stop(w))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        self._note(f"controller restarted: adopted {len(self.gpu)} GPU server(s), "
                   f"{'a' if self.router else 'no'} router, {len(self.workers)} worker(s)")

    async def _control_forever(self) -> None:
        while not self._stopping:
            try:
                await self._control_once()
            except Exception:  # noqa: BLE001 - the loop must survive one bad period; the next retries
                logger.exception("control period failed")
            await asyncio.sleep(self.cfg.control_interval_s)

    async def _control_once(self) -> None:
        await self._observe()
        await self._recreate_dead()
        await self._follow_gpu_servers()
        await self._give_up_unplaced()
        sample = await self._sample()
        if sample is None:
            return
        delay = self.estimator.update(sample)
        live = [w for w in self._assisted() if w.state != "draining"]
        registered = self._registered()
        loading = sum(1 for w in live if w.name not in registered)
        decision = self.autoscaler.decide(time.monotonic(), delay, sample.queue_length, len(live), loading)
        if decision.target > len(live):
            add = min(decision.target - len(live), self._free_cpu_slots())
            if add <= 0:
                if not self._full_noted:
                    self._note(f"{decision.reason}, but no free '{self.cfg.resources.cpu_node}' slot: add CPU nodes")
                self._full_noted = True
                return
            self._full_noted = False
            self._note(f"{decision.reason}: {len(live)} -> {len(live) + add} assisted")
            for _ in range(add):
                await self._create_assisted()
        elif decision.target < len(live):
            self._note(f"{decision.reason}: {len(live)} -> {decision.target} assisted")
            for victim in self._victims(live, len(live) - decision.target, registered):
                task = asyncio.create_task(self._drain_and_stop(victim))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)

    async def _give_up_unplaced(self) -> None:
        """An assisted worker Ray could not place (labels, a race for the last slot) would count as
        loading for ever and hold the autoscaler: stop it after ``placement_timeout_s``."""
        now = time.monotonic()
        for w in self._assisted():
            if w.state == "starting" and now - w.created > self.cfg.assisted.placement_timeout_s:
                self._note(f"{w.name} not placed after {self.cfg.assisted.placement_timeout_s:.0f}s; giving up")
                await self._stop(w)
                self.workers.pop(w.name, None)

    def _free_cpu_slots(self) -> int:
        """Assisted workers Ray could place now (a worker that cannot be placed would stay pending,
        look like one still loading, and hold the autoscaler)."""
        free = ray.available_resources()
        slots = free.get("CPU", 0.0) // self.cfg.assisted.cpus_per_worker if self.cfg.assisted.cpus_per_worker else 1e9
        if self.cfg.resources.cpu_node:
            slots = min(slots, free.get(self.cfg.resources.cpu_node, 0.0))
        return int(slots)

    def _victims(self, live: list[Managed], n: int, registered: dict[str, Any]) -> list[Managed]:
        """Idle workers first, then the newest (they have served least and warmed up least)."""
        return sorted(live, key=lambda w: (bool(registered.get(w.name, {}).get("busy")), -w.created))[:n]

    async def _observe(self) -> None:
        actors = self.gpu + ([self.router] if self.router else []) + list(self.workers.values())
        await asyncio.gather(*(self._refresh(m, OBSERVE_TIMEOUT_S) for m in actors))
        if self.router is not None and self.router.state == "running":
            try:
                resp = await self._http.get(f"{self._router_url()}/health")
                resp.raise_for_status()
                self.health = resp.json()
            except httpx.HTTPError as exc:
                logger.info("router /health unavailable: %s", exc)
                self.health = {}

    async def _sample(self):  # noqa: ANN202
        try:
            resp = await self._http.get(f"{self._router_url()}/metrics")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            logger.info("router /metrics unavailable: %s", exc)
            return None
        sample = parse_router_metrics(resp.text, self.cfg.model, time.monotonic())
        self.queue_length = sample.queue_length
        return sample

    async def _refresh(self, m: Managed, timeout_s: float = CALL_TIMEOUT_S) -> None:
        if m.state == "draining":
            return
        try:
            m.info = await asyncio.wait_for(m.handle.info.remote(), timeout_s)
            m.state = "running"
        except ray.exceptions.ActorDiedError:
            m.state = "dead"
        except asyncio.TimeoutError:
            if m.state != "starting":  # a new actor may wait for placement or a slow __init__
                logger.info("%s did not answer in %.0fs", m.name, timeout_s)
                m.state = "unreachable"
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            logger.info("%s unreachable (%s); Ray restarts it", m.name, type(exc).__name__)
            m.state = "unreachable"

    async def _recreate_dead(self) -> None:
        """Ray restarts crashed actors by itself; one it gave up on (or that was killed for good) is made anew."""
        for m in self.gpu + ([self.router] if self.router else []) + list(self.workers.values()):
            if m.state != "dead" or self._stopping:
                continue
            if not m.args:  # adopted without knowing how it was made (its info was unavailable)
                self._note(f"{m.name} is dead and cannot be made again; forgetting it")
                self.workers.pop(m.name, None)
                continue
            self._note(f"{m.name} is dead; creating it again")
            if m.role == "native" and m.gpu_index is not None and self.gpu[m.gpu_index].info:
                args, options = self.specs.native(m.name, self._router_url(), self.gpu[m.gpu_index])
                m.args, m.options = args, {**m.options, **options}
            m.handle = ray.remote(type_of(m)).options(**m.options).remote(*m.args)
            m.state, m.recreated, m.created = "starting", m.recreated + 1, time.monotonic()

    async def _follow_gpu_servers(self) -> None:
        """A GPU server Ray restarted elsewhere (its node was lost) has a new address or GPU ids: native
        workers are made anew beside it, assisted workers still dialing the old address are replaced
        (they serve nothing while their server is unreachable, so there is nothing to drain)."""
        for w in list(self.workers.values()):
            server = self.gpu[w.gpu_index] if w.gpu_index is not None else None
            if server is None or server.state != "running" or w.state in ("draining", "dead") or not w.args:
                continue
            if w.role == "native":
                args, options = self.specs.native(w.name, self._router_url(), server)
                stale = (w.args[5] != args[5]
                         or w.options["scheduling_strategy"].node_id != options["scheduling_strategy"].node_id)
            else:
                stale = w.args[4] != server.info["address"]
            if not stale:
                continue
            self._note(f"{w.name}: {server.name} moved to {server.info['address']}; replacing it")
            await self._stop(w)
            self.workers.pop(w.name, None)
            if w.role == "native":
                parsed = names.parse(w.name)
                self._create_native(server, parsed.number if parsed and parsed.number is not None else 0)
            else:
                await self._create_assisted()

    def _registered(self) -> dict[str, dict[str, Any]]:
        """Workers the router knows, by id (from the last ``/health``)."""
        model = self.health.get("models", {}).get(self.cfg.model, {})
        return {w["id"]: w for w in model.get("workers", [])}

    def _assisted(self) -> list[Managed]:
        return [w for w in self.workers.values() if w.role == "assisted"]

    # ------------------------------------------------------------------------------------ draining

    async def _drain_and_stop(self, w: Managed) -> None:
        """No new batches for ``w``; wait until it runs nothing (or is gone); then stop it for good."""
        w.state = "draining"
        deadline = time.monotonic() + self.cfg.assisted.drain_timeout_s
        url = f"{self._router_url()}/internal/workers/{w.name}/drain" if self.router and self.router.info else None
        while url is not None and time.monotonic() < deadline:
            try:
                resp = await self._http.post(url)
                resp.raise_for_status()
                if resp.json()["running"] == 0:
                    break
            except httpx.HTTPError as exc:
                logger.info("drain %s: router unavailable (%s)", w.name, exc)
            await asyncio.sleep(DRAIN_POLL_S)
        else:
            if url is not None:
                logger.warning("%s still running after %.0fs of draining; stopping it (the router requeues)",
                               w.name, self.cfg.assisted.drain_timeout_s)
        await self._stop(w)
        self.workers.pop(w.name, None)
        self._note(f"{w.name} drained and stopped")

    async def _stop(self, m: Managed) -> None:
        if m.state not in ("running", "draining"):  # never placed, or gone: nothing to stop gracefully
            ray.kill(m.handle, no_restart=True)
            return
        try:
            await asyncio.wait_for(m.handle.stop.remote(), CALL_TIMEOUT_S * 2)
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
            logger.info("%s did not stop cleanly (%s); killing it", m.name, type(exc).__name__)
        ray.kill(m.handle, no_restart=True)

    async def _call(self, ref: Any) -> Any:
        """An actor call's result, or None when the actor is restarting, dead or slow."""
        try:
            return await asyncio.wait_for(ref, CALL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, asyncio.TimeoutError) as exc:
            logger.info("actor call failed: %s", type(exc).__name__)
            return None

    def _note(self, text: str) -> None:
        logger.info("%s", text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")


def type_of(m: Managed) -> type:
    return {"gpu-server": GPUServerActor, "router": RouterActor}.get(m.role, WorkerActor)


def _nodes() -> list[dict[str, Any]]:
    out = []
    for node in ray.nodes():
        res = node.get("Resources", {})
        out.append({"node_id": node["NodeID"], "ip": node.get("NodeManagerAddress"), "alive": node.get("Alive"),
                    "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0),
                    "custom": {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
                               and not k.startswith("node:")}})
    return out

