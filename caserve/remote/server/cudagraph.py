"""CUDA graph replay of captured steps: one graph launch per step instead of one Python launch per op.

A captured step (:mod:`caserve.remote.client.capture`) reaches the server as a keep-replay of a graph
program (:mod:`caserve.remote.server.replay`): the same records every time, fixed external handles for the
weights and the KV cache, fresh handles for the step's inputs. The compiled replay still launches every
kernel from Python. On a CUDA device this module captures such a replay once into a ``torch.cuda.CUDAGraph``
and replays it from then on as a few calls: one device copy per input into its static buffer, one graph
replay, one copy per kept output out of the graph's memory.

Keys. A graph program's externals are told apart by watching consecutive replays of it: an external the
program writes (a cache) and an external whose handle did not change since the previous replay (a weight)
are *fixed*: the CUDA graph reads and writes them where they are, so their handles are part of the key. The
other externals are *inputs*: each gets a static buffer that the graph reads. A key is therefore
(the graph's id, each external's handle or ``None`` for an input, the replay's scalars, which the graph bakes
into its kernels). A key seen ``CAPTURE_AFTER`` times (a first replay only teaches which handles change) is captured
on the next sighting.

Capture. The replay that captures first runs the compiled program for real on the tenant's stream (its
results are that step's; it is also the warm-up that CUDA graphs need: cuBLAS handles and workspaces, lazy
initialisation), then captures the same program on the same stream into the tenant's own memory pool, with
``capture_error_mode="thread_local"`` so that other tenants' threads go on undisturbed. Capture runs the
program's Python but executes nothing, so in-place updates (a cache) happen once. A capture that fails (an
op that synchronises, say) is logged once and the key is never tried again: it goes on as a compiled replay.

Never captured: a replay that binds every handle (a recorded segment, ``keep`` is None), a program with
records other than ops and allocations (uploads read host payloads), a random op (the tenant's generator
would be frozen into the graph), more than ``MAX_INPUT_BYTES`` of inputs, or a graph that would pass the
tenant's memory limit.

Memory. A graph's outputs live in its pool and are overwritten by the next replay, so a replay copies each
kept output into a tensor of its own before binding it. A graph is charged to its tenant as its static
inputs plus the most bytes its program holds at once (what the pool holds for it; the tenant's graphs share
one pool, so this overstates rather than understates), and uncharged when it is dropped.

Invalidation. A graph is dropped when a fixed handle it uses is freed (a cache or weight let go, a weight
replaced by a copy-on-write copy under a new handle), when its program is redefined, when the tenant resets
its templates, and when the tenant goes; the oldest is dropped when the tenant holds ``MAX_GRAPHS``. An
in-place reset of a cache (``zero_``) keeps its storage and so its graph.

The CUDA calls sit behind :class:`GraphBackend`, so that everything else is tested on the CPU with a fake.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from caserve.remote.wire import protocol as P

logger = logging.getLogger(__name__)

CAPTURE_AFTER = 1  # compiled replays of a key before the next one with it captures it
MAX_GRAPHS = 64  # CUDA graphs per tenant; the least recently replayed goes first
MAX_INPUT_BYTES = 64 << 20  # static input buffers of one graph
MAX_WATCHED = 256  # keys counted per graph program before the count starts afresh
MAX_REFUSED = 256  # keys remembered as not capturable per graph program

Run = Callable[..., None]  # a compiled program: run(R, X, S, G, PL, PB)


def enabled() -> bool:
    """CUDA graphs are on unless ``CASERVE_CUDA_GRAPHS=0`` (read when a tenant connects)."""
    return os.environ.get("CASERVE_CUDA_GRAPHS", "1") != "0"


class GraphBackend(Protocol):
    """The CUDA calls (the seam tests replace)."""

    def new_pool(self, device: torch.device) -> Any:
        """A memory pool token for one tenant's graphs."""

    def capture(self, fn: Callable[[], list[torch.Tensor]], pool: Any, stream: Any) -> Any:
        """Capture what ``fn`` launches into a graph (an object with ``replay()``); raises when it cannot.

        ``fn`` returns the graph's outputs: each replay leaves its results in those tensors."""


class TorchCudaBackend:
    """:class:`GraphBackend` on ``torch.cuda``."""

    _lock = threading.Lock()  # one capture at a time in the process, as torch.cuda.graph asks

    def new_pool(self, device: torch.device) -> Any:
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], list[torch.Tensor]], pool: Any, stream: Any) -> Any:
        graph = torch.cuda.CUDAGraph()
        with self._lock, torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            fn()
        return graph


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0  # steps run as one CUDA graph replay
    failures: int = 0  # captures that failed (the key then runs as a compiled replay)
    dropped: int = 0  # graphs let go: invalidated, evicted or reset


