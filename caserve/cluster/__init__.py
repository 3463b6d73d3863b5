"""Cluster mode: a caserve deployment on Ray (``caserve cluster up|down|status``).

* :mod:`~caserve.cluster.config`     the cluster YAML (pydantic schema)
* :mod:`~caserve.cluster.deploy`     driver side: connect to Ray, start/find/stop the controller, status text
* :mod:`~caserve.cluster.controller` the detached controller actor: placement, restarts, autoscaling, draining
* :mod:`~caserve.cluster.adopt`      what a restarted controller takes over (a value the controller installs)
* :mod:`~caserve.cluster.names`      actor names and their grammar (pure)
* :mod:`~caserve.cluster.specs`      how each actor is made (args, Ray options) and the controller's record of it
* :mod:`~caserve.cluster.actors`     GPU server, router and worker actors (one per real process)
* :mod:`~caserve.cluster.processes`  supervised ``caserve`` subprocesses that die with their actor
* :mod:`~caserve.cluster.autoscale`  queue-delay signal and scaling policy (pure)
* :mod:`~caserve.cluster.placement`  GPU server choice by tenant load (pure)
* :mod:`~caserve.cluster.cli`        the ``caserve cluster`` sub-commands (typer), added to ``caserve`` by caserve.cli

Ray is imported only by ``deploy``, ``controller``, ``adopt``, ``specs`` and inside the actors, so the
config, the names and the policies load without it.
"""

from caserve.cluster.errors import AlreadyRunning, ClusterError, ConfigError, NotRunning, StartupTimeout

__all__ = ["ClusterConfig", "load_config", "parse_config", "ClusterError", "ConfigError", "NotRunning",
           "AlreadyRunning", "StartupTimeout"]

_CONFIG_NAMES = ("ClusterConfig", "load_config", "parse_config")


def __getattr__(name: str):
    """The config's names load on first use (PEP 562): the config imports caserve.models and with it torch,
    which ``caserve --help`` (importing :mod:`caserve.cluster.cli`) must not pay for."""
    if name in _CONFIG_NAMES:
        from caserve.cluster import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
