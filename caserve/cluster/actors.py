"""The Ray actors of a caserve cluster: one per real process.

* :class:`GPUServerActor` *is* a GPU server: the actor process owns the GPU Ray gave it and runs
  :class:`caserve.remote.server.GPUServer` with its listener in threads, so the controller reads its
  tenants and memory with a plain actor call (no client session, nothing added to the wire protocol).
* :class:`RouterActor` supervises ``caserve serve`` with no local workers.
* :class:`WorkerActor` supervises one ``caserve worker`` (native beside a GPU server, or assisted on a
  CPU node, pointed at a GPU server).

The classes are plain Python; :mod:`caserve.cluster.controller` wraps them with ``ray.remote`` and the
placement options. All are created with ``max_restarts=-1``: when an actor's process dies, Ray starts
it again with the same arguments (same ports, same worker id), and the supervised child dies with the
old one (see :mod:`caserve.cluster.processes`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from caserve.cluster.config import ClusterConfig
from caserve.cluster.errors import ConfigError
from caserve.cluster.processes import SupervisedProcess, caserve_argv, child_env
from caserve.serving.credentials import API_KEY_ENV, WORKER_TOKEN_ENV

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0


def log_dir(cfg: ClusterConfig) -> Path:
    return Path(os.environ.get("CASERVE_CLUSTER_LOG_DIR", tempfile.gettempdir())) / "caserve-cluster" / cfg.name


def _node() -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "reconstructed": reconstructed()}


def reconstructed() -> bool:
    """Whether Ray restarted the calling actor (False outside an actor)."""
    import ray

    if not ray.is_initialized():
        return False
    with warnings.catch_warnings():  # Ray 2.x marks the property deprecated without a replacement
        warnings.simplefilter("ignore")
        try:
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except AttributeError:
            return False


def _secrets_env(cfg: ClusterConfig) -> dict[str, str]:
    """The router's worker token for a child's environment (never its argv, which ``ps`` shows)."""
    if not cfg.worker_token:
        raise ConfigError("the cluster config carries no worker token (ClusterConfig.with_secrets)")
    return {WORKER_TOKEN_ENV: cfg.worker_token}


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class GPUServerActor:
    """GPU server ``index``: 1 Ray GPU, listening on ``gpu_server.base_port + index``."""

    def __init__(self, cfg: ClusterConfig, index: int) -> None:
        _setup_logging()
        import ray

        from caserve.remote.server import GPUServer, Listener

        self.cfg, self.index = cfg, index
        g = cfg.gpu_server
        token = g.token_file.read_text().strip() if g.token_file else None
        self.host = "127.0.0.1" if cfg.loopback else ray.util.get_node_ip_address()
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        if g.threads:
            import torch

            torch.set_num_threads(g.threads)
        self.server = GPUServer(g.device, token, g.tenant_memory_limit)
        tls = {"tls_cert": str(g.tls.cert), "tls_key": str(g.tls.key)} if g.tls.on else {}
        self.listener = Listener(self.server, self.host, g.base_port + index, **tls).start()
        self.started = time.time()
        logger.info("GPU server %d on %s (device %s, Ray GPUs %s)", index, self.listener.address, self.server.device,
                    self.gpu_ids)

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "address": self.listener.address, "gpu_ids": self.gpu_ids,
                "device": str(self.server.device), "device_name": self.server.device_name, **_node()}

    def stats(self) -> dict[str, Any]:
        """The server's own figures: ``tenants`` (list), ``tenant_bytes``, ``stored_bytes``, ..."""
        return self.server.stats()

    def stop(self) -> None:
        self.listener.stop()


class RouterActor:
    """``caserve serve`` with no local workers, on ``router.port``."""

    def __init__(self, cfg: ClusterConfig) -> None:
        _setup_logging()
        import ray

        r = cfg.router
        bind = "127.0.0.1" if cfg.loopback else "0.0.0.0"
        host = "127.0.0.1" if cfg.loopback else ray.util.get_node_ip_address()
        self.url = f"{'https' if r.tls.on else 'http'}://{host}:{r.port}"
        tls = ["--tls-cert", str(r.tls.cert), "--tls-key", str(r.tls.key), "--tls-ca", str(r.tls.client_ca)] \
            if r.tls.on else []
        argv = caserve_argv("serve", "--host", bind, "--port", str(r.port), "--model", cfg.model,
                            "--native-workers", "0", "--assisted-workers", "0", "--cpu-workers", "0",
                            "--policy", r.policy, "--max-batch", str(r.max_batch), "--max-queue", str(r.max_queue),
                            *tls)
        env = _secrets_env(cfg)
        if cfg.api_key:
            env[API_KEY_ENV] = cfg.api_key
        self.proc = SupervisedProcess("router", argv, child_env(env), log_dir(cfg) / "router.log").start()

    def info(self) -> dict[str, Any]:
        return {"url": self.url, "child_pid": self.proc.pid, "child_restarts": self.proc.restarts,
                "log": str(self.proc.log_path), **_node()}

    def stop(self) -> None:
        self.proc.stop(STOP_TIMEOUT_S)


class WorkerActor:
    """One ``caserve worker``. ``gpu_server`` is ``host:port`` for assisted workers; ``cuda_visible``
    pins a native worker to the GPU of the server it sits beside."""

    def __init__(self, cfg: ClusterConfig, worker_id: str, kind: str, router_url: str,
                 gpu_server: Optional[str] = None, cuda_visible: Optional[str] = None) -> None:
        _setup_logging()
        self.worker_id, self.kind, self.gpu_server = worker_id, kind, gpu_server
        threads = cfg.assisted.threads if kind == "assisted" else max(1, int(cfg.resources.native_num_cpus))
        argv = ["worker", "--router", router_url, "--kind", kind, "--model", cfg.model, "--worker-id", worker_id,
                "--max-batch", str(cfg.router.max_batch), "--threads", str(threads)]
        if gpu_server:
            argv += ["--gpu-server", gpu_server]
            if cfg.gpu_server.token_file:
                argv += ["--token-file", str(cfg.gpu_server.token_file)]
            if cfg.gpu_server.tls.on:
                argv += ["--tls-ca", str(cfg.gpu_server.tls.client_ca)]
        if cfg.router.tls.on:
            argv += ["--router-ca", str(cfg.router.tls.client_ca)]
        if cfg.shrink:
            argv.append("--shrink")
        if cfg.task:
            argv += ["--task", cfg.task]
        if cfg.worker_step_delay_s:
            argv += ["--step-delay", str(cfg.worker_step_delay_s)]
        env = _secrets_env(cfg)
        if cuda_visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible
        env["OMP_NUM_THREADS"] = str(threads)
        self.proc = SupervisedProcess(worker_id, caserve_argv(*argv), child_env(env),
                                      log_dir(cfg) / f"{worker_id}.log").start()

    def info(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "kind": self.kind, "gpu_server": self.gpu_server,
                "child_pid": self.proc.pid, "child_restarts": self.proc.restarts, "log": str(self.proc.log_path),
                **_node()}

    def stop(self) -> None:
        self.proc.stop(STOP_TIMEOUT_S)
