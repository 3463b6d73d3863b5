"""The GPU server's per-tenant executor: the :class:`Executor` interface a connection drives, and
:class:`Tenant`, its Python implementation (op templates, records, sync requests; its storage table and
quota are :mod:`caserve.remote.server.tenant_memory`, its graphs :mod:`caserve.remote.server.tenant_graphs`,
its uploads in parts :mod:`caserve.remote.server.uploads`).

A tenant's op stream is executed strictly in order, by its connection's thread. Nothing a client sends
is trusted: every handle, dtype, geometry and size is checked against the tenant's own table before it
touches device memory, and a failing op is reported back to that tenant (at its next sync) and changes
no other tenant's state. Tenants still share the process and, on a GPU, one CUDA context: a device-side
fault (an out-of-range index tripping a device assert) reaches every tenant (docs/remote.md, "What is
still shared").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.server import cudagraph
from caserve.remote.server.blobs import BlobStore
from caserve.remote.wire.codec import DTYPE_NAMES, extent, flatten_fresh
from caserve.remote.server.replay import GraphProgram
from caserve.remote.server.runner import compile_runner, device_copy, payload_at, tensor_from_bytes
from caserve.remote.server.errors import TenantError
from caserve.remote.server.opsurface import OpSurface
from caserve.remote.server.templates import Slot, Template, check_geom, check_scalars, compile_template
from caserve.remote.server.tenant_graphs import TenantGraphs
from caserve.remote.server.tenant_memory import Storage, TenantMemory
from caserve.remote.server.uploads import PartialUploads

logger = logging.getLogger(__name__)

# The limits a tenant is told in Welcome (caserve.remote.wire.protocol.Limits), by their old names.
MAX_TEMPLATES = P.LIMITS.max_templates


class Executor(Protocol):
    """What a connection and the server's figures need of the thing that runs one tenant's op stream.
    :class:`Tenant` is the only implementation today (``GPUServer.new_tenant`` makes one); another, in
    native code say, would need only these calls (CUDA graphs, :mod:`caserve.remote.server.cudagraph`,
    are Tenant's own)."""

    id: int
    stats: "TenantStats"
    stream: Any  # the CUDA stream the connection runs this tenant's frames on, or None
    admin: bool  # it presented the admin token: Stats describes every tenant
    bytes: int  # device bytes this tenant is charged for (shared weights counted in full)
    storages: dict

    @property
    def private_bytes(self) -> int: ...  # device bytes it alone holds

    def run_ops(self, ops: list[P.Op], payloads: list[memoryview]) -> None: ...
    def sync(self, req: P.SyncRequest, server_stats: Callable[[], dict]) -> tuple[Any, list[memoryview | bytes]]: ...
    def fail(self, name: str, exc: Exception) -> None: ...
    def take_error(self) -> P.RemoteFailure | None: ...
    def close(self) -> None: ...


@dataclass
class TenantStats:
    ops: int = 0
    frames: int = 0
    syncs: int = 0
    errors: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of this tenant's requests (its connection thread)


class Tenant(TenantGraphs, TenantMemory):
    """One client's state on the GPU server: storages (:class:`TenantMemory`), templates, graphs
    (:class:`TenantGraphs`), its generator and stream. Used by exactly one connection thread."""

    def __init__(self, tid: int, device: torch.device, blobs: BlobStore, memory_limit: int = 0,
                 surface: OpSurface | None = None) -> None:
        self.id = tid
        self.device = device
        self.surface = surface or OpSurface()
        self.blobs = blobs
        self.memory_limit = memory_limit
        self.storages: dict[int, Storage] = {}
        self.templates: dict[int, Template] = {}
        self.graphs: dict[int, GraphProgram] = {}  # graph mode: checked and compiled DefineGraphs
        self.graph_sizes: dict[int, int] = {}  # graph id -> its records (MAX_TENANT_GRAPH_OPS)
        self.graph_ops = 0
        self.bytes = 0
        self.error: P.RemoteFailure | None = None
        self.stats = TenantStats()
        self.gen = torch.Generator(device=device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pinned: dict[bytes, int] = {}  # shared weights found by HasBlobs, held until bound
        self.uploads = PartialUploads()  # uploads in parts, charged while incomplete (see uploads.py)
        self.cuda_graphs = cudagraph.for_tenant(self)  # captured steps as CUDA graphs (None: not on this device)
        self.admin = False  # an admin token: Stats describes every tenant

    def close(self) -> None:
        """Free everything this tenant holds (its connection ended)."""
        self.free(list(self.storages) + list(self.uploads.partial))
        if self.cuda_graphs is not None:
            self.cuda_graphs.clear()
        self.templates.clear()
        self.graphs.clear()
        for digest, pins in self.pinned.items():
            for _ in range(pins):
                self.blobs.release(digest)
        self.pinned.clear()

    # -- ops ----------------------------------------------------------------------------------

    def run_ops(self, ops: list[P.Op], payloads: list[memoryview]) -> None:
        stats, run = self.stats, P.Run
        for op in ops:
            try:
                if type(op) is run:  # most records: straight to the template's runner
                    stats.ops += 1
                    self._run(op)
                else:
                    self._dispatch(op, payloads)
            except Exception as exc:  # noqa: BLE001 - any failure of a tenant's op is reported to it
                self.fail(self.op_name(op), exc)

    def op_name(self, op: Any) -> str:
        """What to call a record in an error report: its ATen op's name when it runs a template."""
        tpl = self.templates.get(getattr(op, "tid", None)) if type(op) is P.Run else None
        return tpl.name if tpl is not None else type(op).__name__

    def fail(self, name: str, exc: Exception) -> None:
        """Record a failure of this tenant's op ``name``; the first since the last reply is reported."""
        self.stats.errors += 1
        if self.error is None:  # later failures are usually consequences of the first
            code = exc.code if isinstance(exc, TenantError) else "op_failed"
            self.error = P.RemoteFailure(name, f"{type(exc).__name__}: {exc}", code)
            logger.warning("tenant %d: %s failed: %s", self.id, name, exc)

    def take_error(self) -> P.RemoteFailure | None:
        err, self.error = self.error, None
        return err

    def _dispatch(self, op: P.Op, payloads: list[memoryview]) -> None:
        self.stats.ops += 1
        t = type(op)
        if t is P.Run:
            self._run(op)
        elif t is P.DefineOp:
            if len(self.templates) >= MAX_TEMPLATES and op.tid not in self.templates:
                raise TenantError(f"more than {MAX_TEMPLATES} op templates", "limit")
            tpl = compile_template(op, self.device, self.surface)
            tpl.runner = compile_runner(tpl, Storage)
            self.templates[op.tid] = tpl
        elif t is P.Free:
            self.free(op.handles)
        elif t is P.Alloc:
            dt, size, stride, _ = check_geom(op.dtype, op.size, op.stride, 0)
            self._charge(extent(size, stride, 0) * dt.itemsize, "alloc")
            self._bind(op.handle, torch.empty_strided(size, stride, dtype=dt, device=self.device))
        elif t is P.Upload:
            self._upload(op, self._payload(payloads, op.payload))
        elif t is P.CopyIn:
            self._copy_in(op, self._payload(payloads, op.payload))
        elif t is P.UploadPart:
            self._upload_part(op, self._payload(payloads, op.payload))
        elif t is P.BindBlob:
            pins = self.pinned.get(op.digest, 0)
            if pins:  # the reference HasBlobs took for this tenant becomes the handle's
                self.pinned[op.digest] = pins - 1
                blob = self.blobs.peek(op.digest)
            else:
                blob = self.blobs.acquire(op.digest)
            if blob is None:
                raise TenantError("no shared weight with that digest")
            try:
                self._charge(blob.nbytes, "shared weight")
                self._bind(op.handle, blob.tensor, blob=op.digest)
            except TenantError:
                self.blobs.release(op.digest)
                raise
        elif t is P.CopyStorage:
            src = self.storages.get(op.src)
            if src is None:
                raise TenantError(f"unknown storage handle {op.src}")
            self._charge(src.numel * src.tensor.dtype.itemsize, "copy-on-write")
            self._bind(op.handle, src.tensor.clone(memory_format=torch.preserve_format))
        elif t is P.Seed:
            self.gen.manual_seed(op.seed)
        elif t is P.Replay:
            self._replay(op, payloads)
        elif t is P.DefineGraph:
            self._define_graph(op)
        elif t is P.ResetTemplates:
            if self.cuda_graphs is not None:
                self.cuda_graphs.clear()
            self.templates.clear()
            self.graphs.clear()
            self.graph_sizes.clear()
            self.graph_ops = 0
        else:  # pragma: no cover - the decoder admits only the types above
            raise TenantError(f"unknown op record {t.__name__}")

    _payload = staticmethod(payload_at)
    _from_bytes = staticmethod(tensor_from_bytes)

    def _upload_part(self, op: P.UploadPart, data: memoryview) -> None:
        """One part of an upload too large for a frame (see caserve.remote.server.uploads)."""
        try:
            if op.start == 0:
                dt, size, _, _ = check_geom(op.dtype, op.size, [0] * len(op.size), 0)
                if type(op.handle) is not int or op.handle in self.storages:
                    raise TenantError(f"storage handle {op.handle!r} is invalid or already in use")
                nbytes = math.prod(size) * dt.itemsize
                self._charge(nbytes, "upload")
                self.uploads.begin(op, lambda: torch.empty(size, dtype=dt, device=self.device), nbytes)
                self.bytes += nbytes  # counted while incomplete; _bind counts it again once complete
            part = self.uploads.add(op, data)
        except TenantError:  # a part sent wrong ends its upload: nothing half-written stays charged
            pending = self.uploads.abandon(op.handle)
            if pending is not None:
                self.bytes -= pending.nbytes
            raise
        if part is None:
            return
        self.bytes -= part.nbytes
        if not op.share:
            self._bind(op.handle, part.tensor)
            return
        digest = part.hasher.digest()

        def made() -> torch.Tensor:
            if self.stream is not None:
                self.stream.synchronize()  # other tenants read it on their own streams
            return part.tensor

        self._charge(part.nbytes, "shared weight")
        blob = self.blobs.acquire(digest, made)
        assert blob is not None
        if blob.tensor.dtype is not part.tensor.dtype or blob.tensor.shape != part.tensor.shape:
            self.blobs.release(digest)  # the same bytes as another dtype or shape: kept private
            self._bind(op.handle, part.tensor)
            return
        self._bind(op.handle, blob.tensor, blob=digest)

    def _upload(self, op: P.Upload, data: memoryview) -> None:
        dt, size, _, _ = check_geom(op.dtype, op.size, [0] * len(op.size), 0)
        nbytes = len(data)
        self._charge(nbytes, "upload")
        if not op.share:
            self._bind(op.handle, device_copy(self._from_bytes(data, dt, size), self.device))
            return
        digest = BlobStore.digest(data)

        def make() -> torch.Tensor:
            t = device_copy(self._from_bytes(data, dt, size), self.device)
            if self.stream is not None:
                self.stream.synchronize()  # other tenants read it on their own streams
            return t

        blob = self.blobs.acquire(digest, make)
        assert blob is not None
        if blob.tensor.dtype is not dt or tuple(blob.tensor.shape) != size:
            self.blobs.release(digest)
            self._bind(op.handle, device_copy(self._from_bytes(data, dt, size), self.device))
            return
        self._bind(op.handle, blob.tensor, blob=digest)

    def _copy_in(self, op: P.CopyIn, data: memoryview) -> None:
        dt, size, stride, offset = check_geom(op.dtype, op.size, op.stride, op.offset)
        src_dt, src_size, _, _ = check_geom(op.src_dtype, op.src_size, [0] * len(op.src_size), 0)
        st = self.storages.get(op.handle)
        if st is not None and st.blob is not None:
            raise TenantError(f"storage {op.handle} is a shared read-only weight")
        dst = self._view(op.handle, Slot(dt, (size, stride, offset), extent(size, stride, offset)))
        dst.copy_(self._from_bytes(data, src_dt, src_size))

    def _run(self, op: P.Run) -> None:
        tpl = self.templates.get(op.tid)
        if tpl is None:
            raise TenantError(f"unknown op template {op.tid}")
        tpl.runner(self, op.slots, op.outs, op.scalars)  # type: ignore[misc]  # compiled with the template

    # -- sync requests ------------------------------------------------------------------------

    def sync(self, req: P.SyncRequest, server_stats: Callable[[], dict]) -> tuple[Any, list[memoryview | bytes]]:
        """Answer a sync request: its value and payload segments."""
        self.stats.syncs += 1
        t = type(req)
        if t is P.Fetch:
            dt, size, stride, offset = check_geom(req.dtype, req.size, req.stride, req.offset)
            view = self._view(req.handle, Slot(dt, (size, stride, offset), extent(size, stride, offset)))
            host = view.contiguous().cpu().reshape(-1)
            return None, [memoryview(host.view(torch.uint8).numpy()) if host.numel() else b""]
        if t is P.Execute:
            return self._execute(req), []
        if t is P.HasBlobs:
            return self._pin_blobs(req.digests), []
        if t is P.Barrier:
            if self.stream is not None:
                self.stream.synchronize()
            return True, []
        if t is P.Stats:
            return {"shared_blobs": len(self.blobs), "shared_bytes": self.blobs.nbytes,  # this trust group's
                    "cpu_seconds": self.stats.cpu_s, **server_stats(), "tenant": self.id, "tenant_bytes": self.bytes,
                    "tenant_ops": self.stats.ops, "tenant_storages": len(self.storages),
                    "tenant_templates": len(self.templates), "tenant_cpu_seconds": self.stats.cpu_s}, []
        raise TenantError(f"unknown sync request {t.__name__}")  # pragma: no cover

    def _execute(self, req: P.Execute) -> Any:
        """Run a template now and describe what it returned. Its outputs are charged before it runs: their
        true sizes when the meta call knew them, else (data-dependent shapes) the bound metacheck gives; an op
        with neither (only with ``--allow-any-op``) is charged after the call, before its outputs are bound."""
        tpl = self.templates.get(req.tid)
        if tpl is None:
            raise TenantError(f"unknown op template {req.tid}")
        if len(req.slots) != len(tpl.slots):
            raise TenantError(f"{tpl.name}: expected {len(tpl.slots)} inputs")
        handle = req.first_handle
        if type(handle) is not int or handle < 0:
            raise TenantError("invalid first handle")
        check_scalars(tpl, req.scalars)
        tensors = [self._view(h, s) for h, s in zip(req.slots, tpl.slots)]
        for i in tpl.write_slots:
            if self.storages[req.slots[i]].blob is not None:
                raise TenantError(f"{tpl.name} writes to a shared read-only weight")
        self._charge(tpl.charge, tpl.name)
        args, kwargs = tpl.build(tensors, req.scalars)
        if tpl.random:
            kwargs["generator"] = self.gen
        try:
            result = tpl.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the tenant with the op's name
            raise TenantError(f"{tpl.name}: {type(exc).__name__}: {exc}") from None
        fresh = flatten_fresh(tpl.fn, result)
        if tpl.meta_known:
            if len(fresh) != len(tpl.alias_of):
                raise TenantError(f"{tpl.name} returned {len(fresh)} tensors; its meta kernel made {len(tpl.alias_of)}")
            views = dict(zip(map(id, fresh), tpl.alias_of))
        else:  # no meta kernel: a tensor over an input's memory is a view of that input
            ptrs = {t.untyped_storage().data_ptr(): i for i, t in enumerate(tensors) if t.numel()}
            views = {id(t): ptrs.get(t.untyped_storage().data_ptr()) if t.numel() else None for t in fresh}
            self._charge(sum(t.untyped_storage().nbytes() for t in fresh if views[id(t)] is None), tpl.name)

        def describe(value: Any) -> Any:
            nonlocal handle
            if isinstance(value, torch.Tensor):
                if id(value) not in views:
                    return None  # a written argument: the client already holds it
                geom = (tuple(value.shape), tuple(value.stride()), value.storage_offset())
                base = views[id(value)]
                if base is None:
                    self._bind(handle, value)
                else:
                    self.bind_alias(handle, value, req.slots[base], geom)
                handle += 1
                return {"$t": [handle - 1, DTYPE_NAMES[value.dtype], list(geom[0]), list(geom[1]), geom[2]]}
            if isinstance(value, (list, tuple)):
                return [describe(v) for v in value]
            if isinstance(value, (bool, int, float)) or value is None:
                return value
            if isinstance(value, torch.dtype):
                return {"$dtype": DTYPE_NAMES[value]}
            raise TenantError(f"{tpl.name} returned an unsupported {type(value).__name__}")

        return describe(result)
