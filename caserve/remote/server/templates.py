"""Op templates on the GPU server: a client's DefineOp, checked and compiled once.

A template names one ATen op (never a denied one), the geometry of each tensor slot, and the layout of
each fresh output. Compiling it builds a small function that plugs slot tensors into the argument
skeleton; its source holds only slot and constant references, never client text.
"""

from __future__ import annotations

import keyword
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from caserve.remote.server.errors import TenantError
from caserve.remote.server.metacheck import META, NoMetaKernel, check_declared, data_dependent_bound, meta_outputs
from caserve.remote.server.opsurface import OpSurface
from caserve.remote.wire import protocol as P
from caserve.remote.wire.codec import DTYPES, LAYOUTS, MEMORY_FORMATS, extent, takes_generator, written_args

MAX_DIMS = P.LIMITS.max_dims  # the limit sent in Welcome
_SCALAR_TYPES = {"bool": bool, "int": int, "float": float}


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
    # Decided on the server (caserve.remote.server.metacheck), never taken from the client: per output, the
    # slot it is a view of (None: new memory); the bytes the op allocates, charged before it runs; whether
    # a Run may call it (False: its outputs are unknown before it runs, or it declares none it makes).
    alias_of: tuple[int | None, ...] = ()
    charge: int = 0
    runnable: bool = True
    meta_known: bool = True
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
        if len(self.alias_of) != len(self.outs) and self.runnable:
            self.alias_of = (None,) * len(self.outs)


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
        t = type(value)
        if value is None or t in (bool, int, float, str):
            return self.const(value)
        if t is P.ArgList:
            return "[" + "".join(self.expr(v) + "," for v in value.items) + "]"
        if t is P.TensorSlot:
            if value.slot != len(self.slots):
                raise TenantError("tensor slots must be numbered in order")
            dt, size, stride, offset = check_geom(value.dtype, value.size, value.stride, value.offset)
            self.slots.append(Slot(dt, (size, stride, offset), extent(size, stride, offset)))
            return f"T[{value.slot}]"
        if t is P.ScalarSlot:
            if value.index != len(self.scalar_types):
                raise TenantError("scalar slots must be numbered in order")
            self.scalar_types.append(_SCALAR_TYPES[value.kind])
            return f"S[{value.index}]"
        if t is P.DTypeArg and value.name in DTYPES:
            return self.const(DTYPES[value.name])
        if t is P.DeviceArg:
            return self.const(self.device)
        if t is P.LayoutArg:
            return self.const(LAYOUTS[value.name])
        if t is P.MemoryFormatArg:
            return self.const(MEMORY_FORMATS[value.name])
        if t is P.CpuScalar and value.dtype in DTYPES:
            return self.const(torch.tensor(value.value, dtype=DTYPES[value.dtype]))
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


def _base_type(schema_type: str) -> str:
    return schema_type[len("Optional["):-1] if schema_type.startswith("Optional[") else schema_type


# Schema argument types that must travel typed: the skeleton's struct for each.
_TYPED = {"Device": P.DeviceArg, "ScalarType": P.DTypeArg, "Layout": P.LayoutArg, "MemoryFormat": P.MemoryFormatArg}


def check_typed_args(fn: torch._ops.OpOverload, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Each argument is of its schema type's kind: a device, dtype, layout or memory format only as its
    typed value (so a tenant never picks a device by a string: the server maps ``$dev`` to its own), and a
    plain string only where the schema takes one."""
    schema = fn._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(args) > len(positional):
        raise TenantError(f"{fn} takes at most {len(positional)} positional arguments", "bad_argument")
    by_name = {a.name: a for a in schema.arguments}
    for a, v in [*zip(positional, args), *((by_name[k], v) for k, v in kwargs.items() if k in by_name)]:
        base = _base_type(str(a.real_type))
        want = _TYPED.get(base)
        if want is not None:
            if v is not None and type(v) is not want:
                raise TenantError(f"{fn}: argument {a.name} is a {base} and travels as {want.__name__}, not {v!r}",
                                  "bad_argument")
        elif type(v) in _TYPED.values():
            raise TenantError(f"{fn}: argument {a.name} is a {base}, not a {type(v).__name__}", "bad_argument")
        elif isinstance(v, str) and base != "str":
            raise TenantError(f"{fn}: argument {a.name} is a {base}, not a string", "bad_argument")


def compile_template(op: P.DefineOp, device: torch.device, surface: OpSurface) -> Template:
    """Check a DefineOp and compile it; what its op makes is decided on the server (see metacheck)."""
    fn = surface.resolve(op.name)
    check_typed_args(fn, op.args, op.kwargs)
    comp = _SpecCompiler(device)
    build = comp.compile(fn, op.args, op.kwargs)
    declared = [check_geom(*out) for out in op.outs]
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
    scalar_types = tuple(comp.scalar_types)
    # The same builder over constants whose device is meta (no second compile).
    meta_consts = [META if c is device else c for c in comp.consts]
    meta_build = types.FunctionType(build.__code__, {"C": meta_consts, "__builtins__": {}})
    extra: dict[str, Any] = {}
    try:
        true = meta_outputs(op.name, fn, meta_build, comp.slots, scalar_types, frozenset(write_slots),
                            key=P.encode_header((op.name, op.args, op.kwargs)))
    except NoMetaKernel as exc:
        if declared:
            raise TenantError(f"{exc}; the server cannot check the outputs the template declares",
                              "bad_template") from None
        bound = data_dependent_bound(op.name, fn, comp.slots)
        if bound is None and not surface.allow_any:
            raise TenantError(f"{exc}; the server cannot bound what it allocates, so it does not run it",
                              "bad_template") from None
        extra = dict(runnable=False, meta_known=False, charge=bound or 0)
    else:
        check_declared(op.name, declared, true)
        # A template that declares none of the outputs its op makes can only be executed.
        extra = dict(alias_of=tuple(true.alias_of), charge=true.charge, runnable=bool(declared) or not true.outs)
    out_nbytes = [extent(*w[1:]) * w[0].itemsize for w in declared]
    return Template(op.name, fn, build, comp.slots, declared, out_nbytes, frozenset(write_slots),
                    takes_generator(fn), scalar_types, args_src=comp.args_src, kwargs_src=comp.kwargs_src,
                    consts=comp.consts, **extra)


def check_scalars(tpl: Template, scalars: list[Any]) -> None:
    """A call's scalar values must match its template's slots in number and type."""
    if len(scalars) != len(tpl.scalar_types) or any(type(v) is not t for v, t in zip(scalars, tpl.scalar_types)):
        raise TenantError(f"{tpl.name}: expected scalars of types {[t.__name__ for t in tpl.scalar_types]}")
