"""The GPU server's per-tenant executor: a handle table, op templates and memory accounting.

A tenant's op stream is executed strictly in order. Nothing a client sends is trusted: every handle,
dtype, geometry and size is checked against the tenant's own table before it touches device memory,
and a failing op is reported back to that tenant (at its next sync) without affecting any other.
"""

from __future__ import annotations

import logging
import math

import msgspec
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.server import cudagraph
from caserve.remote.server.blobs import BlobStore
from caserve.remote.wire.codec import DTYPE_NAMES, extent, flatten_fresh
from caserve.remote.server.replay import GraphProgram, Output, compile_graph
from caserve.remote.server.runner import compile_runner, device_copy, payload_at, tensor_from_bytes
from caserve.remote.server.errors import QuotaError, TenantError
from caserve.remote.server.opsurface import OpSurface
from caserve.remote.server.templates import Slot, Template, check_geom, check_scalars, compile_template
from caserve.remote.server.uploads import PartialUploads

logger = logging.getLogger(__name__)

# The limits a tenant is told in Welcome (caserve.remote.wire.protocol.Limits), by their old names.
MAX_PINS = P.LIMITS.max_pins
MAX_TEMPLATES = P.LIMITS.max_templates
MAX_GRAPHS = P.LIMITS.max_graphs
MAX_GRAPH_OPS = P.LIMITS.max_graph_records
MAX_TENANT_GRAPH_OPS = P.LIMITS.max_tenant_graph_records  # compiled code is kept per record
MAX_CACHED_VIEWS = 16  # per storage


class Executor(Protocol):
    """What a connection needs of the thing that runs one tenant's op stream. :class:`Tenant` is the
    Python implementation; another (native code) can stand behind the same calls."""

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


@dataclass(slots=True)
class Storage:
    tensor: torch.Tensor
    geom: tuple[tuple[int, ...], tuple[int, ...], int]
    numel: int
    nbytes: int
    blob: bytes | None = None  # digest when this is a shared, read-only weight (or a view of one)
    views: dict | None = None  # graph replays: views of it that programs read, by geometry (see _replay_views)
    # Views of a storage made by ops (alias, view.dtype, ...) are storages of their own that count no
    # bytes: ``root`` is the storage whose memory they view; a root freed while ``aliases`` remain keeps
    # its bytes charged (``freed``) until the last of them goes.
    root: "Storage | None" = None
    aliases: int = 0
    freed: bool = False


@dataclass
class TenantStats:
    ops: int = 0
    frames: int = 0
    syncs: int = 0
    errors: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of this tenant's requests (its connection thread)


