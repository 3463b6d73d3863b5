"""Weights shared by the tenants of one trust group (the GPU server keeps one store per group), stored once
per distinct content."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Blob:
    tensor: torch.Tensor
    nbytes: int
    refs: int = 0


class BlobStore:
    """Weights shared by all tenants: one read-only copy per distinct content (server-side hash)."""

    def __init__(self) -> None:
        self._blobs: dict[bytes, Blob] = {}
        self._lock = threading.Lock()

    @staticmethod
    def digest(data: memoryview) -> bytes:
        return hashlib.blake2b(data, digest_size=20).digest()

    def acquire(self, digest: bytes, make: Callable[[], torch.Tensor] | None = None) -> Blob | None:
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is None:
                if make is None:
                    return None
                t = make()
                blob = self._blobs[digest] = Blob(t, t.numel() * t.element_size())
            blob.refs += 1
            return blob

    def peek(self, digest: bytes) -> Blob | None:
        """The blob, without taking a reference (the caller already holds one)."""
        with self._lock:
            return self._blobs.get(digest)

    def release(self, digest: bytes) -> None:
        with self._lock:
            blob = self._blobs[digest]
            blob.refs -= 1
            if blob.refs == 0:
                del self._blobs[digest]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._blobs.values())

    def __len__(self) -> int:
        return len(self._blobs)
