"""Op templates on the GPU server: a client's DefineOp, checked and compiled once.

A template names one ATen op (never a denied one), the geometry of each tensor slot, and the layout of
each fresh output. Compiling it builds a small function that plugs slot tensors into the argument
skeleton; its source holds only slot and constant references, never client text.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.wire.codec import DTYPES, LAYOUTS, MEMORY_FORMATS, extent, takes_generator, written_args

# Ops a client may never run: they touch files, raw memory or process state rather than tensors.
DENIED_OPS = frozenset(
    {"from_file", "_from_file", "set_", "record_stream", "_pin_memory", "pin_memory", "_cudnn_init_dropout_state",
     "_fused_adam_", "_fused_adamw_", "_use_cudnn_ctc_loss", "save", "_local_scalar_dense", "item"}
)
# Name fragments of ops that are never allowed: resizing grows storage behind the tenant's memory
# accounting; the others reach raw pointers, streams or the allocator.
DENIED_FRAGMENTS = ("resize", "data_ptr", "_cuda", "stream", "_nested_from_buffer", "_make_per_")
MAX_DIMS = P.LIMITS.max_dims  # the limit sent in Welcome
_SCALAR_TYPES = {"bool": bool, "int": int, "float": float}


class TenantError(Exception):
    """An op or request of one tenant failed; reported to that tenant only."""

    def __init__(self, message: str, code: str = "op_failed") -> None:
        super().__init__(message)
        self.code = code


class QuotaError(TenantError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "quota_exceeded")


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
    scalar_types: tuple[type, ...] = ()  # the type of each scalar slot, whose values each Run carries
    call: Callable[..., Any] = None  # type: ignore[assignment]  # the op's C++ entry point
    single: bool = False  # one fresh tensor return: the result is the output
    total_out_nbytes: int = 0
    # The builder's source pieces, for graph programs that inline the call (caserve.remote.server.replay):
    # positional argument expressions and (keyword, expression) pairs over ``T[i]``, ``S[j]`` and
    # ``C[k]`` (an index into ``consts``) only.
    args_src: str = ""
    kwargs_src: tuple[tuple[str, str], ...] = ()
    consts: list[Any] = field(default_factory=list)
    # ``run(tenant, slots, outs, scalars)``: an eager Run, compiled by the executor when it defines the template.
    runner: Callable[[Any, list[int], list[int], list[Any]], None] | None = None

    def __post_init__(self) -> None:
        self.call = self.fn._op
        rets = self.fn._schema.returns
        self.single = len(self.outs) == 1 and len(rets) == 1 and str(rets[0].type) == "Tensor"
        self.total_out_nbytes = sum(self.out_nbytes)


_OP_CACHE: dict[str, torch._ops.OpOverload] = {}


def resolve_op(name: str) -> torch._ops.OpOverload:
    """``"aten.add.Tensor"`` -> the OpOverload; only ATen ops, never a denied one."""
    op = _OP_CACHE.get(name)
    if op is not None:
        return op
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "aten" or not all(p.isidentifier() for p in parts):
        raise TenantError(f"op {name!r} is not an ATen op name (aten.NAME.OVERLOAD)", "unknown_op")
    if parts[1] in DENIED_OPS or any(f in parts[1] for f in DENIED_FRAGMENTS):
        raise TenantError(f"op {name} is not allowed on the GPU server", "denied_op")
    try:
        op = getattr(getattr(torch.ops.aten, parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise TenantError(f"unknown op {name}", "unknown_op") from None
    _OP_CACHE[name] = op
    return op


def check_geom(dtype: Any, size: Any, stride: Any, offset: Any) -> tuple[torch.dtype, tuple, tuple, int]:
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
        self.scalar_types: list[type] = []
        self.args_src = ""
        self.kwargs_src: tuple[tuple[str, str], ...] = ()

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
                dt, size, stride, offset = check_geom(*arg[1:])
                self.slots.append(Slot(dt, (size, stride, offset), extent(size, stride, offset)))
                return f"T[{arg[0]}]"
            if key == "$s":
                if not (isinstance(arg, list) and len(arg) == 2 and arg[0] == len(self.scalar_types)
                        and arg[1] in _SCALAR_TYPES):
                    raise TenantError("scalar slots must be numbered in order and typed bool, int or float")
                self.scalar_types.append(_SCALAR_TYPES[arg[1]])
                return f"S[{arg[0]}]"
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
        self.args_src = "".join(self.expr(a) + "," for a in args)
        self.kwargs_src = tuple((k, self.expr(v)) for k, v in kwargs.items())
        src = "lambda T, S: ((" + self.args_src + "), {" + "".join(f"{k!r}: {e}," for k, e in self.kwargs_src) + "})"
        return eval(src, {"C": self.consts, "__builtins__": {}})  # noqa: S307 - source built above


def compile_template(op: P.DefineOp, device: torch.device) -> Template:
    fn = resolve_op(op.name)
    comp = _SpecCompiler(device)
    build = comp.compile(fn, op.args, op.kwargs)
    outs, out_nbytes = [], []
    for out in op.outs:
        dt, size, stride, offset = check_geom(*out)
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
    return Template(op.name, fn, build, comp.slots, outs, out_nbytes, frozenset(write_slots), takes_generator(fn),
                    tuple(comp.scalar_types), args_src=comp.args_src, kwargs_src=comp.kwargs_src, consts=comp.consts)


def check_scalars(tpl: Template, scalars: list[Any]) -> None:
    """A call's scalar values must match its template's slots in number and type."""
    if len(scalars) != len(tpl.scalar_types) or any(type(v) is not t for v, t in zip(scalars, tpl.scalar_types)):
        raise TenantError(f"{tpl.name}: expected scalars of types {[t.__name__ for t in tpl.scalar_types]}")
