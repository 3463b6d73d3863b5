"""``caserve cluster up|down|status``: parse the arguments, then call into caserve.cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from caserve.cli_common import fail, setup_logging

cluster_app = typer.Typer(no_args_is_help=True, help="Cluster mode on Ray: GPU servers, router, autoscaled workers.")


@cluster_app.command("up")
def cluster_up(
    config: Path = typer.Option(..., help="Cluster YAML (see docs/cluster.md)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address, e.g. ray://head:10001 or auto "
                                                   "(default: start a local Ray instance and serve until Ctrl-C)."),
    local_gpus: Optional[int] = typer.Option(None, help="Local Ray only: GPUs to advertise (1 on a CPU-only host "
                                                        "runs the GPU server on the CPU)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Deploy GPU servers, the router, native and assisted workers on Ray, and wait until they serve."""
    setup_logging(verbose)
    from caserve.cluster import ClusterError, ConfigError, deploy, load_config

    try:
        cfg = load_config(config)
        local = deploy.local_resources(cfg, local_gpus)
        owns_ray = deploy.connect(address, **({} if address else local))
        report = deploy.up(cfg)
        typer.echo(deploy.format_status(report))
        typer.echo(f"\nOpenAI-compatible API: {report['router']['url']}/v1")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    except ClusterError as exc:
        raise fail(exc) from None
    if address is None and owns_ray:
        typer.echo("local Ray instance: serving until Ctrl-C")
        deploy.serve_until_interrupted(cfg.name)


@cluster_app.command("down")
def cluster_down(
    address: str = typer.Option("auto", help="Ray cluster address."),
    name: str = typer.Option("caserve", help="Cluster name (config `name`)."),
) -> None:
    """Drain and stop every worker, then the router, the GPU servers and the controller."""
    setup_logging(False)
    from caserve.cluster import ClusterError, deploy

    try:
        deploy.connect(address)
        deploy.down(name)
    except ClusterError as exc:
        raise fail(exc) from None
    typer.echo(f"caserve cluster '{name}' is down")


@cluster_app.command("status")
def cluster_status(
    address: str = typer.Option("auto", help="Ray cluster address."),
    name: str = typer.Option("caserve", help="Cluster name (config `name`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Nodes, GPU servers with tenants and memory, workers by kind, queue and autoscaler."""
    setup_logging(False)
    import json

    from caserve.cluster import ClusterError, deploy

    try:
        deploy.connect(address)
        report = deploy.status(name)
    except ClusterError as exc:
        raise fail(exc) from None
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else deploy.format_status(report))
