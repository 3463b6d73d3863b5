"""The two secrets of the serving layer, shared by the router, the workers and the launchers.

* The **worker token** proves that a caller may act as a worker or administer workers: every
  ``/internal/*`` request carries it in the ``messages.WORKER_TOKEN_HEADER`` header. ``caserve serve``
  generates one for the workers it starts unless ``--worker-token-file`` names one (needed for workers
  on other hosts); children receive it in the :data:`WORKER_TOKEN_ENV` environment variable, never
  on a command line (``/proc/PID/environ`` is readable by the same user only, ``ps`` shows argv).
* The **API key** (optional) is what OpenAI clients send as ``Authorization: Bearer KEY`` on the
  public routes: ``--api-key-file`` or :data:`API_KEY_ENV`.

The link itself: with ``--tls-cert``/``--tls-key`` the router serves HTTPS (public and worker routes on
one port, so prompts, answers and the worker token travel encrypted); workers and the start-up probe
check its certificate against ``--router-ca`` / :data:`ROUTER_CA_ENV` (:func:`router_verify`).

A secret file holds the secret on its first line; a file that other users can read is used, with
a warning in the log.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import stat
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

WORKER_TOKEN_ENV = "CASERVE_WORKER_TOKEN"
API_KEY_ENV = "CASERVE_API_KEY"
ROUTER_CA_ENV = "CASERVE_ROUTER_CA"
MIN_SECRET_CHARS = 16


class CredentialError(ValueError):
    """A secret file that cannot be read, or a secret too short to be one."""


def new_token() -> str:
    """A fresh worker token: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def check_secret(value: str, what: str) -> str:
    value = value.strip()
    if len(value) < MIN_SECRET_CHARS:
        raise CredentialError(f"the {what} must be at least {MIN_SECRET_CHARS} characters long")
    return value


def read_secret_file(path: Path, what: str) -> str:
    """The secret on the first line of ``path``; warns when group or others may read the file."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise CredentialError(f"cannot read the {what} file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the %s file %s is readable by other users (mode %o); chmod 600 it",
                       what, path, stat.S_IMODE(mode))
    lines = text.splitlines()
    return check_secret(lines[0] if lines else "", what)


def resolve_secret(path: Optional[Path], env: str, what: str) -> Optional[str]:
    """From ``path`` when given, else from the environment variable ``env``, else None."""
    if path is not None:
        return read_secret_file(path, what)
    value = os.environ.get(env)
    return check_secret(value, what) if value else None


def router_verify(ca_file: Optional[str | Path]) -> ssl.SSLContext:
    """What a client of the router checks its certificate against: the CA file given (or
    :data:`ROUTER_CA_ENV`), else the system's trust store (not a bundle of the HTTP client's own).
    Plain ``http://`` routers ignore it."""
    ca = ca_file or os.environ.get(ROUTER_CA_ENV) or None
    if ca is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(f"cannot use the router CA file {ca}: {exc}") from None
