"""Meta plans: what one op signature does, computed once with meta kernels and cached per session by
:mod:`caserve.remote.client.dispatch` (output geometry; which outputs are fresh, views of an input or
written inputs; whether it must run as a sync op), and the op template (``DefineOp``) the server gets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from caserve.remote.client.session import Session
from caserve.remote.client.tensor import RemoteTensor
from caserve.remote.wire import protocol as P
from caserve.remote.wire.codec import DTYPE_NAMES, MEMORY_FORMAT_NAMES, extent, scalar_slots, written_args

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Plans: what an op returns is a tree of nodes, built once per signature and walked by dispatch per call.


@dataclass(slots=True, eq=False)
class Fresh:
    """Fresh output ``index`` of the op (its place in the Run's ``outs``): new storage laid out as ``cs``."""

    index: int
    dtype: torch.dtype
    cs: tuple  # (dtype, size, stride, offset): the output tensor's ``_cs``
    nbytes: int  # the storage bytes it reaches


@dataclass(slots=True, eq=False)
class View:
    """A view of slot ``slot``'s storage, made on the client alone (a view op keeps the input's dtype)."""

    slot: int
    cs: tuple  # (dtype, size, stride, offset): the view's ``_cs``
    nbytes: int


@dataclass(slots=True, eq=False)
class Written:
    """A written argument (in-place ``self``, ``out=``) returned as itself: the tensor in slot ``slot``."""

    slot: int


@dataclass(slots=True, eq=False)
class Seq:
    """A list (``is_list``) or tuple of outputs."""

    items: list[Node]
    is_list: bool


@dataclass(slots=True, eq=False)
class Const:
    """A returned value that is no tensor."""

    value: Any


Node = Fresh | View | Written | Seq | Const


@dataclass
class Plan:
    """What one op signature does (see the module docstring); ``out`` is rebuilt into tensors per call."""

    tid: int  # template id on the server (0: nothing to send, the op is a view)
    out: Node | None  # what the op returns (None: a sync op, rebuilt from the server's reply)
    nfresh: int
    write_slots: tuple[int, ...]
    replace: tuple[tuple[int, tuple], ...] = ()  # (slot, (dtype, size, stride, offset)): out= args given new storage
    sync: bool = False  # run with Execute (no meta kernel, or data-dependent output shapes)


def _meta_arg(x: Any) -> Any:
    tx = type(x)
    if tx is RemoteTensor or isinstance(x, RemoteTensor):
        dtype, size, stride, offset = x._cs
        base = torch.empty((extent(size, stride, offset),), dtype=dtype, device="meta")
        return base.as_strided(size, stride, offset)
    if tx is list or tx is tuple:
        return tx(_meta_arg(e) for e in x)
    if tx is torch.device and x.type == "caserve":
        return torch.device("meta")
    return x


def _spec(x: Any, slots: list[RemoteTensor], geoms: dict[int, tuple]) -> Any:
    """The argument skeleton for DefineOp (see protocol.Arg)."""
    tx = type(x)
    if isinstance(x, RemoteTensor):
        i = len(slots)
        slots.append(x)
        dtype, size, stride, offset = geoms.get(i, x._cs)
        return P.TensorSlot(i, DTYPE_NAMES[dtype], tuple(size), tuple(stride), offset)
    if tx is list or tx is tuple:
        return P.ArgList([_spec(e, slots, geoms) for e in x])
    if isinstance(x, torch.Tensor):
        return P.CpuScalar(DTYPE_NAMES[x.dtype], x.item())
    if tx is torch.dtype:
        return P.DTypeArg(DTYPE_NAMES[x])
    if tx is torch.device:
        if x.type != "caserve":
            raise RuntimeError(f"a caserve op cannot target device {x}")
        return P.DeviceArg(x.index or 0)
    if tx is torch.layout:
        return P.LayoutArg(str(x).split(".")[-1])
    if tx is torch.memory_format:
        return P.MemoryFormatArg(MEMORY_FORMAT_NAMES[x])
    if x is None or tx in (bool, int, float, str):
        return x
    raise NotImplementedError(f"caserve cannot send an argument of type {tx.__name__}")


def _geom(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())


def _nbytes(g: tuple) -> int:
    """The storage bytes a tensor of geometry ``g`` = (dtype, size, stride, offset) reaches."""
    return extent(g[1], g[2], g[3]) * g[0].itemsize


def make_plan(session: Session, func, args, kwargs, slots: list[RemoteTensor]) -> Plan:
    session.stats.meta_misses += 1
    margs, mkwargs = _meta_arg(args), {k: _meta_arg(v) for k, v in kwargs.items()}
    try:
        mout = func(*margs, **mkwargs)
    except (DynamicOutputShapeException, NotImplementedError, RuntimeError) as exc:
        logger.debug("%s: no usable meta kernel (%s); running it as a sync op", func, exc)
        return _define(session, func, args, kwargs, Plan(0, None, 0, (), sync=True), {})
    slot_of = {id(t): i for i, t in enumerate(slots)}
    written = written_args(func)
    write_slots: list[int] = []
    replace: dict[int, tuple] = {}
    schema = func._schema
    # Which slot each written argument is (in-place self, out=).
    written_slot: dict[str, int] = {}
    for i, a in enumerate(schema.arguments):
        if a.name in written:
            value = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
            if isinstance(value, RemoteTensor):
                written_slot[a.name] = slot_of[id(value)]
                write_slots.append(slot_of[id(value)])
    ret_writes = [
        next((a.name for a in schema.arguments if a.alias_info is not None and r.alias_info is not None
              and a.alias_info.before_set == r.alias_info.before_set and a.name in written), None)
        for r in schema.returns
    ]
    in_dtype = slots[0].dtype if slots else None
    local_view = func.is_view and all(
        not isinstance(o, torch.Tensor) or o.dtype == in_dtype for o in _leaves(mout)
    )
    nfresh = 0

    def node(value: Any, write_name: str | None) -> Any:
        nonlocal nfresh
        if isinstance(value, torch.Tensor):
            g = _geom(value)
            if write_name is not None:
                slot = written_slot[write_name]
                if g != slots[slot]._cs:
                    if slots[slot].numel() != 0:
                        raise NotImplementedError(f"{func}: resizing a non-empty out= tensor on a caserve device")
                    replace[slot] = g  # resized: it gets new storage before the op runs
                return Written(slot)
            if local_view:
                return View(0, g, _nbytes(g))
            nfresh += 1
            return Fresh(nfresh - 1, g[0], g, _nbytes(g))
        if isinstance(value, (list, tuple)):
            return Seq([node(v, write_name) for v in value], isinstance(value, list))
        return Const(value)

    if len(schema.returns) == 1:
        out = node(mout, ret_writes[0])
    else:
        out = Seq([node(v, w) for v, w in zip(mout, ret_writes)], False)
    plan = Plan(0, out, nfresh, tuple(write_slots), tuple(replace.items()))
    if local_view and not write_slots:
        return plan  # a pure view: nothing to run on the server
    return _define(session, func, args, kwargs, plan, replace)


def _leaves(x: Any):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def _define(session: Session, func, args, kwargs, plan: Plan, replace: dict[int, tuple]) -> Plan:
    slots: list[RemoteTensor] = []
    geoms = {i: g for i, g in replace.items()}
    lift_pos, lift_names = scalar_slots(func)
    nscalars = 0

    def top(value: Any, liftable: bool) -> Any:
        nonlocal nscalars
        if liftable and type(value) in (int, float, bool):
            nscalars += 1
            return P.ScalarSlot(nscalars - 1, type(value).__name__)
        return _spec(value, slots, geoms)

    spec_args = [top(a, i in lift_pos) for i, a in enumerate(args)]
    spec_kwargs = {k: top(v, k in lift_names) for k, v in kwargs.items()}
    outs = []

    def collect(n: Node) -> None:
        if type(n) is Fresh:
            dtype, size, stride, offset = n.cs
            outs.append((DTYPE_NAMES[dtype], size, stride, offset))
        elif type(n) is Seq:
            for c in n.items:
                collect(c)

    if plan.out is not None:
        collect(plan.out)
    plan.tid = next(session.template_ids)
    session.emit(P.DefineOp(plan.tid, str(func), spec_args, spec_kwargs, outs))
    return plan
