"""Torch-side vocabulary shared by both ends: dtype names and what an op's schema says about aliasing.

The wire format itself is in :mod:`caserve.remote.wire.protocol`; this module maps its names to torch
objects, so that the client and the server agree on every rule by calling the same function.
"""

from __future__ import annotations

import functools

import torch

from caserve.remote.wire import protocol as P

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in P.DTYPE_NAMES if hasattr(torch, name)}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

LAYOUTS: dict[str, torch.layout] = {"strided": torch.strided}
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
MEMORY_FORMAT_NAMES = {v: k for k, v in MEMORY_FORMATS.items()}


def extent(size: tuple[int, ...], stride: tuple[int, ...], offset: int) -> int:
    """Elements of storage a view needs: one past its furthest element (0 for an empty view)."""
    if any(s == 0 for s in size):
        return 0
    return offset + 1 + sum((s - 1) * st for s, st in zip(size, stride))


@functools.lru_cache(maxsize=None)
def written_args(func: torch._ops.OpOverload) -> frozenset[str]:
    """Names of the arguments the op writes to (in-place ``self``, ``out=`` tensors)."""
    return frozenset(a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write)


@functools.lru_cache(maxsize=None)
def fresh_returns(func: torch._ops.OpOverload) -> tuple[bool, ...]:
    """Per schema return: True when it is a new tensor (or list of them), False when it is a written arg."""
    return tuple(not (r.alias_info is not None and r.alias_info.is_write) for r in func._schema.returns)


@functools.lru_cache(maxsize=None)
def takes_generator(func: torch._ops.OpOverload) -> bool:
    return any(a.name == "generator" for a in func._schema.arguments)


def flatten_fresh(func: torch._ops.OpOverload, result: object) -> list[torch.Tensor]:
    """The fresh output tensors of ``result``, in return order (lists flattened)."""
    results = result if isinstance(result, tuple) else (result,)
    out: list[torch.Tensor] = []
    for is_fresh, value in zip(fresh_returns(func), results):
        if not is_fresh:
            continue
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out


# Ops whose Scalar arguments decide the output's size: their values stay part of the op's signature.
_SHAPE_SCALARS = frozenset({"arange", "range", "linspace", "logspace"})


@functools.lru_cache(maxsize=None)
def scalar_slots(func: torch._ops.OpOverload) -> tuple[frozenset[int], frozenset[str]]:
    """Positions and keyword names of arguments whose numeric value can never change output shapes:
    ``Scalar`` arguments, and ``Tensor`` arguments given as a Python number (a wrapped 0-dim scalar).
    Only their type (bool, int, float) matters to planning, so their values travel with each call."""
    if func._schema.name.split("::")[-1] in _SHAPE_SCALARS:
        return frozenset(), frozenset()
    positions, names = set(), set()
    for i, a in enumerate(func._schema.arguments):
        if str(a.type) in ("number", "Optional[number]", "Tensor"):
            (names if a.kwarg_only else positions).add(i if not a.kwarg_only else a.name)
    return frozenset(positions), frozenset(names)
