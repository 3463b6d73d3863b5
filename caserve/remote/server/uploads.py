"""Uploads in parts (:class:`caserve.remote.wire.protocol.UploadPart`): a tensor larger than one frame
may carry arrives as consecutive byte ranges of one storage.

The first part creates the storage at its full size and charges the tenant for all of it (while the
upload is incomplete its bytes count as the tenant's, so no number of partial uploads passes the quota);
each following part must start where the last one ended and name the same dtype, size and ``share``; a
part past the end is refused. A shared weight is hashed as its parts arrive, and stored once per content
when the last one is in, exactly as a one-frame ``Upload`` is. At most ``Limits.max_partial_uploads`` are
incomplete per tenant; a part sent wrong, ``Free`` of the handle, or the tenant's end abandons one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from caserve.remote.server.errors import TenantError
from caserve.remote.wire import protocol as P


@dataclass
class Partial:
    """One upload in parts, not yet complete."""

    op: P.UploadPart  # its first part: later ones must name the same handle, dtype, size and share
    tensor: torch.Tensor  # the storage being filled, on the tenant's device
    nbytes: int
    received: int = 0
    hasher: Any = None  # blake2b of the bytes so far, for a shared weight

    def matches(self, op: P.UploadPart) -> bool:
        first = self.op
        return op.dtype == first.dtype and tuple(op.size) == tuple(first.size) and op.share == first.share


class PartialUploads:
    """A tenant's incomplete uploads, by handle."""

    def __init__(self, limit: int = P.LIMITS.max_partial_uploads) -> None:
        self.limit = limit
        self.partial: dict[int, Partial] = {}

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.partial.values())

    def begin(self, op: P.UploadPart, make: Callable[[], torch.Tensor], nbytes: int) -> Partial:
        if op.handle in self.partial:
            raise TenantError(f"storage handle {op.handle} already has an upload in progress")
        if len(self.partial) >= self.limit:
            raise TenantError(f"more than {self.limit} uploads in parts at once", "limit")
        part = Partial(op, make(), nbytes, 0, hashlib.blake2b(digest_size=20) if op.share else None)
        self.partial[op.handle] = part
        return part

    def add(self, op: P.UploadPart, data: memoryview) -> Partial | None:
        """Write ``data`` at ``op.start``; returns the upload once complete (it is then no longer partial)."""
        part = self.partial.get(op.handle)
        if part is None:
            raise TenantError(f"no upload in progress for storage handle {op.handle} (the first part starts at 0)")
        if not part.matches(op):
            raise TenantError(f"upload part for storage {op.handle} names another dtype, size or share than its first")
        if op.start != part.received:
            raise TenantError(f"upload part for storage {op.handle} starts at byte {op.start}; "
                              f"{part.received} have arrived")
        n = len(data)
        if n == 0 or part.received + n > part.nbytes:
            raise TenantError(f"upload part of {n} bytes at {op.start} does not fit storage {op.handle} "
                              f"of {part.nbytes} bytes")
        flat = part.tensor.view(-1).view(torch.uint8)
        flat[part.received:part.received + n].copy_(torch.frombuffer(data, dtype=torch.uint8))
        if part.hasher is not None:
            part.hasher.update(data)
        part.received += n
        if part.received < part.nbytes:
            return None
        del self.partial[op.handle]
        return part

    def abandon(self, handle: Any) -> Partial | None:
        """Drop ``handle``'s incomplete upload; returns it (its bytes are the caller's to uncharge)."""
        return self.partial.pop(handle, None) if type(handle) is int else None

    def clear(self) -> None:
        self.partial.clear()