class Tenant:
    """One client's state on the GPU server. Used by exactly one connection thread."""

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

    # -- storages -----------------------------------------------------------------------------

    def _charge(self, nbytes: int, what: str) -> None:
        if self.memory_limit and self.bytes + nbytes > self.memory_limit:
            raise QuotaError(
                f"{what} needs {nbytes} bytes; tenant {self.id} holds {self.bytes} of its {self.memory_limit}-byte limit"
            )

    def _bind(self, handle: int, tensor: torch.Tensor, blob: bytes | None = None, geom: tuple | None = None,
              nbytes: int | None = None) -> None:
        """Name ``tensor`` ``handle``; ``geom``/``nbytes`` when the caller already knows them."""
        if type(handle) is not int or handle in self.storages:
            raise TenantError(f"storage handle {handle!r} is invalid or already in use")
        if geom is None:
            geom = (tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        itemsize = tensor.dtype.itemsize
        if nbytes is None:
            nbytes = extent(*geom) * itemsize
            if nbytes > tensor.untyped_storage().nbytes():
                raise TenantError(f"a tensor of layout {geom} reaches past its own memory")
        self.storages[handle] = Storage(tensor, geom, nbytes // itemsize, nbytes, blob)
        self.bytes += nbytes

    def bind_alias(self, handle: int, tensor: torch.Tensor, base: int, geom: tuple, numel: int | None = None) -> None:
        """Name ``tensor``, a view of storage ``base`` (checked by the template), ``handle``: it inherits the
        base's shared, read-only status and counts no new bytes; the base's memory lives as long as it.
        ``numel``: the elements ``geom`` reaches, when the caller already knows them."""
        if type(handle) is not int or handle in self.storages:
            raise TenantError(f"storage handle {handle!r} is invalid or already in use")
        st = self.storages[base]
        root = st.root or st
        if numel is None:
            numel = extent(*geom)
        if numel * tensor.dtype.itemsize > tensor.untyped_storage().nbytes():  # never, after the meta check
            raise TenantError(f"a view of layout {geom} reaches past storage {base}")
        self.storages[handle] = Storage(tensor, geom, numel, 0, root.blob, None, root)
        root.aliases += 1

    @property
    def private_bytes(self) -> int:
        return sum(st.nbytes for st in list(self.storages.values()) if st.blob is None)

    def _view(self, handle: int, slot: Slot) -> torch.Tensor:
        st = self.storages.get(handle)
        if st is None:
            raise TenantError(f"unknown storage handle {handle}")
        if st.geom == slot.geom and st.tensor.dtype is slot.dtype:
            return st.tensor
        if st.tensor.dtype is not slot.dtype:
            raise TenantError(f"storage {handle} holds {st.tensor.dtype}, not {slot.dtype}")
        if slot.extent > st.numel:
            raise TenantError(f"view {slot.geom} reaches past the {st.numel} elements of storage {handle}")
        size, stride, offset = slot.geom
        return st.tensor.as_strided(size, stride, offset)

    def free(self, handles: list[int]) -> None:
        if self.cuda_graphs is not None:
            self.cuda_graphs.forget_handles(handles)
        if self.uploads.partial:
            for h in handles:
                part = self.uploads.partial.get(h)
                if part is not None and self.uploads.abandon(h):
                    self.bytes -= part.nbytes
        for h in handles:
            st = self.storages.pop(h, None)
            if st is None:
                continue  # freeing twice or a handle whose op failed: nothing to do
            root = st.root
            if root is not None:  # a view: its root goes with the last of them, once freed itself
                root.aliases -= 1
                if root.aliases or not root.freed:
                    continue
                st = root
            elif st.aliases:
                st.freed = True
                continue
            self.bytes -= st.nbytes
            if st.blob is not None:
                self.blobs.release(st.blob)

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

    def _pin_blobs(self, digests: list[bytes]) -> list[bool]:
        """Which weights the server holds; each one found stays pinned for this tenant's next BindBlob,
        so that another tenant letting go of it in between cannot make the answer wrong."""
        if len(digests) > MAX_PINS or sum(self.pinned.values()) + len(digests) > MAX_PINS:
            raise TenantError(f"more than {MAX_PINS} shared weights asked for and not yet bound", "limit")
        found = []
        for digest in digests:
            blob = self.blobs.acquire(digest)
            if blob is not None:
                self.pinned[digest] = self.pinned.get(digest, 0) + 1
            found.append(blob is not None)
        return found

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
            pending = self.uploads.partial.get(op.handle) if type(op.handle) is int else None
            if pending is not None and self.uploads.abandon(op.handle):
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

    # -- graph mode -------------------------------------------------------------------------------

    def _define_graph(self, op: P.DefineGraph) -> None:
        if len(self.graphs) >= MAX_GRAPHS and op.gid not in self.graphs:
            raise TenantError(f"more than {MAX_GRAPHS} graphs", "limit")
        if len(op.ops) > MAX_GRAPH_OPS:
            raise TenantError(f"a graph may hold at most {MAX_GRAPH_OPS} records", "limit")
        total = self.graph_ops - self.graph_sizes.get(op.gid, 0) + len(op.ops)
        if total > MAX_TENANT_GRAPH_OPS:
            raise TenantError(f"a tenant's graphs may hold at most {MAX_TENANT_GRAPH_OPS} records together", "limit")
        if self.cuda_graphs is not None:
            self.cuda_graphs.forget_graph(op.gid)
        self.graphs[op.gid] = compile_graph(op, self.templates, self.device)
        self.graph_sizes[op.gid] = len(op.ops)
        self.graph_ops = total

    def _replay(self, op: P.Replay, payloads: list[memoryview]) -> None:
        """Run a graph with references turned into this replay's handles (see caserve.remote.server.replay).

        ``op.keep`` None: every handle the graph makes is bound. A list: only those references are bound;
        everything else the graph made is dropped when the replay ends.
        """
        prog = self.graphs.get(op.gid)
        if prog is None:
            raise TenantError(f"unknown graph {op.gid}")
        base = op.base
        if type(base) is not int or base < 0:
            raise TenantError("invalid graph base handle")
        kept = None if op.keep is None else prog.check_keep(op.keep)
        run, need = prog.run, prog.out_nbytes
        if run is not None and kept is not None:
            run, need = prog.for_keep(kept)
        views = self._replay_views(prog, op, kept, need) if run is not None else None
        if views is None:  # not compiled, or a check failed: the record-by-record path says which op
            self._replay_records(prog, op, payloads, kept)
            return
        if kept is not None and self.cuda_graphs is not None:  # a captured step: maybe one CUDA graph replay
            run = self.cuda_graphs.runner(prog, op, kept, run, views, need)
        regs: list[Any] = [None] * prog.n_regs
        try:
            run(regs, views, op.scalars, self.gen, payloads, op.payload_base)
        except Exception as exc:  # noqa: BLE001 - reported like an eager op's failure
            step = prog.step_of(exc)
            self.fail(prog.names[step] if step is not None else "Replay", exc)
            if step is not None:  # the rest goes on record by record, as if it had run that way
                self._replay_records(prog, op, payloads, kept, step + 1, regs)
            return
        self._bind_outputs(base, regs, prog.outputs if kept is None else kept)

    def _replay_views(self, prog: GraphProgram, op: P.Replay, kept: list[Output] | None,
                      need: int) -> list[Any] | None:
        """The external views a compiled replay runs on, or None when any check fails: an external handle
        unknown, of another dtype, too small or a shared weight it writes; scalars that do not fit; a
        handle it binds already in use; no room for the ``need`` bytes it holds at most."""
        ext, scalars, storages = op.ext, op.scalars, self.storages
        if len(ext) < prog.n_ext or len(scalars) != prog.n_scalars:
            return None
        if scalars and tuple(map(type, scalars)) != prog.scalar_types:
            return None
        if self.memory_limit and self.bytes + need > self.memory_limit:
            return None
        refs = prog.out_refs if kept is None else [o.ref for o in kept]
        if any(map(storages.__contains__, map(op.base.__add__, refs))):
            return None
        views: list[Any] = [None] * prog.n_views
        get = storages.get
        for j, dtype, reach, written, uses in prog.ext_plan:
            st = get(ext[j])
            if st is None:
                return None
            t = st.tensor
            if t.dtype is not dtype or reach > st.numel or (written and st.blob is not None):
                return None
            for geom, i in uses:
                if geom == st.geom:
                    views[i] = t
                elif written:  # an op that writes may also restride its argument: a fresh view each time
                    views[i] = t.as_strided(*geom)
                else:  # read-only views live with the storage, so that replays after the first reuse them
                    cache = st.views
                    if cache is None:
                        cache = st.views = {}
                    v = cache.get(geom)
                    if v is None:
                        if len(cache) >= MAX_CACHED_VIEWS:
                            cache.clear()
                        v = cache[geom] = t.as_strided(*geom)
                    views[i] = v
        return views

    def _bind_outputs(self, base: int, regs: list[Any], outputs: list[Output]) -> None:
        storages = self.storages
        nbytes = 0
        for o in outputs:
            storages[base + o.ref] = Storage(regs[o.reg], o.geom, o.numel, o.nbytes, None)
            nbytes += o.nbytes
        self.bytes += nbytes

    def _replay_records(self, prog: GraphProgram, op: P.Replay, payloads: list[memoryview],
                        kept: list[Output] | None, start: int = 0, regs: list[Any] | None = None) -> None:
        """Run a graph record by record from step ``start``, each through the table like an eager record;
        ``regs``: what a compiled run that failed made so far, bound first."""
        base, ext, scalars = op.base, op.ext, op.scalars
        n_ext = len(ext)
        # A keep-replay binds what it does not keep under temporary handles, below every handle in the
        # table (so never one the client holds), and drops them at the end.
        temp: dict[int, int] = {}
        if kept is not None:
            keep = {o.ref for o in kept}
            low = min(min(self.storages, default=0), 0) - 1
            temp = {o.ref: low - i for i, o in enumerate(prog.outputs) if o.ref not in keep}

        def handle(r: int) -> int:
            if r >= 0:
                return temp.get(r, base + r)
            if -r > n_ext:
                raise TenantError(f"graph {op.gid} needs external handle {-r - 1}; the replay gave {n_ext}")
            return ext[-r - 1]

        try:
            if regs is not None:
                storages = self.storages
                for o in prog.outputs:
                    if regs[o.reg] is not None and handle(o.ref) not in storages:
                        self._bind(handle(o.ref), regs[o.reg], geom=o.geom, nbytes=o.nbytes)
            for i in range(start, len(prog.steps)):
                tpl, a, b = prog.steps[i]
                try:
                    if tpl is not None:
                        used = prog.scalar_offsets[i]
                        mine = scalars[used:used + len(tpl.scalar_types)]
                        tpl.runner(self, [handle(r) for r in a], [handle(r) for r in b], mine)
                    else:
                        fields = {"handle": handle(a.handle)}
                        if hasattr(a, "payload"):
                            fields["payload"] = op.payload_base + a.payload
                        self._dispatch(msgspec.structs.replace(a, **fields), payloads)
                except Exception as exc:  # noqa: BLE001 - reported like an eager op's failure
                    self.fail(prog.names[i], exc)
            if prog.n_scalars != len(scalars):
                raise TenantError(f"graph {op.gid} takes {prog.n_scalars} scalars; the replay gave {len(scalars)}")
        finally:
            if temp:
                self.free(list(temp.values()))

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
