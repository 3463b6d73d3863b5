"""The server decides what an op does: a template's op run once on meta tensors built from its slots.

When a tenant defines a template, its op is called on meta tensors of the slots' dtypes and geometries
(no memory, no data). That call tells, without trusting the client:

- the true dtype, size, stride and offset of every output the op makes;
- which outputs are views of a slot (same meta storage; the schema's alias annotations say which may
  be, the meta call says which are, including ops such as ``_unsafe_view`` that alias unannotated);
- that every such view stays inside the bytes its slot may reach (``_reshape_alias`` past the end is
  refused here, before any real tensor exists);
- that no argument is resized or restrided in place (``out=`` growth, ``as_strided_``).

Ops whose output shapes depend on data (``nonzero``, ``unique``) have no such kernel: their templates may
only be executed (``Execute``). Their outputs cannot be known before the call, but they can be bounded from
the inputs' sizes: :func:`data_dependent_bound` gives that bound for each such op on the allow-list, and the
tenant is charged the bound before the op runs, so no call takes a tenant past its quota even for a moment.
An op with neither a meta kernel nor a bound is refused unless the server admits any op (``--allow-any-op``),
where its outputs are charged after the call.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from caserve.remote.server.errors import TenantError
from caserve.remote.wire.codec import extent, flatten_fresh, fresh_returns, takes_generator

logger = logging.getLogger(__name__)

Want = tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]
META = torch.device("meta")
_SCALAR_SAMPLES = {bool: True, int: 1, float: 1.0}


class NoMetaKernel(TenantError):
    """The op has no meta kernel for these arguments (data-dependent shapes, or none registered)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "bad_template")


@dataclass(frozen=True)
class MetaOutputs:
    """What a template's op makes: each fresh output's layout and, for a view, the slot it views."""

    outs: list[Want]
    alias_of: list[int | None]

    @property
    def charge(self) -> int:
        """Bytes of new memory the op allocates (views count none)."""
        return sum(extent(*w[1:]) * w[0].itemsize for w, a in zip(self.outs, self.alias_of) if a is None)


def _meta_slot(dtype: torch.dtype, geom: tuple, reach: int) -> torch.Tensor:
    size, stride, offset = geom
    return torch.empty((reach,), dtype=dtype, device=META).as_strided(size, stride, offset)


def _nonzero(slots: list[Any]) -> int:  # [count, ndim] int64 indices, count <= numel
    size = slots[0].geom[0]
    return math.prod(size) * max(len(size), 1) * 8


def _masked_select(slots: list[Any]) -> int:  # at most every element of the broadcast shape
    size = torch.broadcast_shapes(slots[0].geom[0], slots[1].geom[0])
    return math.prod(tuple(size)) * slots[0].dtype.itemsize


def _unique2(slots: list[Any]) -> int:  # values (<= numel), inverse indices (numel) and counts (<= numel)
    n = math.prod(slots[0].geom[0])
    return n * slots[0].dtype.itemsize + 2 * n * 8


def _index(slots: list[Any]) -> int:
    """``x[mask]`` and mixed indexing: boolean masks select at most every element of ``x``; an integer index
    tensor can repeat elements, at most its own size times."""
    repeat = max([math.prod(s.geom[0]) for s in slots[1:] if not s.dtype.is_floating_point
                  and s.dtype != torch.bool] or [1])
    return math.prod(slots[0].geom[0]) * max(repeat, 1) * slots[0].dtype.itemsize


_BOUNDS: dict[str, Callable[[list[Any]], int]] = {
    "aten.index.Tensor": _index,
    "aten.nonzero.default": _nonzero,
    "aten.masked_select.default": _masked_select,
    "aten._unique2.default": _unique2,
    "aten._local_scalar_dense.default": lambda slots: 0,  # a Python number, no tensor
}


def data_dependent_bound(name: str, fn: torch._ops.OpOverload, slots: list[Any]) -> int | None:
    """Bytes the op ``name`` can at most allocate on ``slots`` (its template's input slots) when no meta kernel
    can say its output sizes; ``None`` when caserve knows no bound for it. An op that returns only the
    arguments it writes (in place, ``out=``) allocates no output."""
    if not any(fresh_returns(fn)):
        return 0
    bound = _BOUNDS.get(name)
    return None if bound is None else bound(slots)


MAX_CACHED = 1 << 16
_CACHE: dict[bytes, MetaOutputs | TenantError] = {}  # server-wide: tenants of one model define the same templates


