"""Compiled server code for graphs: a tenant's DefineGraph checked once and compiled into one
straight-line function (a *graph program*).

A graph's records name values by *reference* (``r >= 0``: a handle the graph makes, ``r < 0``: an
external handle of the replay). Everything about references is static, so it is checked here, once:
each value read is made by an earlier record or is external, every template exists and fits its
record, the geometry of every internal value is known from its template's outputs, so each view of
one is chosen (the tensor itself or ``as_strided``) and checked at definition time.

What is left for a replay is what only it knows: its external handles (checked once per replay
against what the program needs of each: dtype, extent, whether it is written), its scalar values and
its payloads. The program then runs over a register list; its source is generated from register,
constant and scalar indices and the templates' own builder pieces (see :mod:`caserve.remote.server.templates`),
never from client text. (Generated functions see the real builtins: ATen's argument parser imports
modules from the calling frame.)

Graphs holding a record the program does not compile (a shared upload) run on the record-by-record
path in :class:`caserve.remote.server.tenant_graphs.TenantGraphs`, which also takes over whenever a
replay's up-front checks fail, so that errors read exactly as they always have.

Eager Run records have compiled code of their own: :mod:`caserve.remote.server.runner`.
"""

from __future__ import annotations

import bisect
import builtins
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.wire.codec import extent
from caserve.remote.server.runner import (
    Consts,
    call_source,
    conform_source,
    device_copy,
    fresh_outputs,
    payload_at,
    tensor_from_bytes,
)
from caserve.remote.server.templates import Template, TenantError, check_geom

Geom = tuple[tuple[int, ...], tuple[int, ...], int]

PART_STEPS = 256  # steps per generated function of a graph program
MAX_VARIANTS = 4  # keep-replay variants compiled per graph


def _upload(payloads: list[memoryview], index: int, dtype: torch.dtype, size: tuple[int, ...],
            device: torch.device) -> torch.Tensor:
    return device_copy(tensor_from_bytes(payload_at(payloads, index), dtype, size), device)


def _copy_in(payloads: list[memoryview], index: int, dst: torch.Tensor, src_dtype: torch.dtype,
             src_size: tuple[int, ...]) -> None:
    dst.copy_(tensor_from_bytes(payload_at(payloads, index), src_dtype, src_size))


@dataclass
class Output:
    """A value the graph makes: reference ``ref``, held in register ``reg`` during a replay."""

    ref: int
    reg: int
    geom: Geom
    numel: int
    nbytes: int


@dataclass
class External:
    """What a program needs of external handle ``ext[index]``; ``views`` maps geometry -> X index."""

    index: int
    dtype: torch.dtype
    extent: int = 0
    written: bool = False
    views: dict[Geom, int] = field(default_factory=dict)


