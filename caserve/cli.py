"""The ``caserve`` command: parses arguments and calls into the layers, nothing more."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="CPU-assisted language-model serving.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks and evaluation.")
app.add_typer(bench_app, name="bench")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command("gpu-server")
def gpu_server(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(7070, help="TCP port (0 picks a free one)."),
    device: str = typer.Option("auto", help="cuda:N, cpu, or auto (CUDA when present)."),
    token_file: Optional[Path] = typer.Option(None, help="File holding the shared client token."),
    tenant_memory_limit: str = typer.Option("0", help="Per-tenant device memory limit, e.g. 8GiB (0: none)."),
    unix_socket: Optional[Path] = typer.Option(None, help="Unix socket path (default: one per port in the temp dir)."),
    no_unix_socket: bool = typer.Option(False, "--no-unix-socket", help="Listen on TCP only."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Own one device and execute the op streams of many CPU-node clients on it."""
    _setup_logging(verbose)
    from caserve.remote.server import serve_forever

    serve_forever(
        host=host,
        port=port,
        device=device,
        token=token_file.read_text().strip() if token_file else None,
        tenant_memory_limit=tenant_memory_limit,
        unix_socket=None if no_unix_socket else (str(unix_socket) if unix_socket else "auto"),
    )


if __name__ == "__main__":
    app()
