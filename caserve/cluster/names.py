"""The names of a deployment's Ray actors and their grammar (pure: no Ray import).

Every actor the controller creates is detached and named ``<cluster>-<short>`` in the Ray namespace
:data:`NAMESPACE`, so that it outlives the controller and a restarted controller can find it again.
Short names::

    gpu-<i>              GPU server i (listens on base_port + i)
    router               the router
    native-<i>-<j>       native worker j beside GPU server i
    assisted-<n>         assisted worker n (numbers are never reused within a deployment)

The controller itself is ``<cluster>-controller`` (not matched by the grammar: it adopts, it is not adopted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Optional

NAMESPACE = "caserve"  # Ray namespace of the controller and of every actor it creates
ROUTER = "router"

Role = Literal["gpu-server", "router", "native", "assisted"]

_GRAMMAR = re.compile(r"^(?:(?P<gpu>gpu-(?P<i>\d+))|(?P<router>router)|(?P<native>native-(?P<ni>\d+)-(?P<nj>\d+))"
                      r"|(?P<assisted>assisted-(?P<n>\d+)))$")


@dataclass(frozen=True)
class ActorName:
    """A parsed short name: its role, the GPU server it belongs to (GPU servers and native workers) and
    its number among its kind (native and assisted workers)."""

    short: str
    role: Role
    gpu_index: Optional[int] = None
    number: Optional[int] = None


def gpu_server(i: int) -> str:
    return f"gpu-{i}"


def native(gpu_index: int, j: int) -> str:
    return f"native-{gpu_index}-{j}"


def assisted(n: int) -> str:
    return f"assisted-{n}"


def parse(short: str) -> Optional[ActorName]:
    """The name's parts, or None when it is not one of the controller's actors."""
    m = _GRAMMAR.match(short)
    if m is None:
        return None
    if m["gpu"]:
        return ActorName(short, "gpu-server", gpu_index=int(m["i"]))
    if m["router"]:
        return ActorName(short, "router")
    if m["native"]:
        return ActorName(short, "native", gpu_index=int(m["ni"]), number=int(m["nj"]))
    return ActorName(short, "assisted", number=int(m["n"]))


def full_name(cluster: str, short: str) -> str:
    """The Ray actor name of ``short`` in deployment ``cluster``."""
    return f"{cluster}-{short}"


def controller_name(cluster: str) -> str:
    return f"{cluster}-controller"


def ours(cluster: str, listing: Iterable[Mapping[str, Any]]) -> list[str]:
    """Short names, sorted, of deployment ``cluster``'s actors in a listing of named actors
    (``ray.util.list_named_actors(all_namespaces=True)``: ``{"name", "namespace"}`` entries)."""
    prefix = f"{cluster}-"
    return sorted(
        e["name"][len(prefix):] for e in listing
        if e["namespace"] == NAMESPACE and e["name"].startswith(prefix) and parse(e["name"][len(prefix):]))
