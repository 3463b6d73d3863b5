"""Typed errors of the cluster layer."""

from __future__ import annotations


class ClusterError(Exception):
    """Base class of everything ``caserve cluster`` raises on purpose."""


class ConfigError(ClusterError):
    """The cluster YAML is missing, malformed or inconsistent (fix the file, then retry)."""


class NotRunning(ClusterError):
    """No caserve cluster controller in this Ray cluster (``caserve cluster up`` first)."""


class AlreadyRunning(ClusterError):
    """A caserve cluster controller already runs in this Ray cluster (``caserve cluster down`` first)."""


class StartupTimeout(ClusterError):
    """The deployment did not become ready in time (placement impossible, or a process keeps dying)."""


class ProcessFailed(ClusterError):
    """A supervised process could not be started or stopped."""
