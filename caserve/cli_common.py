"""What every module of the ``caserve`` command shares: logging setup and the exit on a typed error."""

from __future__ import annotations

import logging
import os
from typing import Optional

import typer


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


def check_model_path(model: Optional[str]) -> None:
    """Refuse a model named as a local path (``/``, ``./``, ``../`` or ``~`` first) that is not a folder:
    workers would otherwise retry loading it for ever, and the hub client's complaint about repo ids
    would hide that the path is wrong. Hub ids (``org/name``) and zoo names pass through."""
    if model and model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise typer.BadParameter(f"{model} is not a folder (a local model is a folder with config.json)",
                                 param_hint="--model")
