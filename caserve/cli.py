"""The ``caserve`` command: parses arguments and calls into the layers, nothing more.

Here: ``gpu-server``, ``serve`` and ``worker``. ``bench`` and ``sim`` live in :mod:`caserve.bench.cli`,
``cluster`` in :mod:`caserve.cluster.cli`; :mod:`caserve.cli_common` holds what they all share.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from caserve.bench.cli import bench_app, sim_cmd
from caserve.cli_common import check_model_path, fail, setup_logging
from caserve.cluster.cli import cluster_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="CPU-assisted language-model serving.")
app.add_typer(bench_app, name="bench")
app.add_typer(cluster_app, name="cluster")


def server_threads(device: str, threads: int, cuda: bool) -> int:
    """A GPU server's torch intra-op threads; 0 keeps torch's default. On a CPU device the default is 1:
    decode-sized ops gain little from intra-op threads, and idle OpenMP workers spin between ops on the
    cores the clients need (docs/results.md, section 7, measures it)."""
    if threads:
        return threads
    return 1 if device == "cpu" or (device == "auto" and not cuda) else 0


@app.command("gpu-server")
def gpu_server(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(7070, help="TCP port (0 picks a free one)."),
    device: str = typer.Option("auto", help="cuda:N, cpu, or auto (CUDA when present)."),
    token_file: Optional[Path] = typer.Option(
        None, help="Client tokens, one a line; tenants presenting the same token form a trust group (shared "
                   "weights are deduplicated only within one)."),
    admin_token_file: Optional[Path] = typer.Option(None, help="A token whose tenants see every tenant in Stats."),
    tenant_memory_limit: str = typer.Option(
        "auto", help="Per-tenant device memory limit, e.g. 8GiB; auto: a quarter of the device; 0: none."),
    allow_any_op: bool = typer.Option(
        False, "--allow-any-op", help="Accept any ATen op outside the deny list, not only the allow-list "
                                      "(trusted single-user deployments only)."),
    max_frame: str = typer.Option("768MiB", help="Largest frame a tenant may send."),
    max_connections: int = typer.Option(256, help="Open connections in all."),
    max_peer_connections: int = typer.Option(64, help="Open connections from one peer address."),
    handshake_timeout: float = typer.Option(10.0, help="Seconds a new connection has to authenticate."),
    idle_timeout: float = typer.Option(0.0, help="Seconds an authenticated connection may stay silent (0: no limit)."),
    tls_cert: Optional[Path] = typer.Option(None, help="TLS certificate (PEM) for TCP clients."),
    tls_key: Optional[Path] = typer.Option(None, help="The certificate's private key (PEM)."),
    unix_socket: Optional[Path] = typer.Option(
        None, help="Unix socket path (default: one per port in this user's 0700 directory in the temp dir)."),
    no_unix_socket: bool = typer.Option(False, "--no-unix-socket", help="Listen on TCP only."),
    threads: int = typer.Option(0, min=0, help="torch intra-op CPU threads (0: 1 on a CPU device, torch's "
                                "default with CUDA; see docs/results.md, server scaling)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Own one device and execute the op streams of many CPU-node clients on it."""
    setup_logging(verbose)
    from caserve.units import parse_size

    try:  # refuse bad sizes and unreadable token files before loading torch (seconds)
        frame_bytes = parse_size(max_frame)
        memory_limit = tenant_memory_limit if tenant_memory_limit == "auto" else parse_size(tenant_memory_limit)
        tokens = [t.strip() for t in token_file.read_text().splitlines() if t.strip()] if token_file else None
        admin_token = admin_token_file.read_text().strip() if admin_token_file else None
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    import torch

    from caserve.remote.server import serve_forever

    threads = server_threads(device, threads, torch.cuda.is_available())
    if threads:
        torch.set_num_threads(threads)
    serve_forever(
        host=host,
        port=port,
        unix_socket=None if no_unix_socket else (str(unix_socket) if unix_socket else "auto"),
        tls_cert=str(tls_cert) if tls_cert else None,
        tls_key=str(tls_key) if tls_key else None,
        device=device,
        token=tokens,
        admin_token=admin_token,
        tenant_memory_limit=memory_limit,
        allow_any_op=allow_any_op,
        max_frame=frame_bytes,
        max_connections=max_connections,
        max_peer_connections=max_peer_connections,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
    )


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="Router address."),
    port: int = typer.Option(8000, help="Router port (0 picks a free one)."),
    model: Optional[str] = typer.Option(None, help="HF model id, local path or zoo name (default: caserve/tiny-gpt2)."),
    native_workers: int = typer.Option(1, min=0, help="GPU-native workers (CUDA if present, else CPU)."),
    assisted_workers: int = typer.Option(2, min=0, help="CPU-assisted workers (ops on the local GPU server)."),
    cpu_workers: int = typer.Option(0, min=0, help="Plain CPU workers."),
    policy: str = typer.Option("fcfs", help="Dispatch policy: fcfs or ect."),
    max_batch: int = typer.Option(8, min=1, help="Slots per worker: requests one worker runs at once."),
    batching: str = typer.Option("continuous", help="continuous (a request takes a free slot at once) or static "
                                 "(a worker takes requests only when all its slots are free: the baseline)."),
    max_len: int = typer.Option(2048, min=2, help="Most tokens (prompt + output) one slot holds."),
    max_queue: int = typer.Option(256, min=1, help="Queued requests per model before answering 429."),
    gpu_port: int = typer.Option(7070, help="Port of the GPU server started for assisted workers."),
    gpu_device: str = typer.Option("auto", help="GPU server device: auto, cpu or cuda:N."),
    token_file: Optional[Path] = typer.Option(None, help="Shared GPU-server token file."),
    worker_token_file: Optional[Path] = typer.Option(
        None, help="Router's worker token (workers on other hosts need it too); default: $CASERVE_WORKER_TOKEN, "
                   "else a fresh one only the workers started here know."),
    api_key_file: Optional[Path] = typer.Option(
        None, help="API key the public routes require as 'Authorization: Bearer KEY' (default: $CASERVE_API_KEY, "
                   "else none)."),
    max_body_size: str = typer.Option("4MiB", help="Largest request body of the public routes (413 above it)."),
    shrink: bool = typer.Option(False, help="Zoo models: 2 layers, 64 wide, random weights."),
    task: Optional[str] = typer.Option(None, help="Override the model task (e.g. classification)."),
    worker_threads: Optional[int] = typer.Option(None, help="Torch threads per worker (default: cores / workers)."),
    served_model_name: Optional[str] = typer.Option(None, help="The model id clients use (default: --model)."),
    tls_cert: Optional[Path] = typer.Option(None, help="Serve HTTPS with this certificate (PEM); needs --tls-key."),
    tls_key: Optional[Path] = typer.Option(None, help="The certificate's private key (PEM)."),
    tls_ca: Optional[Path] = typer.Option(
        None, help="CA file the workers started here check the router's certificate against (default: "
                   "--tls-cert itself, right for a self-signed certificate)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Start the router, a GPU server and the workers on this machine, and serve until Ctrl-C."""
    from caserve.serving.router.policies import POLICIES

    if policy not in POLICIES:
        raise typer.BadParameter(f"choose one of {', '.join(POLICIES)}", param_hint="--policy")
    if batching not in ("continuous", "static"):
        raise typer.BadParameter("choose continuous or static", param_hint="--batching")
    setup_logging(verbose)
    import asyncio

    from caserve.serving.credentials import API_KEY_ENV, WORKER_TOKEN_ENV, CredentialError, resolve_secret
    from caserve.serving.launch import ServeConfig
    from caserve.serving.launch import serve as run_serve
    from caserve.units import parse_size

    try:
        worker_token = resolve_secret(worker_token_file, WORKER_TOKEN_ENV, "worker token")
        api_key = resolve_secret(api_key_file, API_KEY_ENV, "API key")
        max_body_bytes = parse_size(max_body_size)
    except (CredentialError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if max_body_bytes <= 0:
        raise typer.BadParameter("must be a positive size", param_hint="--max-body-size")
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give both --tls-cert and --tls-key, or neither", param_hint="--tls-cert")
    for path in (tls_cert, tls_key, tls_ca):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"{path} is not a readable file", param_hint="--tls-cert/--tls-key/--tls-ca")
    if native_workers + assisted_workers + cpu_workers:  # a router alone (cluster mode) loads no model here
        check_model_path(model)
    if token_file is not None and not token_file.is_file():  # else the GPU server would fail at every restart
        raise typer.BadParameter(f"{token_file} is not a readable file", param_hint="--token-file")
    if tls_ca is not None and tls_cert is None:
        raise typer.BadParameter("--tls-ca checks the router's certificate: it needs --tls-cert", param_hint="--tls-ca")
    cfg = ServeConfig(host=host, port=port, native_workers=native_workers, assisted_workers=assisted_workers,
                      cpu_workers=cpu_workers, policy=policy, max_batch=max_batch, batching=batching,
                      max_len=max_len, max_queue=max_queue,
                      gpu_port=gpu_port, gpu_device=gpu_device, token_file=token_file, shrink=shrink, task=task,
                      worker_threads=worker_threads, verbose=verbose, api_key=api_key, max_body_bytes=max_body_bytes,
                      served_model_name=served_model_name, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
    if worker_token:
        cfg.worker_token = worker_token
    if model:
        cfg.model = model
    try:
        asyncio.run(run_serve(cfg, announce=lambda text: typer.echo(text)))
    except KeyboardInterrupt:
        pass


@app.command("worker")
def worker(
    router: str = typer.Option(..., help="Router URL, e.g. http://10.0.0.1:8000."),
    kind: str = typer.Option(..., help="native, assisted or cpu."),
    model: Optional[str] = typer.Option(None, help="Model to serve (default: caserve/tiny-gpt2)."),
    gpu_server: Optional[str] = typer.Option(None, help="host:port of the GPU server (assisted workers)."),
    token_file: Optional[Path] = typer.Option(None, help="File holding the GPU server token."),
    worker_token_file: Optional[Path] = typer.Option(
        None, help="File holding the router's worker token (default: $CASERVE_WORKER_TOKEN)."),
    tls_ca: Optional[Path] = typer.Option(None, help="CA file: reach the GPU server over TLS, checking its certificate."),
    router_ca: Optional[Path] = typer.Option(
        None, help="CA file checking an https:// router's certificate (default: $CASERVE_ROUTER_CA, else the "
                   "system's trust store)."),
    worker_id: Optional[str] = typer.Option(None, help="Stable worker id (default: kind-host-pid)."),
    max_batch: int = typer.Option(8, min=1, help="Slots: requests this worker runs at once."),
    batching: str = typer.Option("continuous", help="continuous or static (admit only when all slots are free)."),
    max_len: int = typer.Option(2048, min=2, help="Most tokens (prompt + output) one slot holds."),
    shrink: bool = typer.Option(False, help="Zoo models: 2 layers, 64 wide, random weights."),
    task: Optional[str] = typer.Option(None, help="Override the model task (e.g. classification)."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads."),
    step_delay: float = typer.Option(0.0, hidden=True, help="Sleep per decode step (emulates a slow device)."),
    graph: bool = typer.Option(True, "--graph/--no-graph", help="Assisted: replay decode steps as captured graphs."),
    served_model_name: Optional[str] = typer.Option(None, help="The model id the router knows (default: --model)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve one model for a router: register, heartbeat, run requests in its slots until stopped."""
    setup_logging(verbose)
    import asyncio

    from caserve.defaults import DEFAULT_MODEL
    from caserve.serving.credentials import WORKER_TOKEN_ENV, CredentialError, resolve_secret
    from caserve.serving.worker.config import WorkerConfig

    check_model_path(model)
    if tls_ca:  # read by caserve.remote.connect
        os.environ["CASERVE_TLS_CA"] = str(tls_ca)
    try:
        router_token = resolve_secret(worker_token_file, WORKER_TOKEN_ENV, "worker token")
        cfg = WorkerConfig(router_url=router, kind=kind, model=model or DEFAULT_MODEL, gpu_server=gpu_server,
                           router_token=router_token or "",
                           token=token_file.read_text().strip() if token_file else None, worker_id=worker_id,
                           max_batch=max_batch, shrink=shrink, task=task, threads=threads, step_delay_s=step_delay,
                           graph=graph, batching=batching, max_len=max_len,
                           router_ca=str(router_ca) if router_ca else None,
                           served_model_name=served_model_name)
    except (CredentialError, ValueError, OSError) as exc:  # OSError: the GPU server token file
        raise typer.BadParameter(str(exc)) from None
    from caserve.serving.worker.worker import Worker, WorkerTokenRefused  # torch and transformers: seconds

    try:
        asyncio.run(Worker(cfg).run_forever())
    except KeyboardInterrupt:
        pass
    except WorkerTokenRefused as exc:
        raise fail(exc) from None


# `caserve sim` stays a top-level command; its code lives with the benchmarks whose results it reads.
app.command("sim")(sim_cmd)


if __name__ == "__main__":
    app()
