"""Client-side dispatch: every ATen op on a caserve tensor comes through :func:`dispatch`.

For each op the client

1. builds a *signature*: the op plus each argument's value, or for a tensor its dtype and geometry;
2. looks up the signature's *plan* (computed once with meta kernels): the output geometry, and which
   outputs are fresh, which are views of an input (never sent) and which are written inputs;
3. mints handles for fresh outputs, appends a ``Run`` record to the frame buffer and returns at once.

Sync points (``.item()``, ``.cpu()``, data-dependent shapes) flush the buffer and wait once.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.wire.codec import DTYPE_NAMES, DTYPES, fresh_returns, scalar_slots
from caserve.remote.client.capture import weights_changed
from caserve.remote.client.planner import Fresh, Node, Plan, Seq, View, Written, make_plan
from caserve.remote.wire.errors import RemoteError
from caserve.remote.client.session import FLUSH_BYTES, FLUSH_OPS, Session, session_of
from caserve.remote.client.tensor import LAZY, LIVE, RemoteStorage, RemoteTensor, ready, resize_empty, wrap

logger = logging.getLogger(__name__)

aten = torch.ops.aten
SHARE_MIN_BYTES = 64 * 1024  # parameters this large are stored once for all tenants
MAX_CACHE = 16384  # plans per session (each defines at most one of the server's templates)
_F, _B, _CPU = "f", "b", "cpu"  # key tags that keep 1, 1.0 and True apart


# ---------------------------------------------------------------------------------------------
# Signatures


def _sig(x: Any, slots: list[RemoteTensor]) -> Any:
    tx = type(x)
    if tx is RemoteTensor:
        slots.append(x)
        return x._cs
    if tx is int or tx is str or x is None:
        return x
    if tx is float:
        return (_F, x)
    if tx is bool:
        return (_B, x)
    if tx is list or tx is tuple:
        return tuple([_sig(e, slots) for e in x])
    if isinstance(x, RemoteTensor):
        slots.append(x)
        return x._cs
    if isinstance(x, torch.Tensor):
        if x.device.type == "cpu" and x.dim() == 0:
            return (_CPU, x.dtype, x.item())
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found a {x.device} tensor of shape "
            f"{tuple(x.shape)} among caserve tensors"
        )
    return x  # dtype, device, layout, memory format: hashable and exact


def _session_of(slots: list[RemoteTensor], args: Any, kwargs: dict) -> Session:
    if slots:
        return slots[0]._st.session
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.device) and v.type == "caserve":
            return session_of(v)
    raise RemoteError("op has no caserve tensor or device argument")


# ---------------------------------------------------------------------------------------------
# Running a plan


def _unshare(st: RemoteStorage) -> None:
    """Copy-on-write: the first write to a shared weight gives this tenant a private copy."""
    new = st.session.new_handle()
    st.session.emit(P.CopyStorage(new, st.handle))
    st.session.free(st.handle)
    st.handle, st.shared = new, False
    weights_changed()  # captured steps that read this weight must send its new handle
    logger.debug("copy-on-write of a shared weight (storage %d)", new)


def _build(n: Node, slots: list[RemoteTensor], fresh: list[RemoteStorage]) -> Any:
    """The op's return value from its plan's output tree (``fresh``: the storages minted for this call)."""
    t = type(n)
    if t is Fresh:
        return wrap(fresh[n.index], n.cs, n.nbytes)
    if t is Written:
        return slots[n.slot]
    if t is View:
        base = slots[n.slot]
        if torch.is_inference_mode_enabled() and not base.is_inference():
            # A view of a normal tensor must be a normal tensor: torch shares the base's version counter.
            with torch.inference_mode(False):
                return wrap(base._st, n.cs, n.nbytes)
        return wrap(base._st, n.cs, n.nbytes)
    if t is Seq:
        items = [_build(c, slots, fresh) for c in n.items]
        return items if n.is_list else tuple(items)
    return n.value


def dispatch(func, args: tuple, kwargs: dict) -> Any:
    """Entry point from ``RemoteTensor.__torch_dispatch__``: each op's route is decided once."""
    route = _ROUTES.get(id(func))  # OpOverloads live as long as torch; id() hashes faster than they do
    if route is None:
        route = _ROUTES[id(func)] = _route(func)
    return route(func, args, kwargs)


def _route(func):
    special = SPECIAL.get(func)
    if special is not None:
        return lambda func, args, kwargs: special(args, kwargs)
    if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
        # Under inference mode, composite ops (aten.to, aten.item, ...) arrive whole; run their
        # decomposition so that only primitive ops are planned and sent.
        return lambda func, args, kwargs: func.decompose(*args, **kwargs)
    return run_op


