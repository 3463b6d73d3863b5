"""The GPU server's per-tenant executor: a handle table, op templates and memory accounting.

A tenant's op stream is executed strictly in order. Nothing a client sends is trusted: every handle,
dtype, geometry and size is checked against the tenant's own table before it touches device memory,
and a failing op is reported back to that tenant (at its next sync) without affecting any other.
"""

from __future__ import annotations

import hashlib
import keyword
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from caserve.remote import protocol as P
from caserve.remote.codec import (
    DTYPE_NAMES,
    DTYPES,
    LAYOUTS,
    MEMORY_FORMATS,
    extent,
    flatten_fresh,
    takes_generator,
    written_args,
)

logger = logging.getLogger(__name__)

# Ops a client may never run: they touch files, raw memory or process state rather than tensors.
DENIED_OPS = frozenset(
    {"from_file", "_from_file", "set_", "record_stream", "_pin_memory", "pin_memory", "_cudnn_init_dropout_state",
     "_fused_adam_", "_fused_adamw_", "_use_cudnn_ctc_loss", "save", "_local_scalar_dense", "item"}
)
MAX_TEMPLATES = 65536
MAX_DIMS = 64


class TenantError(Exception):
    """An op or request of one tenant failed; reported to that tenant only."""

    def __init__(self, message: str, code: str = "op_failed") -> None:
        super().__init__(message)
        self.code = code


class QuotaError(TenantError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "quota_exceeded")


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


# ---------------------------------------------------------------------------------------------
# Shared weights


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

    def release(self, digest: bytes) -> None:
        with self._lock:
            blob = self._blobs[digest]
            blob.refs -= 1
            if blob.refs == 0:
                del self._blobs[digest]

    def has(self, digests: list[bytes]) -> list[bool]:
        with self._lock:
            return [d in self._blobs for d in digests]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._blobs.values())

    def __len__(self) -> int:
        return len(self._blobs)


# ---------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class Slot:
    dtype: torch.dtype
    geom: tuple[tuple[int, ...], tuple[int, ...], int]
    extent: int


@dataclass
class Template:
    name: str
    fn: torch._ops.OpOverload
    build: Callable[[list[torch.Tensor]], tuple[tuple, dict]]
    slots: list[Slot]
    outs: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]]
    out_nbytes: list[int]
    write_slots: frozenset[int]
    random: bool


@dataclass
class Storage:
    tensor: torch.Tensor
    geom: tuple[tuple[int, ...], tuple[int, ...], int]
    numel: int
    nbytes: int
    blob: bytes | None = None  # digest when this is a shared, read-only weight


_OP_CACHE: dict[str, torch._ops.OpOverload] = {}


