"""Compiled server code for eager records: each template's Run compiled into one function (a *runner*),
and the pieces every generated function shares with the graph programs of
:mod:`caserve.remote.server.replay` (a constant pool, the source of a template's call, conforming outputs)
and with the executor (payload segments turned into tensors).

A runner does what an eager Run record always did, with the template's checks and call unrolled (see
:func:`compile_runner`).
"""

from __future__ import annotations

import builtins
import re
from typing import Any, Callable

import torch

from caserve.remote.wire.codec import extent, flatten_fresh
from caserve.remote.server.templates import Template, TenantError, check_scalars

Want = tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]

_TOKEN = re.compile(r"\b([TSC])\[(\d+)\]")


def payload_at(payloads: list[memoryview], index: int) -> memoryview:
    if not (type(index) is int and 0 <= index < len(payloads)):
        raise TenantError(f"payload segment {index!r} does not exist")
    return payloads[index]


def tensor_from_bytes(data: memoryview, dtype: torch.dtype, size: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for s in size:
        numel *= s
    if numel * dtype.itemsize != len(data):
        raise TenantError(f"payload of {len(data)} bytes does not hold {size} of {dtype}")
    if numel == 0:
        return torch.empty(size, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(size)


def device_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uploaded tensor in memory of its own on ``device``. On a CPU device too: a tensor over the
    frame buffer would keep the whole frame alive and may be misaligned for vectorised kernels."""
    if device.type == "cpu":
        return t.clone()
    return t.to(device)


def conform(t: torch.Tensor, want: Want) -> torch.Tensor:
    """Give an output exactly the layout the client computed, so that its views stay right."""
    dt, size, stride, offset = want
    if t.dtype is not dt:
        raise TenantError(f"output dtype {t.dtype} differs from the expected {dt}")
    if t.stride() == stride and t.shape == size and t.storage_offset() == offset:
        return t
    if t.shape == size and t.storage_offset() == offset and all(
        a == b or n == 1 for n, a, b in zip(size, t.stride(), stride)
    ):  # only the strides of size-1 dimensions differ: every element is where the client expects it
        return t.as_strided(size, stride, offset)
    out = torch.empty(extent(size, stride, offset), dtype=dt, device=t.device).as_strided(size, stride, offset)
    out.copy_(t)
    return out


def fresh_outputs(fn: torch._ops.OpOverload, result: Any, wants: list[Want], name: str,
                   alias_of: tuple[int | None, ...] = ()) -> list[torch.Tensor]:
    fresh = flatten_fresh(fn, result)
    if len(fresh) != len(wants):
        raise TenantError(f"{name} returned {len(fresh)} tensors, the client expected {len(wants)}")
    return [conform(t, w) if a is None else exact_view(t, w, name)
            for t, w, a in zip(fresh, wants, alias_of or (None,) * len(wants))]


def exact_view(t: torch.Tensor, want: Want, name: str) -> torch.Tensor:
    """A view output must be exactly the view the meta call promised: never conformed by a copy."""
    if t.dtype is not want[0] or t.shape != want[1] or t.stride() != want[2] or t.storage_offset() != want[3]:
        raise TenantError(f"{name} made the view {tuple(t.shape)}/{t.stride()}+{t.storage_offset()} of {t.dtype}, "
                          f"not the one its meta kernel made")
    return t



def call_source(tpl: Template, views: list[str], so: int, gen: str, k: Callable[[Any], str]) -> str:
    """The source of a call of ``tpl``: slot ``i`` is ``views[i]``, scalar ``j`` is ``S[so + j]``, each
    constant is placed by ``k``, the generator (for random ops) is ``gen``."""

    def token(m: re.Match) -> str:
        kind, i = m.group(1), int(m.group(2))
        if kind == "T":
            return views[i]
        if kind == "S":
            return f"S[{so + i}]"
        return k(tpl.consts[i])

    parts = [_TOKEN.sub(token, tpl.args_src)]
    for name, expr in tpl.kwargs_src:
        if not name.isidentifier():  # the template compiler admits schema names only; never else
            raise TenantError(f"{tpl.name}: keyword {name!r}")
        parts.append(f"{name}={_TOKEN.sub(token, expr)},")
    if tpl.random:
        parts.append(f"generator={gen},")
    return f"{k(tpl.call)}({''.join(parts)})"


def conform_source(v: str, want: Want, k: Callable[[Any], str]) -> str:
    """``conform`` inlined for the common case of an output laid out as expected."""
    return (f"if {v}.stride() != {k(want[2])} or {v}.storage_offset() != {want[3]} or {v}.shape != {k(want[1])} "
            f"or {v}.dtype is not {k(want[0])}: {v} = {k(conform)}({v}, {k(want)})")


def _write_refused(name: str, handle: int) -> None:
    raise TenantError(f"{name} writes to storage {handle}, a shared read-only weight")


class Consts:
    """A generated function's constant pool ``K``; objects are shared by identity."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.ids: dict[int, int] = {}

    def __call__(self, value: Any) -> str:
        i = self.ids.get(id(value))
        if i is None or self.values[i] is not value:
            i = self.ids[id(value)] = len(self.values)
            self.values.append(value)
        return f"K[{i}]"


def compile_runner(tpl: Template, storage: type) -> Callable[[Any, list[int], list[int], list[Any]], None]:
    """An eager Run of ``tpl`` as one generated function ``run(tenant, slots, outs, scalars)``.

    It does what a Run always did (see ``Tenant._run``): check the record's arity and scalars, resolve
    each slot (the storage's own tensor when the slot is its whole layout, else a checked view), refuse
    writes to shared weights, charge the outputs, call the op, conform its outputs and bind them. The
    source holds only indices, the schema's keyword names and constants kept in ``K``.
    """
    k = Consts()
    n, m = len(tpl.slots), len(tpl.outs)
    if not tpl.runnable:
        lines = [f"raise {k(TenantError)}({k(f'{tpl.name}: its outputs are known only once it ran; use Execute')}, "
                 f"'bad_template')"]
        m = n = 0
    else:
        lines = [f"if len(slots) != {n} or len(outs) != {m}: "
                 f"raise {k(TenantError)}({k(f'{tpl.name}: expected {n} inputs and {m} outputs')})"]
        if tpl.scalar_types:
            checks = " or ".join(f"type(S[{i}]) is not {k(t)}" for i, t in enumerate(tpl.scalar_types))
            lines.append(f"if len(S) != {len(tpl.scalar_types)} or {checks}: {k(check_scalars)}({k(tpl)}, S)")
        else:
            lines.append(f"if S: {k(check_scalars)}({k(tpl)}, S)")
        lines.append("T = self.storages")
    for i, slot in enumerate(tpl.slots[:n]):
        lines.append(f"h{i} = slots[{i}]; s{i} = T.get(h{i})")
        lines.append(f"a{i} = s{i}.tensor if s{i} is not None and s{i}.geom == {k(slot.geom)} and "
                     f"s{i}.tensor.dtype is {k(slot.dtype)} else self._view(h{i}, {k(slot)})")
    for i in sorted(tpl.write_slots) if n else ():
        lines.append(f"if T[h{i}].blob is not None: {k(_write_refused)}({k(tpl.name)}, h{i})")
    if tpl.charge and n + m:
        # Tenant._charge, inlined: it raises when the outputs would take the tenant past its limit.
        lines.append(f"if self.memory_limit and self.bytes + {tpl.charge} > self.memory_limit: "
                     f"self._charge({tpl.charge}, {k(tpl.name)})")
    call = call_source(tpl, [f"a{i}" for i in range(n)], 0, "self.gen", k) if tpl.runnable else ""
    if not tpl.runnable:
        pass
    elif not m:
        lines.append(call)
    else:
        if tpl.single and tpl.alias_of[0] is None:
            lines.append(f"v0 = {call}")
            lines.append(conform_source("v0", tpl.outs[0], k))
        elif tpl.single:  # one view of a slot: exact_view, inlined for the case that passes
            want = tpl.outs[0]
            lines.append(f"v0 = {call}")
            lines.append(f"if v0.stride() != {k(want[2])} or v0.storage_offset() != {want[3]} or "
                         f"v0.shape != {k(want[1])} or v0.dtype is not {k(want[0])}: "
                         f"{k(exact_view)}(v0, {k(want)}, {k(tpl.name)})")
        else:
            lines.append(f"{''.join(f'v{i}, ' for i in range(m))}= {k(fresh_outputs)}({k(tpl.fn)}, {call}, "
                         f"{k(tpl.outs)}, {k(tpl.name)}, {k(tpl.alias_of)})")
        for i, (want, nbytes, base) in enumerate(zip(tpl.outs, tpl.out_nbytes, tpl.alias_of)):
            lines.append(f"o = outs[{i}]")
            if base is not None:  # a view of a slot: bound as a view of its storage (see Tenant.bind_alias)
                lines.append(f"self.bind_alias(o, v{i}, h{base}, {k(want[1:])}, {extent(*want[1:])})")
                continue
            # Tenant._bind, inlined: it raises for a handle that is invalid or already in use.
            lines.append(f"if type(o) is not int or o in T: self._bind(o, v{i})")
            lines.append(f"T[o] = {k(storage)}(v{i}, {k(want[1:])}, {nbytes // want[0].itemsize}, {nbytes}, None)")
            lines.append(f"self.bytes += {nbytes}")
    src = "def run(self, slots, outs, S):\n" + "".join(f"    {line}\n" for line in lines)
    namespace: dict[str, Any] = {"K": k.values, "__builtins__": builtins}
    exec(compile(src, f"<caserve template {tpl.name}>", "exec"), namespace)  # noqa: S102 - source built above
    return namespace["run"]