_ROUTES: dict[Any, Any] = {}


def run_op(func, args: tuple, kwargs: dict) -> Any:
    """Send one op through the signature cache (see the module docstring)."""
    fid = id(func)
    lift = _LIFT.get(fid)
    if lift is None:
        lift = _LIFT[fid] = scalar_slots(func)
    lift_pos, lift_names = lift
    slots: list[RemoteTensor] = []
    scalars: list = []
    parts = []
    i = 0
    for a in args:  # _sig inlined for the common top-level cases: this runs for every op
        ta = type(a)
        if ta is RemoteTensor:
            slots.append(a)
            parts.append(a._cs)
        elif (ta is int or ta is float or ta is bool) and i in lift_pos:
            parts.append(ta)  # a scalar slot: its type is planned, its value travels with the call
            scalars.append(a)
        elif ta is int or a is None:
            parts.append(a)
        else:
            parts.append(_sig(a, slots))
        i += 1
    kparts = None
    if kwargs:
        kparts = []
        for k, v in kwargs.items():
            tv = type(v)
            if (tv is int or tv is float or tv is bool) and k in lift_names:
                kparts.append((k, tv))
                scalars.append(v)
            else:
                kparts.append((k, _sig(v, slots)))
        kparts = tuple(kparts)
    key = (fid, tuple(parts), kparts)
    session = slots[0]._st.session if slots else _session_of(slots, args, kwargs)
    with session.lock:
        session.stats.ops += 1
        plan = session.cache.get(key)
        if plan is None:
            session.check_open()
            if len(session.cache) >= MAX_CACHE or len(session.cache) >= session.limits.max_templates:
                session.reset_templates()
            plan = session.cache[key] = make_plan(session, func, args, kwargs, slots)
        if plan.tid == 0:
            return _build(plan.out, slots, [])
        if session.closed is not None:
            session.check_open()
        for slot, g in plan.replace:
            resize_empty(slots[slot], *g)
        for i in plan.write_slots:
            if slots[i]._st.shared:
                _unshare(slots[i]._st)
        handles = []
        for t in slots:
            st = t._st
            if st.state == LAZY:
                ready(st)
            handles.append(st.handle)
        if plan.sync:
            return _execute(session, func, args, kwargs, plan, slots, handles, scalars)
        out = plan.out
        if type(out) is Fresh:  # one fresh tensor: the common case, built without the generic walk
            st = RemoteStorage(session, out.dtype)
            run = P.Run(plan.tid, handles, [st.handle], scalars)
            if session.region is None:  # Session.emit, inlined for the eager case
                ops = session.ops
                ops.append(run)
                if len(ops) >= FLUSH_OPS:
                    session.flush()
            else:
                session.emit(run)
            return wrap(st, out.cs, out.nbytes)
        fresh = [RemoteStorage(session, None) for _ in range(plan.nfresh)]  # type: ignore[arg-type]
        session.emit(P.Run(plan.tid, handles, [st.handle for st in fresh], scalars))
        return _build(out, slots, fresh)


_LIFT: dict[int, tuple[frozenset[int], frozenset[str]]] = {}


def _execute(session: Session, func, args, kwargs, plan: Plan, slots, handles, scalars) -> Any:
    """Run now on the server and rebuild the outputs it describes (data-dependent shapes)."""
    first = session.new_handle()
    value, _ = session.sync(P.Execute(plan.tid, handles, first, scalars))
    last = first

    def rebuild(v: Any) -> Any:
        nonlocal last
        if isinstance(v, dict) and "$t" in v:
            h, dtype, size, stride, offset = v["$t"]
            if not first <= h < first + 65536:
                raise RemoteError(f"the server bound output handle {h}, outside the range it was given")
            st = RemoteStorage.bound(session, h, DTYPES[dtype])
            last = max(last, h)
            return RemoteTensor(st, DTYPES[dtype], tuple(size), tuple(stride), offset)
        if isinstance(v, dict) and "$dtype" in v:
            return DTYPES[v["$dtype"]]
        if isinstance(v, list):
            return [rebuild(e) for e in v]
        return v

    rets = func._schema.returns
    fresh = fresh_returns(func)
    if len(rets) == 1:
        out = rebuild(value) if fresh[0] else _written_return(func, args, kwargs, 0)
    else:
        out = tuple(rebuild(v) if f else _written_return(func, args, kwargs, i) for i, (v, f) in enumerate(zip(value, fresh)))
    session.next_handle = max(session.next_handle, last + 1)  # the server bound handles up to ``last``
    return out