@dataclass(eq=False)
class CudaGraph:
    """One captured step: the graph, its static inputs and outputs, what it is charged."""

    gid: int
    key: tuple
    graph: Any
    inputs: list[tuple[int, torch.Tensor]]  # (external position, static flat buffer of the extent read)
    outputs: list[tuple[int, torch.Tensor, tuple]]  # (register, flat view of the static output, geometry)
    fixed: tuple[int, ...]  # the fixed external handles it uses
    nbytes: int


@dataclass(eq=False)
class _Program:
    """What is watched of one graph program."""

    prog: Any  # the GraphProgram; a redefinition is a new object
    written: tuple[bool, ...]  # per external position the program reads
    last: tuple | None = None  # the external handles of the previous replay
    seen: dict[tuple, int] = field(default_factory=dict)
    refused: set[tuple] = field(default_factory=set)
    graphs: dict[tuple, CudaGraph] = field(default_factory=dict)
    why_not: str | None = None  # why the program can never be captured


class TenantGraphs:
    """A tenant's CUDA graphs (see the module docstring). Used by the tenant's connection thread only."""

    def __init__(self, tenant: Any, backend: GraphBackend) -> None:
        self.tenant = tenant
        self.backend = backend
        self.pool: Any = None  # made on the first capture
        self.programs: dict[int, _Program] = {}
        self.lru: OrderedDict[tuple[int, tuple], CudaGraph] = OrderedDict()
        self.by_handle: dict[int, set[tuple[int, tuple]]] = {}
        self.nbytes = 0
        self.stats = GraphStats()

    # -- the executor's hook ------------------------------------------------------------------------

    def runner(self, prog: Any, op: P.Replay, kept: list[Any], run: Run, views: list[Any], need: int) -> Run:
        """What runs this keep-replay: a CUDA graph replay, the compiled ``run`` followed by a capture,
        or ``run`` alone. Called after every check of the replay passed; all three fill the registers of
        the ``kept`` outputs."""
        watched = self.programs.get(prog.gid)
        if watched is None or watched.prog is not prog:
            if watched is not None:
                self.forget_graph(prog.gid)
            watched = self.programs[prog.gid] = _Program(prog, _written(prog), why_not=_why_not(prog))
        if watched.why_not is not None:
            return run
        ext = tuple(op.ext[:len(watched.written)])
        last, watched.last = watched.last, ext
        if last is None:
            mask = ext
        else:
            mask = tuple([h if w or h == old else None for h, old, w in zip(ext, last, watched.written)])
        key = (mask, tuple(op.scalars))
        graph = watched.graphs.get(key)
        if graph is not None:
            self.lru.move_to_end((prog.gid, key))
            return lambda regs, *_: self._replay(graph, op.ext, regs)
        if key in watched.refused:
            return run
        count = watched.seen.get(key, 0)
        if count < CAPTURE_AFTER:
            if len(watched.seen) >= MAX_WATCHED:
                watched.seen.clear()
            watched.seen[key] = count + 1
            return run
        watched.seen.pop(key, None)

        def run_then_capture(regs: list, X: list, S: list, G: Any, PL: list, PB: int) -> None:  # noqa: N803
            run(regs, X, S, G, PL, PB)  # the step itself, and the warm-up of what is captured
            try:
                self._capture(watched, key, op, kept, run, views, need)
            except Exception as exc:  # noqa: BLE001 - any failure: the step goes on as a compiled replay
                self.stats.failures += 1
                logger.warning("tenant %d: graph %d could not be captured as a CUDA graph (%s: %s); it runs as a "
                               "compiled replay", self.tenant.id, prog.gid, type(exc).__name__, exc)
                self._refuse(watched, key)

        return run_then_capture

    # -- replay and capture -------------------------------------------------------------------------

    def _replay(self, graph: CudaGraph, ext: list[int], regs: list[Any]) -> None:
        storages = self.tenant.storages
        for pos, buf in graph.inputs:
            buf.copy_(_flat(storages[ext[pos]], buf.numel()))
        graph.graph.replay()
        for reg, flat, geom in graph.outputs:
            regs[reg] = flat.clone().as_strided(*geom)
        self.stats.replays += 1

    def _capture(self, watched: _Program, key: tuple, op: P.Replay, kept: list[Any], run: Run,
                 views: list[Any], need: int) -> None:
        prog, tenant = watched.prog, self.tenant
        mask = key[0]
        X = list(views)  # fixed externals: the very tensors the graph will read and write
        inputs: list[tuple[int, torch.Tensor]] = []
        input_bytes = 0
        for j, dtype, reach, _written, uses in prog.ext_plan:
            if mask[j] is not None:
                continue
            buf = torch.empty(reach, dtype=dtype, device=tenant.device)
            buf.copy_(_flat(tenant.storages[op.ext[j]], reach))
            input_bytes += reach * dtype.itemsize
            for geom, i in uses:
                X[i] = buf.as_strided(*geom)
            inputs.append((j, buf))
        charge = input_bytes + need
        why = None
        if input_bytes > MAX_INPUT_BYTES:
            why = f"its inputs take {input_bytes} bytes (at most {MAX_INPUT_BYTES})"
        elif tenant.memory_limit and tenant.bytes + need + charge > tenant.memory_limit:
            why = f"it would take {charge} bytes past the tenant's memory limit"
        if why is not None:
            logger.info("tenant %d: graph %d is not captured as a CUDA graph: %s", tenant.id, prog.gid, why)
            self._refuse(watched, key)
            return
        if len(self.lru) >= MAX_GRAPHS:
            self._drop(*next(iter(self.lru)))
        if self.pool is None:
            self.pool = self.backend.new_pool(tenant.device)
        regs: list[Any] = [None] * prog.n_regs

        def step() -> list[torch.Tensor]:
            run(regs, X, op.scalars, tenant.gen, [], 0)
            return [regs[o.reg] for o in kept]

        graph = self.backend.capture(step, self.pool, tenant.stream)
        outputs = [(o.reg, _flat_tensor(regs[o.reg], o.numel), o.geom) for o in kept]
        fixed = tuple(h for h in mask if h is not None)
        cg = CudaGraph(prog.gid, key, graph, inputs, outputs, fixed, charge)
        watched.graphs[key] = cg
        self.lru[(prog.gid, key)] = cg
        for h in set(fixed):
            self.by_handle.setdefault(h, set()).add((prog.gid, key))
        self.nbytes += charge
        tenant.bytes += charge
        self.stats.captures += 1
        logger.debug("tenant %d: graph %d captured as a CUDA graph (%d inputs, %d outputs, %d bytes)", tenant.id,
                     prog.gid, len(inputs), len(outputs), charge)

    def _refuse(self, watched: _Program, key: tuple) -> None:
        if len(watched.refused) >= MAX_REFUSED:
            watched.refused.clear()
        watched.refused.add(key)

    # -- invalidation --------------------------------------------------------------------------------

    def _drop(self, gid: int, key: tuple) -> None:
        cg = self.lru.pop((gid, key), None)
        if cg is None:
            return
        watched = self.programs.get(gid)
        if watched is not None:
            watched.graphs.pop(key, None)
        for h in set(cg.fixed):
            users = self.by_handle.get(h)
            if users is not None:
                users.discard((gid, key))
                if not users:
                    del self.by_handle[h]
        self.nbytes -= cg.nbytes
        self.tenant.bytes -= cg.nbytes
        self.stats.dropped += 1

    def forget_handles(self, handles: list[int]) -> None:
        """Storages ``handles`` are gone: drop the graphs that use them."""
        if not self.by_handle:
            return
        for h in handles:
            users = self.by_handle.get(h)
            if users:
                for gid, key in list(users):
                    self._drop(gid, key)

    def forget_graph(self, gid: int) -> None:
        """Graph program ``gid`` is redefined or gone."""
        watched = self.programs.pop(gid, None)
        if watched is not None:
            for key in list(watched.graphs):
                self._drop(gid, key)

    def clear(self) -> None:
        """Drop every graph (templates reset, tenant gone); the pool goes with the last of them."""
        for gid in list(self.programs):
            self.forget_graph(gid)
        self.pool = None


