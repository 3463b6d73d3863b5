"""The GPU server's state, whatever the transport: its device, its tenants (one executor each), the trust
groups and their shared weights, tokens, limits and figures.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Sequence

import msgspec
import torch

from caserve.remote.wire import protocol as P
from caserve.remote.server.blobs import BlobStore
from caserve.remote.server.executor import Executor, Tenant
from caserve.remote.server.opsurface import OpSurface
from caserve.units import parse_size

logger = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU (logged, so nobody is surprised)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        logger.warning("no CUDA device found: the GPU server runs ops on the CPU")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"the GPU server runs on cuda:N or cpu, not {device}")
    return dev


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has (the host's physical memory for a CPU device)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tenant_quota(setting: str | int | None, device: torch.device) -> int:
    """``"auto"`` (the default): a fair share of the device (P.DEFAULT_TENANT_SHARE of its memory);
    ``0``: unlimited; else a size such as ``8GiB``."""
    if setting is None or setting == "auto":
        return int(device_memory(device) * P.DEFAULT_TENANT_SHARE)
    return parse_size(setting)


class GPUServer:
    """The server's state: device, tenants and shared weights. Transport-independent.

    ``token``: one token, or several; tenants presenting the same token form a trust group, and shared
    weights are deduplicated only within a group (``HasBlobs`` answers nothing across groups).
    ``admin_token``: a tenant presenting it sees every tenant in ``Stats``. ``allow_any_op``: accept ATen
    ops off the allow-list (trusted single-user deployments; the deny list still holds).
    """

    def __init__(self, device: str = "auto", token: str | Sequence[str] | None = None,
                 tenant_memory_limit: str | int | None = "auto", max_frame: int = P.LIMITS.max_frame,
                 allow_any_op: bool = False, admin_token: str | None = None,
                 max_connections: int = P.LIMITS.max_connections,
                 max_peer_connections: int = P.LIMITS.max_peer_connections,
                 handshake_timeout: float = P.LIMITS.handshake_timeout,
                 idle_timeout: float = P.LIMITS.idle_timeout) -> None:
        self.device = pick_device(device)
        tokens = [token] if isinstance(token, str) else list(token or [])
        self.tokens = [t for t in tokens if t]
        self.token = self.tokens[0] if self.tokens else None  # auth is required when set
        self.admin_token = admin_token or None
        self.memory_limit = tenant_quota(tenant_memory_limit, self.device)
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.max_peer_connections = max_peer_connections
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.limits = msgspec.structs.replace(  # what Welcome tells each tenant
            P.LIMITS, max_frame=max_frame, max_connections=max_connections,
            max_peer_connections=max_peer_connections, handshake_timeout=handshake_timeout, idle_timeout=idle_timeout)
        self.allow_any_op = allow_any_op
        self.surface = OpSurface(allow_any=allow_any_op)
        if allow_any_op:
            logger.warning("*** --allow-any-op: tenants may run any ATen op outside the deny list, not only the "
                           "allow-list. Use only for a trusted, single-user deployment. ***")
        self.groups: dict[Any, BlobStore] = {}  # trust group -> its shared weights
        self.tenants: dict[int, Executor] = {}
        self._lock = threading.Lock()
        self._next_tenant = 1
        self.total_ops = 0
        self.started = time.time()

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def authenticate(self, nonce: bytes, mac: bytes) -> tuple[Any, bool] | None:
        """The trust group and admin flag of the token ``mac`` proves, or None for none of them. A server
        without client tokens (loopback peers only) puts every tenant but an admin in one group."""
        if self.admin_token is not None and P.check_mac(self.admin_token, nonce, mac):
            return "admin", True
        if not self.tokens:
            return 0, False
        found = None
        for i, token in enumerate(self.tokens):  # every token is tried, so timing tells nothing
            if P.check_mac(token, nonce, mac):
                found = i
        return None if found is None else (found, False)

    def token_of(self, group: Any, admin: bool) -> str | None:
        """The token a tenant of ``group`` proved (for the server's own proof in WELCOME)."""
        if admin:
            return self.admin_token
        return self.tokens[group] if self.tokens else None

    def new_tenant(self, group: Any = 0, admin: bool = False) -> Executor:
        with self._lock:
            tid = self._next_tenant
            self._next_tenant += 1
            blobs = self.groups.get(group)
            if blobs is None:
                blobs = self.groups[group] = BlobStore()
            tenant = Tenant(tid, self.device, blobs, self.memory_limit, self.surface)
            tenant.admin = admin
            self.tenants[tid] = tenant
        return tenant

    @property
    def blobs_nbytes(self) -> int:
        return sum(b.nbytes for b in list(self.groups.values()))

    def drop_tenant(self, tenant: Executor) -> None:
        tenant.close()
        with self._lock:
            self.tenants.pop(tenant.id, None)
            self.total_ops += tenant.stats.ops

    def stats_for(self, tenant: Executor) -> dict[str, Any]:
        """What ``Stats`` tells ``tenant``: the device and itself; everything only to an admin."""
        if getattr(tenant, "admin", False):
            return self.stats()
        return {"device": str(self.device), "device_name": self.device_name, "memory_limit": self.memory_limit}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tenants = list(self.tenants.values())
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "tenants": [{"id": t.id, "bytes": t.bytes, "storages": len(t.storages), "ops": t.stats.ops,
                         "busy_s": round(t.stats.busy_s, 6)} for t in tenants],
            "tenant_bytes": sum(t.bytes for t in tenants),
            # What the device actually holds for tenants: private storages plus one copy of each shared weight.
            "stored_bytes": sum(t.private_bytes for t in tenants) + self.blobs_nbytes,
            "shared_blobs": sum(len(b) for b in list(self.groups.values())),
            "shared_bytes": self.blobs_nbytes,
            "device_allocated": torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None,
            # The process's CPU time, at the clock's resolution (os.times counts 10 ms ticks).
            "cpu_seconds": time.process_time(),
            "uptime_s": time.time() - self.started,
            "ops": self.total_ops + sum(t.stats.ops for t in tenants),
        }