def _written_return(func, args, kwargs, ret_index: int) -> Any:
    r = func._schema.returns[ret_index]
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and r.alias_info is not None and a.alias_info.before_set == r.alias_info.before_set:
            return kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
    return None


# ---------------------------------------------------------------------------------------------
# Data movement: uploads and sync points


def upload(dst: RemoteTensor, src: torch.Tensor) -> RemoteTensor:
    """``dst.copy_(src)`` for a CPU ``src``: send its bytes (weights only once per server)."""
    session = dst._st.session
    # Parameters are weights: several tenants upload the same ones, so they are stored once. Anything
    # else (inputs, masks, buffers) stays private and costs no lookup.
    is_weight = isinstance(src, torch.nn.Parameter)
    if src.dtype != dst.dtype:
        src = src.to(dst.dtype)
    if tuple(src.shape) != tuple(dst.shape):
        src = src.expand(dst.shape)
    # Does ``host`` still point into the caller's memory? Then small payloads are snapshotted, since the
    # caller may overwrite its tensor before the frame goes out; large ones are sent before returning.
    aliases_caller = src.is_contiguous() and src.data_ptr() != 0
    host = src if aliases_caller else src.contiguous()
    data = memoryview(host.reshape(-1).view(torch.uint8).numpy()) if host.numel() else memoryview(b"")
    st = dst._st
    with session.lock:
        session.check_open()
        session.stats.ops += 1
        dtype, size, stride, offset = dst._cs
        whole = st.state == LAZY and st.alloc == (size, stride) and offset == 0 and dst.is_contiguous()
        if whole:
            share = is_weight and len(data) >= SHARE_MIN_BYTES
            st.state = LIVE
            if share:
                digest = hashlib.blake2b(data, digest_size=20).digest()
                have, _ = session.sync(P.HasBlobs([digest]))
                st.shared = True
                if have[0]:
                    session.emit(P.BindBlob(st.handle, digest))
                    return dst
            if aliases_caller and len(data) < FLUSH_BYTES:
                host = host.clone()
                data = memoryview(host.reshape(-1).view(torch.uint8).numpy())
            part = session.limits.max_frame // 2
            if len(data) > part and session.region is None:
                _upload_in_parts(session, st.handle, DTYPE_NAMES[dtype], size, data, host, share, part)
                return dst
            index = session.add_payload(data, host)
            session.emit(P.Upload(st.handle, DTYPE_NAMES[dtype], size, index, share))
        else:
            ready(st)
            if st.shared:
                _unshare(st)
            if aliases_caller and len(data) < FLUSH_BYTES:
                host = host.clone()
                data = memoryview(host.reshape(-1).view(torch.uint8).numpy()) if host.numel() else memoryview(b"")
            if len(data) > session.limits.max_frame // 2 and session.region is None:
                _copy_in_parts(session, st.handle, dtype, size, stride, offset, data, host,
                               session.limits.max_frame // 2)
                return dst
            index = session.add_payload(data, host)
            session.emit(P.CopyIn(st.handle, DTYPE_NAMES[dtype], size, stride, offset, DTYPE_NAMES[host.dtype],
                                  tuple(host.shape), index))
        if session.payload_bytes >= FLUSH_BYTES:
            session.flush()
    return dst


def _upload_in_parts(session: Session, handle: int, dtype: str, size: tuple, data: memoryview, owner: Any,
                     share: bool, part: int) -> None:
    """An upload larger than half a frame, as UploadPart records of ``part`` bytes, one frame each (the
    server charges it all with the first part and binds ``handle`` with the last)."""
    session.flush()  # what came before goes first, in its own frame
    for start in range(0, len(data), part):
        index = session.add_payload(data[start:start + part], owner)
        session.emit(P.UploadPart(handle, dtype, size, start, index, share))
        session.flush()


def _parts(size: tuple, stride: tuple, offset: int, itemsize: int, part: int):
    """Views of at most ``part`` bytes that cover the view (size, stride, offset) in order: runs of elements
    of a contiguous view, else runs of its leading-dimension rows. Yields each one's (size, stride, offset)
    and its [start, end) bytes in the contiguous layout of the whole."""
    if list(stride) == list(torch.empty(size, device="meta").stride()):
        size, stride = (math.prod(size),), (1,)  # contiguous: any run of elements is one view
    rows, row_shape, row_stride = size[0], tuple(size[1:]), stride[0]
    row_bytes = math.prod(row_shape) * itemsize
    if row_bytes > part:
        raise NotImplementedError(f"a strided view whose rows of {row_bytes} bytes are larger than half of the "
                                  f"GPU server's frame limit ({2 * part} bytes) cannot be sent in parts")
    step = max(1, part // row_bytes)
    for i in range(0, rows, step):
        n = min(step, rows - i)
        yield (n, *row_shape), tuple(stride), offset + i * row_stride, i * row_bytes, (i + n) * row_bytes


def _copy_in_parts(session: Session, handle: int, dtype: torch.dtype, size: tuple, stride: tuple, offset: int,
                   data: memoryview, owner: Any, part: int) -> None:
    """A copy into a view larger than half a frame, as CopyIn records of its parts, one frame each.
    ``data`` is ``size`` of ``dtype``, contiguous."""
    name = DTYPE_NAMES[dtype]
    session.flush()  # what came before goes first, in its own frame
    for psize, pstride, poffset, start, end in _parts(size, stride, offset, dtype.itemsize, part):
        index = session.add_payload(data[start:end], owner)
        session.emit(P.CopyIn(handle, name, psize, pstride, poffset, name, psize, index))
        session.flush()


def _fetch_in_parts(session: Session, handle: int, dtype: torch.dtype, size: tuple, stride: tuple,
                    offset: int, part: int) -> torch.Tensor:
    """A fetch larger than half a frame (what the client accepts in one reply), as Fetches of its parts."""
    out = torch.empty(math.prod(size) * dtype.itemsize, dtype=torch.uint8)
    name = DTYPE_NAMES[dtype]
    for psize, pstride, poffset, start, end in _parts(size, stride, offset, dtype.itemsize, part):
        _, payloads = session.sync(P.Fetch(handle, name, psize, pstride, poffset))
        out[start:end] = torch.frombuffer(payloads[0], dtype=torch.uint8)
    return out.view(dtype).reshape(size)


def fetch_later(t: RemoteTensor) -> Any:
    """Ask for the tensor's values now; the returned function waits for them (a CPU tensor). The server
    answers once it has run every op sent before, and goes on with later ones meanwhile."""
    st = t._st
    dtype, size, stride, offset = t._cs
    session = st.session
    with session.lock:
        session.stats.ops += 1
        ready(st)
        part = session.limits.max_frame // 2
        if math.prod(size) * dtype.itemsize > part:  # larger than one reply: fetched in parts, now
            values = _fetch_in_parts(session, st.handle, dtype, size, stride, offset, part)
            return lambda: values
        pending = session.request(P.Fetch(st.handle, DTYPE_NAMES[dtype], size, stride, offset))

    def wait() -> torch.Tensor:
        _, payloads = pending.result()
        return _from_payload(payloads, dtype, size)

    return wait


def _from_payload(payloads: list[memoryview], dtype: torch.dtype, size: tuple) -> torch.Tensor:
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:
        return torch.empty(size, dtype=dtype)
    return torch.frombuffer(payloads[0], dtype=torch.uint8).view(dtype).reshape(size)


def fetch(t: RemoteTensor) -> torch.Tensor:
    """The tensor's values as a new CPU tensor (one round trip)."""
    st = t._st
    dtype, size, stride, offset = t._cs
    session = st.session
    with session.lock:
        session.stats.ops += 1
        if st.state == LAZY:  # never written: its contents are undefined, like torch.empty's
            return torch.empty(size, dtype=dtype)
        part = session.limits.max_frame // 2
        if math.prod(size) * dtype.itemsize > part:
            return _fetch_in_parts(session, st.handle, dtype, size, stride, offset, part)
        _, payloads = session.sync(P.Fetch(st.handle, DTYPE_NAMES[dtype], size, stride, offset))
    return _from_payload(payloads, dtype, size)


def _to_copy(args: tuple, kwargs: dict) -> Any:
    (src,) = args
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cpu":
        out = fetch(src)
        dtype = kwargs.get("dtype")
        if dtype is not None and dtype != out.dtype:
            out = out.to(dtype)
        return out
    return run_op(aten._to_copy.default, args, kwargs)


def _copy_(args: tuple, kwargs: dict) -> Any:
    dst, src = args[0], args[1]
    if isinstance(dst, RemoteTensor) and not isinstance(src, RemoteTensor):
        if src.device.type != "cpu":
            raise RuntimeError(f"cannot copy from {src.device} to a caserve tensor")
        return upload(dst, src)
    if isinstance(src, RemoteTensor) and not isinstance(dst, RemoteTensor):
        return dst.copy_(fetch(src))
    return run_op(aten.copy_.default, args, kwargs)


def _local_scalar_dense(args: tuple, kwargs: dict) -> Any:
    return fetch(args[0]).item()


def _is_pinned(args: tuple, kwargs: dict) -> bool:
    return False


SPECIAL: dict[Any, Any] = {
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten._local_scalar_dense.default: _local_scalar_dense,
    aten.is_pinned.default: _is_pinned,
}
