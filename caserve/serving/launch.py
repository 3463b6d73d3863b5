"""Process layout of ``caserve serve``: the router in this process, everything else as children.

::

    caserve serve
     ├─ router (this process): uvicorn + FastAPI on --host:--port, one queue per model
     ├─ caserve gpu-server      (only when --assisted-workers > 0)  on 127.0.0.1:--gpu-port
     ├─ caserve worker --kind native    × --native-workers
     ├─ caserve worker --kind assisted  × --assisted-workers  (--gpu-server 127.0.0.1:--gpu-port)
     └─ caserve worker --kind cpu       × --cpu-workers

Children are started once the router listens and are restarted (after a short pause) when they
exit; all of them are stopped when the router stops. Workers receive the router's worker token in
their environment (``CASERVE_WORKER_TOKEN``), never on their command line. "Ready" and
the example commands are printed only once every worker started here answers and a probe request was
served (``serving.startup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import uvicorn

from caserve.defaults import DEFAULT_MODEL
from caserve.serving.credentials import ROUTER_CA_ENV, WORKER_TOKEN_ENV, new_token, router_verify
from caserve.serving.router.api import create_app
from caserve.serving.router.router import Router
from caserve.serving.router.security import DEFAULT_MAX_BODY_BYTES, RouterSecurity
from caserve.serving.startup import usage_text, wait_ready

logger = logging.getLogger(__name__)

RESTART_PAUSE_S = 2.0


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = DEFAULT_MODEL
    native_workers: int = 1
    assisted_workers: int = 2
    cpu_workers: int = 0
    policy: str = "fcfs"
    max_batch: int = 8
    batching: str = "continuous"
    max_len: int = 2048
    max_queue: int = 256
    gpu_port: int = 7070
    gpu_device: str = "auto"
    token_file: Optional[Path] = None
    shrink: bool = False
    task: Optional[str] = None
    worker_threads: Optional[int] = None
    verbose: bool = False
    # Router security (``caserve.serving.router.security``): the token workers present (generated
    # when not given: then only the workers started here know it), the optional public API key and
    # the largest request body the public routes accept.
    worker_token: str = field(default_factory=new_token, repr=False)
    api_key: Optional[str] = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    served_model_name: Optional[str] = None  # the id clients use (default: --model)
    # HTTPS on the router's one port (see caserve.serving.credentials); the workers started here check its
    # certificate against tls_ca, by default the certificate itself (right for a self-signed one).
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    tls_ca: Optional[Path] = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def router_ca(self) -> Optional[str]:
        ca = self.tls_ca or self.tls_cert
        return str(ca) if ca else None

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def n_workers(self) -> int:
        return self.native_workers + self.assisted_workers + self.cpu_workers


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "caserve.cli", *args]


def child_commands(cfg: ServeConfig, router_url: str) -> list[tuple[str, list[str]]]:
    """(name, argv) of every child process, GPU server first."""
    out: list[tuple[str, list[str]]] = []
    common = ["--verbose"] if cfg.verbose else []
    if cfg.assisted_workers:
        gpu = ["gpu-server", "--host", "127.0.0.1", "--port", str(cfg.gpu_port), "--device", cfg.gpu_device]
        if cfg.token_file:
            gpu += ["--token-file", str(cfg.token_file)]
        out.append(("gpu-server", _cli(*gpu, *common)))
    threads = cfg.worker_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.n_workers))
    for kind, count in (("native", cfg.native_workers), ("assisted", cfg.assisted_workers), ("cpu", cfg.cpu_workers)):
        for i in range(count):
            argv = ["worker", "--router", router_url, "--kind", kind, "--model", cfg.model,
                    "--max-batch", str(cfg.max_batch), "--batching", cfg.batching, "--max-len", str(cfg.max_len),
                    "--threads", str(threads),
                    "--worker-id", f"{kind}-{i}", *common]
            if kind == "assisted":
                argv += ["--gpu-server", f"127.0.0.1:{cfg.gpu_port}"]
                if cfg.token_file:
                    argv += ["--token-file", str(cfg.token_file)]
            if cfg.shrink:
                argv.append("--shrink")
            if cfg.task:
                argv += ["--task", cfg.task]
            if cfg.served_model_name:
                argv += ["--served-model-name", cfg.served_model_name]
            out.append((f"{kind}-{i}", _cli(*argv)))
    return out


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when ``caserve serve`` dies, even by SIGKILL."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM once it has stopped, which would kill us before the children
    are stopped; ``serve`` handles those signals itself instead."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class _Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        logger.info("started %s (pid %d)", self.name, self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def serve(cfg: ServeConfig, announce: Callable[[str], None]) -> None:
    router = Router(policy=cfg.policy, max_queue=cfg.max_queue, models=[cfg.name])
    security = RouterSecurity(cfg.worker_token, cfg.api_key, cfg.max_body_bytes)
    tls = {"ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key)} if cfg.tls_cert else {}
    server = _Server(uvicorn.Config(create_app(router, security), host=cfg.host, port=cfg.port,
                                    log_level="info" if cfg.verbose else "warning",
                                    timeout_graceful_shutdown=5, **tls))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving  # surfaces the bind error
            return
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"{cfg.scheme}://{cfg.host}:{port}"
    env = {**os.environ, WORKER_TOKEN_ENV: cfg.worker_token}
    if cfg.router_ca:
        env[ROUTER_CA_ENV] = cfg.router_ca  # the workers' check of the router's certificate
    children = [_Child(name, argv, env) for name, argv in child_commands(cfg, url)]
    for child in children:
        child.start()
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None  # the probe's
    workers = {name for name, _ in child_commands(cfg, url) if name != "gpu-server"}
    verify = router_verify(cfg.router_ca)
    ready = asyncio.create_task(wait_ready(router, url, cfg.name, workers, headers, verify)) if workers else None
    if ready is None:
        announce(usage_text(url, cfg.name, None, api_key=cfg.api_key is not None, ca=cfg.router_ca))
    else:
        logger.info("waiting for %d worker(s) to register and answer: %s", len(workers), ", ".join(sorted(workers)))
    try:
        while not serving.done() and not server.should_exit:
            if ready is not None and ready.done():
                announce(usage_text(url, cfg.name, ready.result(), workers=len(workers),
                                    random_weights=cfg.model == DEFAULT_MODEL, api_key=cfg.api_key is not None,
                                    ca=cfg.router_ca))
                ready = None
            await asyncio.sleep(0.5)
            for child in children:
                if child.proc is not None and child.proc.poll() is not None and not server.should_exit:
                    logger.warning("%s exited with %s; restarting in %.0fs", child.name, child.proc.returncode,
                                   RESTART_PAUSE_S)
                    await asyncio.sleep(RESTART_PAUSE_S)
                    child.start()
    finally:
        if ready is not None:
            ready.cancel()
        # Children first: their worker channels are open streams that would hold up uvicorn's shutdown.
        for child in reversed(children):
            await asyncio.to_thread(child.stop)
        server.should_exit = True
        await serving
