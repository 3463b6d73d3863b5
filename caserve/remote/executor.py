"""The GPU server's per-tenant executor: a handle table, op templates and memory accounting.

A tenant's op stream is executed strictly in order. Nothing a client sends is trusted: every handle,
dtype, geometry and size is checked against the tenant's own table before it touches device memory,
and a failing op is reported back to that tenant (at its next sync) without affecting any other.
"""

from __future__ import annotations

import logging

import msgspec
from dataclasses import dataclass
from typing import Any, Callable

import torch

from caserve.remote import protocol as P
from caserve.remote.blobs import BlobStore
from caserve.remote.codec import DTYPE_NAMES, extent, flatten_fresh
from caserve.remote.templates import (
    MAX_TEMPLATES,
    QuotaError,
    Slot,
    Template,
    TenantError,
    check_geom,
    compile_template,
)

logger = logging.getLogger(__name__)

MAX_PINS = 4096
MAX_GRAPHS = 1024
MAX_GRAPH_OPS = 100_000


def parse_size(text: str | int | None) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1024"`` -> bytes; ``0``/empty means unlimited."""
    if text is None or text == "":
        return 0
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
             "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
    s = text.strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):].strip()
    if unit not in units or not num:
        raise ValueError(f"cannot read size {text!r}; use e.g. 8GiB, 512MB or a byte count")
    return int(float(num) * units[unit])


@dataclass
class Storage:
    tensor: torch.Tensor
    geom: tuple[tuple[int, ...], tuple[int, ...], int]
    numel: int
    nbytes: int
    blob: bytes | None = None  # digest when this is a shared, read-only weight


@dataclass
class TenantStats:
    ops: int = 0
    frames: int = 0
    syncs: int = 0
    errors: int = 0
    busy_s: float = 0.0


