"""A tenant's graphs on the GPU server: each DefineGraph checked and compiled once
(:func:`caserve.remote.server.replay.compile_graph`), each Replay run as its compiled program, as one CUDA
graph replay where the device has them (:mod:`caserve.remote.server.cudagraph`), or record by record when
a check or an op fails, so that errors name the op exactly as eager records do.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from caserve.remote.wire import protocol as P
from caserve.remote.server.errors import TenantError
from caserve.remote.server.replay import GraphProgram, Output, compile_graph
from caserve.remote.server.tenant_memory import Storage

# The limits a tenant is told in Welcome (caserve.remote.wire.protocol.Limits), by their old names.
MAX_GRAPHS = P.LIMITS.max_graphs
MAX_GRAPH_OPS = P.LIMITS.max_graph_records
MAX_TENANT_GRAPH_OPS = P.LIMITS.max_tenant_graph_records  # compiled code is kept per record
MAX_CACHED_VIEWS = 16  # per storage


class TenantGraphs:
    """Graph mode of one tenant. Mixed into :class:`~caserve.remote.server.executor.Tenant`, which sets
    these attributes and provides the storage table (:class:`~caserve.remote.server.tenant_memory.TenantMemory`),
    ``fail`` and ``_dispatch`` (one record, as in eager mode)."""

    device: torch.device
    templates: dict
    graphs: dict[int, GraphProgram]
    graph_sizes: dict[int, int]
    graph_ops: int
    gen: torch.Generator
    cuda_graphs: Any

    # -- graph mode -------------------------------------------------------------------------------

    def _define_graph(self, op: P.DefineGraph) -> None:
        if len(self.graphs) >= MAX_GRAPHS and op.gid not in self.graphs:
            raise TenantError(f"more than {MAX_GRAPHS} graphs", "limit")
        if len(op.ops) > MAX_GRAPH_OPS:
            raise TenantError(f"a graph may hold at most {MAX_GRAPH_OPS} records", "limit")
        total = self.graph_ops - self.graph_sizes.get(op.gid, 0) + len(op.ops)
        if total > MAX_TENANT_GRAPH_OPS:
            raise TenantError(f"a tenant's graphs may hold at most {MAX_TENANT_GRAPH_OPS} records together", "limit")
        if self.cuda_graphs is not None:
            self.cuda_graphs.forget_graph(op.gid)
        self.graphs[op.gid] = compile_graph(op, self.templates, self.device)
        self.graph_sizes[op.gid] = len(op.ops)
        self.graph_ops = total

    def _replay(self, op: P.Replay, payloads: list[memoryview]) -> None:
        """Run a graph with references turned into this replay's handles (see caserve.remote.server.replay).

        ``op.keep`` None: every handle the graph makes is bound. A list: only those references are bound;
        everything else the graph made is dropped when the replay ends.
        """
        prog = self.graphs.get(op.gid)
        if prog is None:
            raise TenantError(f"unknown graph {op.gid}")
        base = op.base
        if type(base) is not int or base < 0:
            raise TenantError("invalid graph base handle")
        kept = None if op.keep is None else prog.check_keep(op.keep)
        run, need = prog.run, prog.out_nbytes
        if run is not None and kept is not None:
            run, need = prog.for_keep(kept)
        views = self._replay_views(prog, op, kept, need) if run is not None else None
        if views is None:  # not compiled, or a check failed: the record-by-record path says which op
            self._replay_records(prog, op, payloads, kept)
            return
        if kept is not None and self.cuda_graphs is not None:  # a captured step: maybe one CUDA graph replay
            run = self.cuda_graphs.runner(prog, op, kept, run, views, need)
        regs: list[Any] = [None] * prog.n_regs
        try:
            run(regs, views, op.scalars, self.gen, payloads, op.payload_base)
        except Exception as exc:  # noqa: BLE001 - reported like an eager op's failure
            step = prog.step_of(exc)
            self.fail(prog.names[step] if step is not None else "Replay", exc)
            if step is not None:  # the rest goes on record by record, as if it had run that way
                self._replay_records(prog, op, payloads, kept, step + 1, regs)
            return
        self._bind_outputs(base, regs, prog.outputs if kept is None else kept)

    def _replay_views(self, prog: GraphProgram, op: P.Replay, kept: list[Output] | None,
                      need: int) -> list[Any] | None:
        """The external views a compiled replay runs on, or None when any check fails: an external handle
        unknown, of another dtype, too small or a shared weight it writes; scalars that do not fit; a
        handle it binds already in use; no room for the ``need`` bytes it holds at most."""
        ext, scalars, storages = op.ext, op.scalars, self.storages
        if len(ext) < prog.n_ext or len(scalars) != prog.n_scalars:
            return None
        if scalars and tuple(map(type, scalars)) != prog.scalar_types:
            return None
        if self.memory_limit and self.bytes + need > self.memory_limit:
            return None
        refs = prog.out_refs if kept is None else [o.ref for o in kept]
        if any(map(storages.__contains__, map(op.base.__add__, refs))):
            return None
        views: list[Any] = [None] * prog.n_views
        get = storages.get
        for j, dtype, reach, written, uses in prog.ext_plan:
            st = get(ext[j])
            if st is None:
                return None
            t = st.tensor
            if t.dtype is not dtype or reach > st.numel or (written and st.blob is not None):
                return None
            for geom, i in uses:
                if geom == st.geom:
                    views[i] = t
                elif written:  # an op that writes may also restride its argument: a fresh view each time
                    views[i] = t.as_strided(*geom)
                else:  # read-only views live with the storage, so that replays after the first reuse them
                    cache = st.views
                    if cache is None:
                        cache = st.views = {}
                    v = cache.get(geom)
                    if v is None:
                        if len(cache) >= MAX_CACHED_VIEWS:
                            cache.clear()
                        v = cache[geom] = t.as_strided(*geom)
                    views[i] = v
        return views

    def _bind_outputs(self, base: int, regs: list[Any], outputs: list[Output]) -> None:
        storages = self.storages
        nbytes = 0
        for o in outputs:
            storages[base + o.ref] = Storage(regs[o.reg], o.geom, o.numel, o.nbytes, None)
            nbytes += o.nbytes
        self.bytes += nbytes

    def _replay_records(self, prog: GraphProgram, op: P.Replay, payloads: list[memoryview],
                        kept: list[Output] | None, start: int = 0, regs: list[Any] | None = None) -> None:
        """Run a graph record by record from step ``start``, each through the table like an eager record;
        ``regs``: what a compiled run that failed made so far, bound first."""
        base, ext, scalars = op.base, op.ext, op.scalars
        n_ext = len(ext)
        # A keep-replay binds what it does not keep under temporary handles, below every handle in the
        # table (so never one the client holds), and drops them at the end.
        temp: dict[int, int] = {}
        if kept is not None:
            keep = {o.ref for o in kept}
            low = min(min(self.storages, default=0), 0) - 1
            temp = {o.ref: low - i for i, o in enumerate(prog.outputs) if o.ref not in keep}

        def handle(r: int) -> int:
            if r >= 0:
                return temp.get(r, base + r)
            if -r > n_ext:
                raise TenantError(f"graph {op.gid} needs external handle {-r - 1}; the replay gave {n_ext}")
            return ext[-r - 1]

        try:
            if regs is not None:
                storages = self.storages
                for o in prog.outputs:
                    if regs[o.reg] is not None and handle(o.ref) not in storages:
                        self._bind(handle(o.ref), regs[o.reg], geom=o.geom, nbytes=o.nbytes)
            for i in range(start, len(prog.steps)):
                tpl, a, b = prog.steps[i]
                try:
                    if tpl is not None:
                        used = prog.scalar_offsets[i]
                        mine = scalars[used:used + len(tpl.scalar_types)]
                        tpl.runner(self, [handle(r) for r in a], [handle(r) for r in b], mine)
                    else:
                        fields = {"handle": handle(a.handle)}
                        if hasattr(a, "payload"):
                            fields["payload"] = op.payload_base + a.payload
                        self._dispatch(msgspec.structs.replace(a, **fields), payloads)
                except Exception as exc:  # noqa: BLE001 - reported like an eager op's failure
                    self.fail(prog.names[i], exc)
            if prog.n_scalars != len(scalars):
                raise TenantError(f"graph {op.gid} takes {prog.n_scalars} scalars; the replay gave {len(scalars)}")
        finally:
            if temp:
                self.free(list(temp.values()))