def meta_outputs(name: str, fn: torch._ops.OpOverload, build: Callable[..., tuple[tuple, dict]],
                 slots: list[Any], scalar_types: tuple[type, ...], write_slots: frozenset[int],
                 key: bytes | None = None) -> MetaOutputs:
    """:func:`decide`, remembered by ``key`` (the template's encoded name and skeleton, which determine the
    answer) for the next tenant that defines the same template."""
    if key is not None:
        known = _CACHE.get(key)
        if known is not None:
            if isinstance(known, TenantError):
                raise type(known)(str(known)) if isinstance(known, NoMetaKernel) else TenantError(str(known), known.code)
            return known
    try:
        result: MetaOutputs | TenantError = decide(name, fn, build, slots, scalar_types, write_slots)
    except TenantError as exc:
        result = exc
    if key is not None:
        if len(_CACHE) >= MAX_CACHED:
            _CACHE.pop(next(iter(_CACHE), None), None)  # the oldest goes
        _CACHE[key] = result
    if isinstance(result, TenantError):
        raise result
    return result


def decide(name: str, fn: torch._ops.OpOverload, build: Callable[..., tuple[tuple, dict]],
           slots: list[Any], scalar_types: tuple[type, ...], write_slots: frozenset[int]) -> MetaOutputs:
    """Run ``fn`` on meta tensors shaped like ``slots`` (built by ``build``, whose device constant is meta).

    Raises NoMetaKernel when the op has no data-independent meta kernel, TenantError naming ``name``
    when the op would resize or restride an argument, make a view past its slot, or return a tensor
    that is not a new one or a view of a slot."""
    tensors = [_meta_slot(s.dtype, s.geom, s.extent) for s in slots]
    before = [(tuple(t.shape), t.stride(), t.storage_offset()) for t in tensors]
    args, kwargs = build(tensors, [_SCALAR_SAMPLES[t] for t in scalar_types])
    if takes_generator(fn):  # the tenant's generator is passed at run time; meta draws nothing
        kwargs["generator"] = None
    try:
        with torch.inference_mode():
            result = fn(*args, **kwargs)
    except (DynamicOutputShapeException, NotImplementedError, RuntimeError) as exc:
        # As on the client: such a template can only be executed; its outputs are checked after the call.
        logger.debug("%s: no usable meta kernel (%s: %s)", name, type(exc).__name__, exc)
        raise NoMetaKernel(f"{name}: {type(exc).__name__}: {exc}") from None
    for i, (t, b) in enumerate(zip(tensors, before)):
        if (tuple(t.shape), t.stride(), t.storage_offset()) != b:
            raise TenantError(f"{name} resizes or restrides its argument {i} in place; not allowed on the GPU "
                              "server", "bad_template")
    owner = {t.untyped_storage()._cdata: i for i, t in enumerate(tensors)}
    outs: list[Want] = []
    alias_of: list[int | None] = []
    for t in flatten_fresh(fn, result):
        if t.device != META:
            raise TenantError(f"{name} returns a tensor on {t.device}, not on the tenant's device", "bad_template")
        geom = (tuple(t.shape), tuple(t.stride()), t.storage_offset())
        slot = owner.get(t.untyped_storage()._cdata)
        if slot is not None:
            s = slots[slot]
            if extent(*geom) * t.dtype.itemsize > s.extent * s.dtype.itemsize:
                raise TenantError(f"{name} makes a view {geom} past the {s.extent} elements its argument {slot} "
                                  "may reach", "bad_template")
            if slot in write_slots:
                raise TenantError(f"{name} returns a fresh view of an argument it writes", "bad_template")
        elif t.untyped_storage().nbytes() < extent(*geom) * t.dtype.itemsize:
            raise TenantError(f"{name} makes an output {geom} past its own storage", "bad_template")
        outs.append((t.dtype, *geom))
        alias_of.append(slot)
    return MetaOutputs(outs, alias_of)


def check_declared(name: str, declared: list[Want], true: MetaOutputs) -> None:
    """A template that declares outputs must declare exactly those the op makes."""
    if declared and declared != true.outs:
        def show(ws: list[Want]) -> str:
            return ", ".join(f"{str(w[0]).removeprefix('torch.')}{list(w[1])}/{list(w[2])}+{w[3]}" for w in ws)
        raise TenantError(f"{name} makes outputs [{show(true.outs)}]; the template declares [{show(declared)}]",
                          "bad_template")