def _written(prog: Any) -> tuple[bool, ...]:
    """Per external position up to the last the program reads: whether it writes it."""
    written = [False] * prog.n_ext
    for j, _dtype, _reach, w, _uses in prog.ext_plan:
        written[j] = w
    return tuple(written)


def _why_not(prog: Any) -> str | None:
    """Why program ``prog`` can never be a CUDA graph, or None."""
    if prog.run is None:
        return "it is not compiled"
    for tpl, rec, _ in prog.steps:
        if tpl is None and type(rec) is not P.Alloc:
            return f"it holds a {type(rec).__name__} record"
        if tpl is not None and tpl.random:
            return f"{tpl.name} draws random numbers"
    return None


def _flat(st: Any, n: int) -> torch.Tensor:
    """The first ``n`` elements of a storage, as one contiguous vector (kept with its views)."""
    cache = st.views
    if cache is None:
        cache = st.views = {}
    geom = ((n,), (1,), 0)
    v = cache.get(geom)
    if v is None:
        v = cache[geom] = st.tensor.as_strided(*geom)
    return v


def _flat_tensor(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.as_strided((n,), (1,), 0)


def for_tenant(tenant: Any) -> TenantGraphs | None:
    """The CUDA graphs of a new tenant: on CUDA devices unless turned off (see :func:`enabled`)."""
    if not enabled():
        return None
    backend = BACKEND[0]
    if backend is None and tenant.device.type == "cuda":
        backend = TorchCudaBackend()
    return TenantGraphs(tenant, backend) if backend is not None else None


# Tests put a fake GraphBackend here to run this module on a CPU server.
BACKEND: list[GraphBackend | None] = [None]


__all__ = ["CudaGraph", "GraphBackend", "GraphStats", "TenantGraphs", "TorchCudaBackend", "enabled", "for_tenant"]