@dataclass
class GraphProgram:
    gid: int
    steps: list[tuple]  # the record-by-record form: (template, slot refs, out refs) or (None, record, None)
    scalar_offsets: list[int]  # per step: the index of its first scalar in a replay's scalars
    n_scalars: int
    names: list[str]  # per step: the name failures are reported under
    outputs: list[Output]
    by_ref: dict[int, Output]
    out_nbytes: int  # everything the graph makes, charged while a replay runs
    # The compiled form; ``run`` is None for graphs that always take the record-by-record path.
    run: Callable[..., None] | None = None
    n_regs: int = 0
    n_views: int = 0
    n_ext: int = 0  # externals the program reads: a replay gives at least this many
    scalar_types: tuple[type, ...] = ()
    externals: list[External] = field(default_factory=list)
    # The same, flat for the replay's checks: (index, dtype, extent, written, ((geometry, X index), ...)).
    ext_plan: tuple[tuple[int, torch.dtype, int, bool, tuple[tuple[Geom, int], ...]], ...] = ()
    out_refs: tuple[int, ...] = ()
    # The id of each generated part's code (code objects compare by value) -> (its first step, the first
    # source line of each of its steps). Each part lives as long as its entry: the base program and the
    # variants hold them.
    parts: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    # The source, kept for keep-replay variants: lines, the first line of each step, the constants.
    lines: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    consts: list[Any] = field(default_factory=list)
    made_bytes: list[int] = field(default_factory=list)  # per step: the bytes of what it makes
    drops_at: dict[int, list[Output]] = field(default_factory=dict)  # step -> the outputs it uses last
    # Keep-replay variants, by the references they keep: (program, peak bytes, its parts).
    variants: dict[frozenset[int], tuple[Callable[..., None], int, list[int]]] = field(default_factory=dict)

    def check_keep(self, keep: list[int]) -> list[Output]:
        """The outputs a keep-replay names: references this graph makes, each once."""
        out: list[Output] = []
        seen: set[int] = set()
        for r in keep:
            o = self.by_ref.get(r) if type(r) is int else None
            if o is None:
                raise TenantError(f"graph {self.gid} keeps reference {r!r}, which is not a handle it makes")
            if r in seen:
                raise TenantError(f"graph {self.gid} keeps reference {r} twice")
            seen.add(r)
            out.append(o)
        return out

    def for_keep(self, kept: list[Output]) -> tuple[Callable[..., None], int]:
        """The program of a keep-replay and the most bytes it holds at once.

        The variant lets go of each value it does not keep after its last use, so that a replay holds
        about what running the records one by one would (not everything the graph makes); it is compiled
        on first use and kept for the replays that keep the same references."""
        key = frozenset(o.ref for o in kept)
        variant = self.variants.get(key)
        if variant is None:
            lines: list[str] = []
            starts: list[int] = []
            alive = peak = 0
            for i, start in enumerate(self.starts):
                starts.append(len(lines))
                lines.extend(self.lines[start:self.starts[i + 1] if i + 1 < len(self.starts) else len(self.lines)])
                alive += self.made_bytes[i]
                peak = max(peak, alive)
                for o in self.drops_at.get(i, ()):
                    if o.ref not in key:
                        lines.append(f"R[{o.reg}] = None")
                        alive -= o.nbytes
            run, parts = _compile_parts(self.gid, lines, starts, self.consts)
            if len(self.variants) >= MAX_VARIANTS:  # the oldest goes
                _, _, old = self.variants.pop(next(iter(self.variants)))
                for code_id in old:
                    self.parts.pop(code_id, None)
            self.parts.update(parts)
            variant = self.variants[key] = (run, peak, list(parts))
        return variant[0], variant[1]

    def step_of(self, exc: BaseException) -> int | None:
        """The step a failure of ``run`` happened in, from the line of the generated part it was in."""
        found = None
        tb = exc.__traceback__
        while tb is not None:
            part = self.parts.get(id(tb.tb_frame.f_code))
            if part is not None:
                found = part, tb.tb_lineno
            tb = tb.tb_next
        if found is None:
            return None
        (first, lines), line = found
        return first + max(0, bisect.bisect_right(lines, line) - 1)