def resolve_op(name: str) -> torch._ops.OpOverload:
    """``"aten.add.Tensor"`` -> the OpOverload; only ATen ops, never a denied one."""
    op = _OP_CACHE.get(name)
    if op is not None:
        return op
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "aten" or not all(p.isidentifier() for p in parts):
        raise TenantError(f"op {name!r} is not an ATen op name (aten.NAME.OVERLOAD)", "unknown_op")
    if parts[1] in DENIED_OPS:
        raise TenantError(f"op {name} is not allowed on the GPU server", "denied_op")
    try:
        op = getattr(getattr(torch.ops.aten, parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise TenantError(f"unknown op {name}", "unknown_op") from None
    _OP_CACHE[name] = op
    return op


def _check_geom(dtype: Any, size: Any, stride: Any, offset: Any) -> tuple[torch.dtype, tuple, tuple, int]:
    dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise TenantError(f"unknown dtype {dtype!r}")
    if not (isinstance(size, (list, tuple)) and isinstance(stride, (list, tuple)) and len(size) == len(stride)):
        raise TenantError("tensor geometry needs size and stride of equal rank")
    if len(size) > MAX_DIMS or not all(type(v) is int and v >= 0 for v in (*size, *stride, offset)):
        raise TenantError("tensor geometry must be non-negative integers")
    return dt, tuple(size), tuple(stride), offset


class _SpecCompiler:
    """Turns a DefineOp argument skeleton into a fast builder ``T -> (args, kwargs)``.

    The builder's source holds only ``T[i]`` (slot tensors), ``C[j]`` (constants kept out of the source)
    and the schema's own argument names, so no client text is ever evaluated.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.consts: list[Any] = []
        self.slots: list[Slot] = []

    def const(self, value: Any) -> str:
        self.consts.append(value)
        return f"C[{len(self.consts) - 1}]"

    def expr(self, value: Any) -> str:
        if value is None or isinstance(value, (bool, int, float, str)):
            return self.const(value)
        if isinstance(value, list):
            return "[" + "".join(self.expr(v) + "," for v in value) + "]"
        if isinstance(value, dict) and len(value) == 1:
            (key, arg), = value.items()
            if key == "$t":
                if not (isinstance(arg, list) and len(arg) == 5 and arg[0] == len(self.slots)):
                    raise TenantError("tensor slots must be numbered in order")
                dt, size, stride, offset = _check_geom(*arg[1:])
                self.slots.append(Slot(dt, (size, stride, offset), extent(size, stride, offset)))
                return f"T[{arg[0]}]"
            if key == "$dtype" and arg in DTYPES:
                return self.const(DTYPES[arg])
            if key == "$dev":
                return self.const(self.device)
            if key == "$layout" and arg in LAYOUTS:
                return self.const(LAYOUTS[arg])
            if key == "$mf" and arg in MEMORY_FORMATS:
                return self.const(MEMORY_FORMATS[arg])
            if key == "$cpu" and isinstance(arg, list) and len(arg) == 2 and arg[0] in DTYPES:
                if not isinstance(arg[1], (bool, int, float)):
                    raise TenantError("a CPU scalar tensor constant must hold a number")
                return self.const(torch.tensor(arg[1], dtype=DTYPES[arg[0]]))
        raise TenantError(f"cannot decode argument {value!r}")

    def compile(self, fn: torch._ops.OpOverload, args: list[Any], kwargs: dict[str, Any]) -> Callable:
        names = {a.name for a in fn._schema.arguments}
        for k in kwargs:
            if k not in names or keyword.iskeyword(k) or k == "generator":
                raise TenantError(f"{fn} has no keyword argument {k!r}")
        if len(args) > len(fn._schema.arguments):
            raise TenantError(f"{fn} takes at most {len(fn._schema.arguments)} arguments")
        src = "lambda T: ((" + "".join(self.expr(a) + "," for a in args) + "), {"
        src += "".join(f"{k!r}: {self.expr(v)}," for k, v in kwargs.items()) + "})"
        return eval(src, {"C": self.consts, "__builtins__": {}})  # noqa: S307 - source built above


def compile_template(op: P.DefineOp, device: torch.device) -> Template:
    fn = resolve_op(op.name)
    comp = _SpecCompiler(device)
    build = comp.compile(fn, op.args, op.kwargs)
    outs, out_nbytes = [], []
    for out in op.outs:
        dt, size, stride, offset = _check_geom(*out)
        outs.append((dt, size, stride, offset))
        out_nbytes.append(extent(size, stride, offset) * dt.itemsize)
    written = written_args(fn)
    write_slots: set[int] = set()
    if written:
        positional = [a.name for a in fn._schema.arguments if not a.kwarg_only]
        sub = _SpecCompiler(device)
        for i, a in enumerate(op.args):
            before = len(sub.slots)
            sub.expr(a)
            if i < len(positional) and positional[i] in written:
                write_slots.update(range(before, len(sub.slots)))
        for k, v in op.kwargs.items():
            before = len(sub.slots)
            sub.expr(v)
            if k in written:
                write_slots.update(range(before, len(sub.slots)))
    return Template(op.name, fn, build, comp.slots, outs, out_nbytes, frozenset(write_slots), takes_generator(fn))


# ---------------------------------------------------------------------------------------------
# The tenant


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
        self.bytes = 0
        self.error: P.RemoteFailure | None = None
        self.stats = TenantStats()
        self.gen = torch.Generator(device=device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

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

    # -- ops ----------------------------------------------------------------------------------

    def run_ops(self, ops: list[P.Op], payloads: list[memoryview]) -> None:
        for op in ops:
            try:
                self._dispatch(op, payloads)
            except Exception as exc:  # noqa: BLE001 - any failure of a tenant's op is reported to it
                self._fail(op, exc)

    def _fail(self, op: Any, exc: Exception) -> None:
        self.stats.errors += 1
        if self.error is None:  # later failures are usually consequences of the first
            name = getattr(self.templates.get(getattr(op, "tid", -1)), "name", type(op).__name__)
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
            dt, size, stride, _ = _check_geom(op.dtype, op.size, op.stride, 0)
            self._charge(extent(size, stride, 0) * dt.itemsize, "alloc")
            self._bind(op.handle, torch.empty_strided(size, stride, dtype=dt, device=self.device))
        elif t is P.Upload:
            self._upload(op, self._payload(payloads, op.payload))
        elif t is P.CopyIn:
            self._copy_in(op, self._payload(payloads, op.payload))
        elif t is P.BindBlob:
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
        elif t is P.ResetTemplates:
            self.templates.clear()
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
        dt, size, _, _ = _check_geom(op.dtype, op.size, [0] * len(op.size), 0)
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
        dt, size, stride, offset = _check_geom(op.dtype, op.size, op.stride, op.offset)
        src_dt, src_size, _, _ = _check_geom(op.src_dtype, op.src_size, [0] * len(op.src_size), 0)
        st = self.storages.get(op.handle)
        if st is not None and st.blob is not None:
            raise TenantError(f"storage {op.handle} is a shared read-only weight")
        dst = self._view(op.handle, Slot(dt, (size, stride, offset), extent(size, stride, offset)))
        dst.copy_(self._from_bytes(data, src_dt, src_size))

    def _run(self, op: P.Run) -> None:
        tpl = self.templates.get(op.tid)
        if tpl is None:
            raise TenantError(f"unknown op template {op.tid}")
        if len(op.slots) != len(tpl.slots) or len(op.outs) != len(tpl.outs):
            raise TenantError(f"{tpl.name}: expected {len(tpl.slots)} inputs and {len(tpl.outs)} outputs")
        tensors = [self._view(h, s) for h, s in zip(op.slots, tpl.slots)]
        if tpl.write_slots:
            for i in tpl.write_slots:
                if self.storages[op.slots[i]].blob is not None:
                    raise TenantError(f"{tpl.name} writes to storage {op.slots[i]}, a shared read-only weight")
        if tpl.outs:
            self._charge(sum(tpl.out_nbytes), tpl.name)
        args, kwargs = tpl.build(tensors)
        if tpl.random:
            kwargs["generator"] = self.gen
        result = tpl.fn(*args, **kwargs)
        if tpl.outs:
            fresh = flatten_fresh(tpl.fn, result)
            if len(fresh) != len(tpl.outs):
                raise TenantError(f"{tpl.name} returned {len(fresh)} tensors, the client expected {len(tpl.outs)}")
            for handle, tensor, want, nbytes in zip(op.outs, fresh, tpl.outs, tpl.out_nbytes):
                self._bind(handle, self._conform(tensor, want), geom=want[1:], nbytes=nbytes)

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
            dt, size, stride, offset = _check_geom(req.dtype, req.size, req.stride, req.offset)
            view = self._view(req.handle, Slot(dt, (size, stride, offset), extent(size, stride, offset)))
            host = view.contiguous().cpu().reshape(-1)
            return None, [memoryview(host.view(torch.uint8).numpy()) if host.numel() else b""]
        if t is P.Execute:
            return self._execute(req), []
        if t is P.HasBlobs:
            return self.blobs.has(list(req.digests[:4096])), []
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


def timed(fn: Callable[[], Any], stats: TenantStats) -> Any:
    start = time.perf_counter()
    try:
        return fn()
    finally:
        stats.busy_s += time.perf_counter() - start