class Tenant:
    """One client's state on the GPU server. Used by exactly one connection thread."""

    def __init__(self, tid: int, device: torch.device, blobs: BlobStore, memory_limit: int = 0) -> None:
        self.id = tid
        self.device = device
        self.blobs = blobs
        self.memory_limit = memory_limit
        self.storages: dict[int, Storage] = {}
        self.templates: dict[int, Template] = {}
        self.graphs: dict[int, list[tuple]] = {}  # graph mode: recorded records, templates resolved
        self.bytes = 0
        self.error: P.RemoteFailure | None = None
        self.stats = TenantStats()
        self.gen = torch.Generator(device=device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pinned: dict[bytes, int] = {}  # shared weights found by HasBlobs, held until bound

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
        self.storages[handle] = Storage(tensor, geom, nbytes // itemsize, nbytes, blob)
        self.bytes += nbytes

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
        for h in handles:
            st = self.storages.pop(h, None)
            if st is None:
                continue  # freeing twice or a handle whose op failed: nothing to do
            self.bytes -= st.nbytes
            if st.blob is not None:
                self.blobs.release(st.blob)

    def close(self) -> None:
        """Free everything this tenant holds (its connection ended)."""
        self.free(list(self.storages))
        self.templates.clear()
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
        for op in ops:
            try:
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
            self.templates[op.tid] = compile_template(op, self.device)
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
            self._charge(src.nbytes, "copy-on-write")
            self._bind(op.handle, src.tensor.clone(memory_format=torch.preserve_format))
        elif t is P.Seed:
            self.gen.manual_seed(op.seed)
        elif t is P.Replay:
            self._replay(op, payloads)
        elif t is P.DefineGraph:
            self._define_graph(op)
        elif t is P.ResetTemplates:
            self.templates.clear()
            self.graphs.clear()
        else:  # pragma: no cover - the decoder admits only the types above
            raise TenantError(f"unknown op record {t.__name__}")

    @staticmethod
    def _payload(payloads: list[memoryview], index: int) -> memoryview:
        if not (type(index) is int and 0 <= index < len(payloads)):
            raise TenantError(f"payload segment {index!r} does not exist")
        return payloads[index]

    @staticmethod
    def _from_bytes(data: memoryview, dtype: torch.dtype, size: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for s in size:
            numel *= s
        if numel * dtype.itemsize != len(data):
            raise TenantError(f"payload of {len(data)} bytes does not hold {size} of {dtype}")
        if numel == 0:
            return torch.empty(size, dtype=dtype)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(size)

    def _upload(self, op: P.Upload, data: memoryview) -> None:
        dt, size, _, _ = check_geom(op.dtype, op.size, [0] * len(op.size), 0)
        nbytes = len(data)
        self._charge(nbytes, "upload")
        if not op.share:
            self._bind(op.handle, self._from_bytes(data, dt, size).to(self.device))
            return
        digest = BlobStore.digest(data)

        def make() -> torch.Tensor:
            t = self._from_bytes(data, dt, size).to(self.device)
            if self.stream is not None:
                self.stream.synchronize()  # other tenants read it on their own streams
            return t

        blob = self.blobs.acquire(digest, make)
        assert blob is not None
        if blob.tensor.dtype is not dt or tuple(blob.tensor.shape) != size:
            self.blobs.release(digest)
            self._bind(op.handle, self._from_bytes(data, dt, size).to(self.device))
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
        self._run_template(tpl, op.slots, op.outs)

    def _run_template(self, tpl: Template, slots: list[int], outs: list[int]) -> None:
        if len(slots) != len(tpl.slots) or len(outs) != len(tpl.outs):
            raise TenantError(f"{tpl.name}: expected {len(tpl.slots)} inputs and {len(tpl.outs)} outputs")
        storages = self.storages
        tensors = []
        for h, slot in zip(slots, tpl.slots):
            st = storages.get(h)
            # Fast path: the slot is the storage's own layout (most arguments are whole tensors).
            if st is not None and st.geom == slot.geom and st.tensor.dtype is slot.dtype:
                tensors.append(st.tensor)
            else:
                tensors.append(self._view(h, slot))
        if tpl.write_slots:
            for i in tpl.write_slots:
                if storages[slots[i]].blob is not None:
                    raise TenantError(f"{tpl.name} writes to storage {slots[i]}, a shared read-only weight")
        if self.memory_limit and tpl.total_out_nbytes:
            self._charge(tpl.total_out_nbytes, tpl.name)
        args, kwargs = tpl.build(tensors)
        if tpl.random:
            kwargs["generator"] = self.gen
        result = tpl.call(*args, **kwargs)
        if tpl.single:
            want = tpl.outs[0]
            self._bind(outs[0], self._conform(result, want), geom=want[1:], nbytes=tpl.out_nbytes[0])
        elif tpl.outs:
            fresh = flatten_fresh(tpl.fn, result)
            if len(fresh) != len(tpl.outs):
                raise TenantError(f"{tpl.name} returned {len(fresh)} tensors, the client expected {len(tpl.outs)}")
            for handle, tensor, want, nbytes in zip(outs, fresh, tpl.outs, tpl.out_nbytes):
                self._bind(handle, self._conform(tensor, want), geom=want[1:], nbytes=nbytes)

    # -- graph mode -------------------------------------------------------------------------------

    def _define_graph(self, op: P.DefineGraph) -> None:
        if len(self.graphs) >= MAX_GRAPHS and op.gid not in self.graphs:
            raise TenantError(f"more than {MAX_GRAPHS} graphs", "limit")
        if len(op.ops) > MAX_GRAPH_OPS:
            raise TenantError(f"a graph may hold at most {MAX_GRAPH_OPS} records", "limit")
        steps: list[tuple] = []
        for rec in op.ops:
            if type(rec) is P.Run:
                tpl = self.templates.get(rec.tid)
                if tpl is None:
                    raise TenantError(f"graph {op.gid} uses unknown op template {rec.tid}")
                steps.append((tpl, rec.slots, rec.outs))  # the template is resolved once, here
            else:
                steps.append((None, rec, None))
        self.graphs[op.gid] = steps

    def _replay(self, op: P.Replay, payloads: list[memoryview]) -> None:
        """Run a graph's records with references turned into this replay's handles."""
        steps = self.graphs.get(op.gid)
        if steps is None:
            raise TenantError(f"unknown graph {op.gid}")
        base, ext = op.base, op.ext
        if type(base) is not int or base < 0:
            raise TenantError("invalid graph base handle")
        n_ext = len(ext)

        def handle(r: int) -> int:
            if r >= 0:
                return base + r
            if -r > n_ext:
                raise TenantError(f"graph {op.gid} needs external handle {-r - 1}; the replay gave {n_ext}")
            return ext[-r - 1]

        for tpl, a, b in steps:
            try:
                if tpl is not None:
                    self._run_template(tpl, [handle(r) for r in a], [handle(r) for r in b])
                else:
                    fields = {"handle": handle(a.handle)}
                    if hasattr(a, "payload"):
                        fields["payload"] = op.payload_base + a.payload
                    self._dispatch(msgspec.structs.replace(a, **fields), payloads)
            except Exception as exc:  # noqa: BLE001 - reported like an eager op's failure
                self.fail(tpl.name if tpl is not None else type(a).__name__, exc)

    def _conform(self, t: torch.Tensor, want: tuple[torch.dtype, tuple, tuple, int]) -> torch.Tensor:
        """Give an output exactly the layout the client computed, so that its views stay right."""
        dt, size, stride, offset = want
        if t.dtype is not dt:
            raise TenantError(f"output dtype {t.dtype} differs from the expected {dt}")
        if t.stride() == stride and t.shape == size and t.storage_offset() == offset:
            return t
        out = torch.empty(extent(size, stride, offset), dtype=dt, device=t.device).as_strided(size, stride, offset)
        out.copy_(t)
        return out

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
            return {**server_stats(), "tenant": self.id, "tenant_bytes": self.bytes, "tenant_ops": self.stats.ops,
                    "tenant_storages": len(self.storages), "tenant_templates": len(self.templates)}, []
        raise TenantError(f"unknown sync request {t.__name__}")  # pragma: no cover

    def _execute(self, req: P.Execute) -> Any:
        tpl = self.templates.get(req.tid)
        if tpl is None:
            raise TenantError(f"unknown op template {req.tid}")
        if len(req.slots) != len(tpl.slots):
            raise TenantError(f"{tpl.name}: expected {len(tpl.slots)} inputs")
        tensors = [self._view(h, s) for h, s in zip(req.slots, tpl.slots)]
        for i in tpl.write_slots:
            if self.storages[req.slots[i]].blob is not None:
                raise TenantError(f"{tpl.name} writes to a shared read-only weight")
        args, kwargs = tpl.build(tensors)
        if tpl.random:
            kwargs["generator"] = self.gen
        try:
            result = tpl.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the tenant with the op's name
            raise TenantError(f"{tpl.name}: {type(exc).__name__}: {exc}") from None
        fresh = {id(t) for t in flatten_fresh(tpl.fn, result)}
        handle = req.first_handle
        if type(handle) is not int or handle < 0:
            raise TenantError("invalid first handle")

        def describe(value: Any) -> Any:
            nonlocal handle
            if isinstance(value, torch.Tensor):
                if id(value) not in fresh:
                    return None  # a written argument: the client already holds it
                self._charge(value.numel() * value.element_size(), tpl.name)
                self._bind(handle, value)
                handle += 1
                return {"$t": [handle - 1, DTYPE_NAMES[value.dtype], list(value.shape), list(value.stride()),
                               value.storage_offset()]}
            if isinstance(value, (list, tuple)):
                return [describe(v) for v in value]
            if isinstance(value, (bool, int, float)) or value is None:
                return value
            if isinstance(value, torch.dtype):
                return {"$dtype": DTYPE_NAMES[value]}
            raise TenantError(f"{tpl.name} returned an unsupported {type(value).__name__}")

        return describe(result)