class _Builder:
    """Generates a program's source: ``R`` registers, ``X`` external views, ``S`` scalars, ``G`` the
    tenant's generator, ``PL``/``PB`` payloads and payload base; ``K`` holds every constant."""

    def __init__(self, gid: int, device: torch.device) -> None:
        self.gid = gid
        self.device = device
        self.k = Consts()
        self.lines: list[str] = []
        self.regs: dict[int, int] = {}  # internal reference -> register
        self.outputs: list[Output] = []
        self.by_ref: dict[int, Output] = {}
        self.dtypes: dict[int, torch.dtype] = {}  # internal reference -> dtype
        self.externals: dict[int, External] = {}
        self.n_views = 0
        self.last_use: dict[int, int] = {}  # internal reference -> the last step that makes or reads it
        self.made_at: dict[int, int] = {}  # internal reference -> the step that makes it

    def produce(self, ref: Any, dtype: torch.dtype, geom: Geom, step: int) -> str:
        if type(ref) is not int or ref < 0:
            raise TenantError(f"graph {self.gid}: step {step} makes reference {ref!r}; made values are >= 0")
        if ref in self.regs:
            raise TenantError(f"graph {self.gid}: reference {ref} is made twice")
        reg = self.regs[ref] = len(self.regs)
        numel = extent(*geom)
        out = Output(ref, reg, geom, numel, numel * dtype.itemsize)
        self.outputs.append(out)
        self.by_ref[ref] = out
        self.dtypes[ref] = dtype
        self.last_use[ref] = self.made_at[ref] = step
        return f"R[{reg}]"

    def view(self, ref: Any, dtype: torch.dtype, geom: Geom, need: int, written: bool, step: int) -> str:
        """The expression of a slot: reference ``ref`` seen as ``dtype``/``geom``."""
        if type(ref) is not int:
            raise TenantError(f"graph {self.gid}: step {step} reads reference {ref!r}")
        if ref >= 0:
            out = self.by_ref.get(ref)
            if out is None:
                raise TenantError(f"graph {self.gid}: step {step} reads reference {ref} before a step makes it")
            if self.dtypes[ref] is not dtype:
                raise TenantError(f"graph {self.gid}: step {step} reads reference {ref} ({self.dtypes[ref]}) as {dtype}")
            if need > out.numel:
                raise TenantError(f"graph {self.gid}: step {step} views {geom} past the {out.numel} elements of "
                                  f"reference {ref}")
            self.last_use[ref] = step
            reg = f"R[{out.reg}]"
            if geom == out.geom:
                return reg
            return f"{reg}.as_strided({self.k(geom[0])}, {self.k(geom[1])}, {geom[2]})"
        j = -ref - 1
        e = self.externals.get(j)
        if e is None:
            e = self.externals[j] = External(j, dtype)
        elif e.dtype is not dtype:
            raise TenantError(f"graph {self.gid}: external handle {j} is read as {e.dtype} and as {dtype}")
        e.extent = max(e.extent, need)
        e.written = e.written or written
        xi = e.views.get(geom)
        if xi is None:
            xi = e.views[geom] = self.n_views
            self.n_views += 1
        return f"X[{xi}]"

    def run_step(self, tpl: Template, slots: list[int], outs: list[int], so: int, step: int) -> None:
        if len(slots) != len(tpl.slots) or len(outs) != len(tpl.outs):
            raise TenantError(f"graph {self.gid}: {tpl.name} takes {len(tpl.slots)} inputs and {len(tpl.outs)} outputs")
        views = [self.view(r, s.dtype, s.geom, s.extent, i in tpl.write_slots, step)
                 for i, (r, s) in enumerate(zip(slots, tpl.slots))]
        call = call_source(tpl, views, so, "G", self.k)
        targets = [self.produce(r, w[0], w[1:], step) for r, w in zip(outs, tpl.outs)]
        if not targets:
            self.lines.append(call)
        elif tpl.single:
            want = tpl.outs[0]
            self.lines.append(f"v = {call}")
            self.lines.append(conform_source("v", want, self.k))
            self.lines.append(f"{targets[0]} = v")
        else:
            self.lines.append(f"{', '.join(targets)}, = {self.k(fresh_outputs)}({self.k(tpl.fn)}, {call}, "
                              f"{self.k(tpl.outs)}, {self.k(tpl.name)})")


def _compile_parts(gid: int, lines: list[str], starts: list[int], consts: list[Any]
                   ) -> tuple[Callable[..., None], dict[int, tuple[int, list[int]]]]:
    """A program from its source lines (``starts``: the index of each step's first line).

    Steps are compiled in parts of ``PART_STEPS``, so that a large graph never holds the interpreter (and
    every other tenant) in one long compile; the program calls the parts in order."""
    fns: list[Callable[..., None]] = []
    parts: dict[int, tuple[int, list[int]]] = {}
    n = len(starts)
    for first in range(0, n, PART_STEPS):
        end = min(first + PART_STEPS, n)
        lo, hi = starts[first], starts[end] if end < n else len(lines)
        body = "".join(f"    {line}\n" for line in lines[lo:hi]) or "    pass\n"
        namespace: dict[str, Any] = {"K": consts, "__builtins__": builtins}
        src = "def part(R, X, S, G, PL, PB):\n" + body
        exec(compile(src, f"<caserve graph {gid} steps {first}-{end - 1}>", "exec"), namespace)  # noqa: S102
        fn = namespace["part"]
        fns.append(fn)
        parts[id(fn.__code__)] = (first, [starts[i] - lo + 2 for i in range(first, end)])  # the body starts on line 2
    if len(fns) == 1:
        return fns[0], parts
    seq = tuple(fns)

    def run(R: list, X: list, S: list, G: torch.Generator, PL: list, PB: int) -> None:  # noqa: N803
        for fn in seq:
            fn(R, X, S, G, PL, PB)

    return run, parts


