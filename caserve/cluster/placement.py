"""Which GPU server a new assisted worker uses: the one with the lowest current tenant load.

Load is read from each GPU server itself (``GPUServer.stats()``: every tenant session it holds,
whoever opened it), plus the workers the controller already pointed at it that have not connected
yet, so that several workers started in one control period spread instead of all picking the server
that looked emptiest. Ties go to fewer stored bytes, then to the lower index (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

from caserve.cluster.errors import ClusterError


@dataclass(frozen=True)
class ServerLoad:
    index: int
    tenants: int
    stored_bytes: int
    pending: int = 0  # workers assigned here whose session is not open yet

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.tenants + self.pending, self.stored_bytes, self.index)


def least_loaded(loads: list[ServerLoad]) -> int:
    """Index of the GPU server to use; ``ClusterError`` when there is none reachable."""
    if not loads:
        raise ClusterError("no reachable GPU server to point an assisted worker at")
    return min(loads, key=lambda load: load.key).index