def compile_graph(op: P.DefineGraph, templates: dict[int, Template], device: torch.device) -> GraphProgram:
    """Check graph ``op`` against the tenant's templates and compile it (see the module docstring)."""
    gid = op.gid
    b = _Builder(gid, device)
    steps: list[tuple] = []
    offsets: list[int] = []
    names: list[str] = []
    scalar_types: list[type] = []
    starts: list[int] = []
    fast = True
    for i, rec in enumerate(op.ops):
        starts.append(len(b.lines))
        offsets.append(len(scalar_types))
        t = type(rec)
        if t is P.Run:
            tpl = templates.get(rec.tid)
            if tpl is None:
                raise TenantError(f"graph {gid} uses unknown op template {rec.tid}")
            if not tpl.runnable:
                raise TenantError(f"graph {gid}: {tpl.name} can only be executed (its outputs are known once it ran)")
            if any(a is not None and a < len(rec.slots) and not (type(rec.slots[a]) is int and rec.slots[a] >= 0)
                   for a in tpl.alias_of):
                # A view of an external storage (a weight, say) must inherit its shared status: such graphs
                # run record by record, where Tenant.bind_alias binds it. A view of a value the graph made
                # is private memory; the program binds it as a storage of its own, charged in full.
                fast = False
            steps.append((tpl, rec.slots, rec.outs))  # the template is resolved once, here
            names.append(tpl.name)
            b.run_step(tpl, rec.slots, rec.outs, len(scalar_types), i)
            scalar_types.extend(tpl.scalar_types)
            continue
        steps.append((None, rec, None))
        names.append(t.__name__)
        if t is P.Alloc:
            dt, size, stride, _ = check_geom(rec.dtype, rec.size, rec.stride, 0)
            reg = b.produce(rec.handle, dt, (size, stride, 0), i)
            b.lines.append(f"{reg} = {b.k(torch.empty_strided)}({b.k(size)}, {b.k(stride)}, dtype={b.k(dt)}, "
                           f"device={b.k(device)})")
        elif t is P.Upload:
            dt, size, _, _ = check_geom(rec.dtype, rec.size, [0] * len(rec.size), 0)
            if type(rec.payload) is not int:
                raise TenantError(f"graph {gid}: invalid payload index")
            if rec.share:  # a shared weight: stays on the record-by-record path with the blob store
                fast = False
                b.produce(rec.handle, dt, (size, torch.empty(size, device="meta").stride(), 0), i)
                continue
            reg = b.produce(rec.handle, dt, (size, torch.empty(size, device="meta").stride(), 0), i)
            b.lines.append(f"{reg} = {b.k(_upload)}(PL, PB + {rec.payload}, {b.k(dt)}, {b.k(size)}, {b.k(device)})")
        elif t is P.CopyIn:
            dt, size, stride, offset = check_geom(rec.dtype, rec.size, rec.stride, rec.offset)
            src_dt, src_size, _, _ = check_geom(rec.src_dtype, rec.src_size, [0] * len(rec.src_size), 0)
            if type(rec.payload) is not int:
                raise TenantError(f"graph {gid}: invalid payload index")
            dst = b.view(rec.handle, dt, (size, stride, offset), extent(size, stride, offset), True, i)
            b.lines.append(f"{b.k(_copy_in)}(PL, PB + {rec.payload}, {dst}, {b.k(src_dt)}, {b.k(src_size)})")
        else:  # pragma: no cover - DefineGraph's decoder admits only the records above
            raise TenantError(f"a graph cannot hold {t.__name__} records")
    prog = GraphProgram(gid, steps, offsets, len(scalar_types), names, b.outputs, b.by_ref,
                        sum(o.nbytes for o in b.outputs))
    if fast:
        prog.run, prog.parts = _compile_parts(gid, b.lines, starts, b.k.values)
        prog.lines, prog.starts, prog.consts = b.lines, starts, b.k.values
        prog.made_bytes = [0] * len(starts)
        for o in b.outputs:
            prog.made_bytes[b.made_at[o.ref]] += o.nbytes
            prog.drops_at.setdefault(b.last_use[o.ref], []).append(o)
        prog.n_regs = len(b.regs)
        prog.n_views = b.n_views
        prog.n_ext = max(b.externals, default=-1) + 1
        prog.scalar_types = tuple(scalar_types)
        prog.externals = sorted(b.externals.values(), key=lambda e: e.index)
        prog.ext_plan = tuple((e.index, e.dtype, e.extent, e.written, tuple(e.views.items())) for e in prog.externals)
        prog.out_refs = tuple(o.ref for o in b.outputs)
    return prog
