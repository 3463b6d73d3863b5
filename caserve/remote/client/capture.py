"""Captured steps: a repeated forward call replayed without running its Python at all.

Graph mode (:mod:`caserve.remote.client.graph`) still runs the model's Python for every call: each ATen op is
intercepted, planned and recorded on the client, and only the wire traffic shrinks. A decode step
with a static KV cache is the same function of the same shapes every time, so graph mode goes one
step further, the way CUDA graphs and ``torch.compile`` do for such steps:

1. Each call gets a *key*: the structure of its arguments, every tensor's dtype and geometry, every
   other value, and the same for the plain objects passed in (a ``StaticCache``, its layers), plus
   grad/inference mode and ``model.training``.
2. A call is recorded as usual, and watched: its records, the tensors it reads that it did not make
   (*sources*: an input's tensor, found by its place in the key, or one of the model's parameters and
   buffers), the handles it mints, what it returns, and whether the objects it was given look the same
   after the call as before.
3. When two calls with the same key behave identically (same records, scalar values, sources,
   outputs), the call becomes a *step*: the server gets its records once (``DefineGraph``) and later
   calls with that key send one ``Replay`` carrying this call's source handles and the output handles
   to keep; the client builds the outputs from the recorded layouts without running forward.

A call is never captured when it syncs (its Python depends on data), uploads host data, runs eagerly
(copy-on-write, reseeding), changes the Python state of what it was given, or keeps a tensor it made
anywhere but in its return value. A step is not replayed, but recorded again, when the model's
parameters or buffers are no longer the same tensors or the inputs alias each other differently.

The contract is that of CUDA graphs: a forward whose Python reads nothing but its arguments, the
model's tensors and the shapes of both behaves the same on every call with the same key. Models from
Transformers with a static cache are written for exactly that (``torch.compile`` relies on it).
``caserve.remote.graph_mode(model, capture=False)`` turns captured steps off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from caserve.remote.client.records import CallLog, Region, reference_form
from caserve.remote.client.tensor import LAZY, RemoteStorage, RemoteTensor, ready
from caserve.remote.wire import protocol as P

logger = logging.getLogger(__name__)

MAX_STEPS = 256  # captured steps per model (one per shape family: prompt lengths, batch sizes)
MAX_KEYS = 1024  # keys remembered while they are being watched (recorded calls not yet captured)
MAX_TRIES = 4  # recordings of one key that may fail to capture before it is given up on
MAX_DEPTH = 3  # how deep the objects passed to forward are looked into

_SIMPLE = frozenset({int, str, type(None)})
_TAGGED = frozenset({float, bool, torch.dtype, torch.device, torch.layout, torch.memory_format})


class Uncapturable(Exception):
    """This call cannot become a step (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Call keys


def call_key(args: tuple, kwargs: dict, leaves: list[Any]) -> tuple:
    """The key of a call; ``leaves`` receives every caserve tensor and plain object in it, in order."""
    if torch.is_grad_enabled():
        raise Uncapturable("autograd is recording (a replay would return tensors without history)")
    return (_walk(args, leaves, 0), _walk(kwargs, leaves, 0), torch.is_inference_mode_enabled(),
            torch.get_default_dtype(), torch.is_autocast_enabled())


def _walk(x: Any, leaves: list[Any], depth: int) -> Any:
    t = type(x)
    if t is RemoteTensor:
        leaves.append(x)
        return x._cs
    if t in _SIMPLE:
        return x
    if t in _TAGGED:
        return (t, x)
    if t is tuple or t is list:
        return (t, tuple([_walk(v, leaves, depth) for v in x]))
    if t is dict:
        return (t, tuple([(k, _walk(v, leaves, depth)) for k, v in x.items()]))
    if isinstance(x, (tuple, list)):  # named tuples and other sequence types
        return (t, tuple([_walk(v, leaves, depth) for v in x]))
    if isinstance(x, dict):  # ordered dicts, model outputs passed back in
        return (t, tuple([(k, _walk(v, leaves, depth)) for k, v in x.items()]))
    if isinstance(x, torch.Tensor):
        raise Uncapturable(f"a {x.device} tensor is passed to forward")
    if isinstance(x, torch.nn.Module) or not hasattr(x, "__dict__"):
        raise Uncapturable(f"forward is given a {t.__name__}")
    if depth >= MAX_DEPTH:
        raise Uncapturable(f"a {t.__name__} nested too deeply in forward's arguments")
    # A plain object (a KV cache, its layers): its class and attributes, the same way. Attributes that are
    # tensors or plain values (most of a cache layer's) are handled here without a call.
    leaves.append(x)
    items = []
    for k, v in vars(x).items():
        tv = type(v)
        if tv is RemoteTensor:
            leaves.append(v)
            items.append((k, v._cs))
        elif tv is int or tv is str or v is None:
            items.append((k, v))
        else:
            items.append((k, _walk(v, leaves, depth + 1)))
    return (t, tuple(items))


class Weight(NamedTuple):
    """A parameter or buffer of the model, and where it lives (``holder[name]``)."""

    holder: dict  # the module's ``_parameters`` or ``_buffers``
    name: str
    tensor: torch.Tensor


def _model_tensors(model: torch.nn.Module) -> list[Weight]:
    """Every parameter and buffer of the model."""
    out = []
    for module in model.modules():
        for d in (module._parameters, module._buffers):
            for name, t in d.items():
                if t is not None:
                    out.append(Weight(d, name, t))
    return out


# ---------------------------------------------------------------------------------------------
# What a call reads and returns


@dataclass(frozen=True, slots=True)
class FromInput:
    """A tensor read but not made by the call: one forward was given, leaf ``leaf`` of the call's key."""

    leaf: int


@dataclass(frozen=True, slots=True)
class FromModel:
    """A tensor read but not made by the call: the model's parameter or buffer ``Step.weights[index]``."""

    index: int


Source = FromInput | FromModel


@dataclass(frozen=True, slots=True)
class Made:
    """An output on storage the call made: handle ``base + ref`` of the replay, laid out as given."""

    ref: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True, slots=True)
class Passed:
    """An output that is leaf ``leaf`` of the call's key itself (an argument returned as it came)."""

    leaf: int


@dataclass(frozen=True, slots=True)
class ViewOf:
    """An output that views a tensor the call read but did not make (``source``), laid out as given."""

    source: Source
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True, slots=True)
class Value:
    """An output that is a plain value (a number, a dtype, None)."""

    value: Any


Out = Made | Passed | ViewOf | Value


@dataclass
class Behaviour:
    """What one recorded call did; the second call of a key that behaves the same becomes a step."""

    sig: tuple  # its records in reference form (caserve.remote.client.records.reference_form)
    minted: int  # handles it minted
    sources: tuple[Source, ...]  # per external handle of the records: where that tensor comes from
    scalars: tuple  # the values of the records' scalar slots
    keep: tuple[int, ...]  # references of the storages its outputs are on
    outs: tuple[Out, ...]  # per output leaf
    spec: pytree.TreeSpec  # the structure of its return value
    aliases: tuple[int, ...]  # per leaf: the first leaf sharing its storage (or -1)


# ---------------------------------------------------------------------------------------------
# Steps


@dataclass(eq=False)
class Step:
    gid: int
    minted: int  # handles the call mints: a replay reserves as many
    sources: tuple[Source, ...]  # per external handle of the graph
    scalars: list[Any]
    keep: list[int]  # references of the output storages
    outs: list[Out]  # per output leaf
    spec: pytree.TreeSpec
    aliases: tuple[int, ...]  # per leaf: the first leaf sharing its storage (or -1)
    weights: list[Weight]  # the model's tensors it reads
    epoch: int  # the session's template epoch the graph was defined in
    # ``ext`` of a replay with the weights' handles filled in (checked at ``weights_epoch``), and the
    # positions the inputs' handles go to: (position in ext, leaf index).
    ext: list[int] = field(default_factory=list)
    inputs: list[tuple[int, int]] = field(default_factory=list)
    weights_epoch: int = -1


# Bumped whenever a module anywhere gets a new parameter or buffer, or a weight is copied on write (its
# handle changes): a step then checks its weights again before replaying.
WEIGHTS_EPOCH = [0]


def weights_changed(*_: Any) -> None:
    WEIGHTS_EPOCH[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(weights_changed)
torch.nn.modules.module.register_module_buffer_registration_hook(weights_changed)


def _aliases(leaves: list[Any]) -> tuple[int, ...]:
    """Per leaf: the first leaf with the same storage (itself if none), -1 for objects."""
    first: dict[int, int] = {}
    return tuple([first.setdefault(id(x._st), i) if type(x) is RemoteTensor else -1 for i, x in enumerate(leaves)])


class Capture:
    """The captured steps of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.steps: dict[tuple, Step] = {}
        self.seen: dict[tuple, tuple] = {}  # key -> the last recorded call's behaviour
        self.tries: dict[tuple, int] = {}

    def wants(self, key: tuple) -> bool:
        return self.tries.get(key, 0) < MAX_TRIES

    # -- replaying ---------------------------------------------------------------------------------

    def replay(self, session: Any, key: tuple, leaves: list[Any]) -> Any:
        """The outputs of a replayed step, or ``None`` when the call has to be recorded instead."""
        step = self.steps.get(key)
        if step is None:
            return None
        if step.epoch != session.epoch:  # the server forgot its graph
            del self.steps[key]
            return None
        if _aliases(leaves) != step.aliases:
            return None
        with session.lock:
            session.check_open()
            if step.weights_epoch != WEIGHTS_EPOCH[0] and not self._check_weights(key, step):
                return None
            ext = step.ext.copy()
            for pos, i in step.inputs:
                st = leaves[i]._st
                if st.shared:  # a shared weight passed in: eager mode copies it if written
                    return None
                if st.state == LAZY:
                    ready(st)
                ext[pos] = st.handle
            base = session.next_handle
            session.next_handle = base + step.minted
            session.emit(P.Replay(step.gid, base, ext, 0, step.scalars, step.keep))
            session.flush()  # the server runs the step while the client goes on
            session.graph_cache.step_replays += 1
            storages: dict[int, Any] = {}
            values = []
            for o in step.outs:
                kind = type(o)
                if kind is Made:
                    st = storages.get(o.ref)
                    if st is None:
                        st = storages[o.ref] = RemoteStorage.bound(session, base + o.ref, o.dtype)
                    values.append(RemoteTensor(st, o.dtype, o.size, o.stride, o.offset))
                elif kind is Passed:
                    values.append(leaves[o.leaf])
                elif kind is ViewOf:
                    src = o.source
                    base_tensor = leaves[src.leaf] if type(src) is FromInput else step.weights[src.index].tensor
                    values.append(RemoteTensor(base_tensor._st, o.dtype, o.size, o.stride, o.offset))
                else:
                    values.append(o.value)
            return pytree.tree_unflatten(values, step.spec)

    def _check_weights(self, key: tuple, step: Step) -> bool:
        """The step's weights are still the model's: refresh their handles (a copy on write changes
        them), or drop the step."""
        epoch = WEIGHTS_EPOCH[0]
        for w in step.weights:
            if w.holder.get(w.name) is not w.tensor:
                logger.debug("graph mode: the model's %s changed; step %d dropped", w.name, step.gid)
                del self.steps[key]
                return False
        ext = [0] * len(step.sources)
        for pos, src in enumerate(step.sources):
            if type(src) is FromModel:
                st = step.weights[src.index].tensor._st
                ready(st)
                ext[pos] = st.handle
        step.ext, step.weights_epoch = ext, epoch
        step.inputs = [(pos, src.leaf) for pos, src in enumerate(step.sources) if type(src) is FromInput]
        return True

    # -- recording ---------------------------------------------------------------------------------

    def observe(self, session: Any, key: tuple, args: tuple, kwargs: dict, leaves: list[Any], out: Any,
                log: CallLog, training: bool) -> None:
        """Watch a recorded call; the second identical one becomes a step."""
        try:
            behaviour, recs, weights = self._behaviour(session, key, args, kwargs, leaves, out, log, training)
        except Uncapturable as exc:
            if len(self.tries) >= MAX_KEYS:  # a long-running worker meets many one-off keys (prefills)
                self.tries.clear()
            self.tries[key] = self.tries.get(key, 0) + 1
            self.seen.pop(key, None)
            logger.debug("graph mode: forward not captured (%s)", exc)
            return
        if self.seen.get(key) != behaviour:
            if len(self.seen) >= MAX_KEYS:
                self.seen.clear()
            self.seen[key] = behaviour
            return
        del self.seen[key]
        if len(self.steps) >= MAX_STEPS:
            self.steps.clear()
        if len(recs) > session.limits.max_graph_records:  # no server takes it: record this call always
            self.tries[key] = MAX_TRIES
            logger.debug("graph mode: forward not captured (%d records, more than one graph holds)", len(recs))
            return
        if not session.graph_cache.room(len(recs)):
            # The server keeps a bounded number of graphs: start afresh (templates and graphs alike).
            with session.lock:
                session.reset_templates()
            self.steps.clear()
            return
        b = behaviour
        with session.lock:
            definition = session.graph_cache.define(recs)
            session.emit(definition)
        gid = definition.gid
        self.steps[key] = Step(gid, b.minted, b.sources, list(b.scalars), list(b.keep), list(b.outs), b.spec,
                               b.aliases, weights, log.epoch)
        logger.debug("graph mode: step %d captured (%d records, %d sources, %d handles kept)", gid, len(recs),
                     len(b.sources), len(b.keep))

    def _behaviour(self, session: Any, key: tuple, args: tuple, kwargs: dict, leaves: list[Any], out: Any,
                   log: CallLog, training: bool) -> tuple[Behaviour, list, list[Weight]]:
        """What the call did, its records in reference form and the model's tensors it reads; raises
        :class:`Uncapturable` when it cannot become a step."""
        if log.bad is not None:
            raise Uncapturable(log.bad)
        if call_key(args, kwargs, []) + (training,) != key:
            raise Uncapturable("forward changed the Python state of its arguments")
        base, end = log.base, session.next_handle
        region = Region(base)
        region.records = log.records
        sig, recs, ext, scalars = reference_form(region)
        # Where each tensor read but not made here comes from: an input, else a weight or buffer.
        where: dict[int, Source] = {}
        for i, x in enumerate(leaves):
            if type(x) is RemoteTensor:
                where.setdefault(x._st.handle, FromInput(i))
        weights: list[Weight] = []
        held_by_model: dict[int, Weight] = {}
        for w in _model_tensors(self.model):
            st = getattr(w.tensor, "_st", None)
            if st is not None:
                held_by_model.setdefault(st.handle, w)
        sources = []
        for h in ext:
            src = where.get(h)
            if src is None:
                w = held_by_model.get(h)
                if w is None:
                    raise Uncapturable(f"forward reads storage {h}, neither an input's nor the model's")
                src = where[h] = FromModel(len(weights))
                weights.append(w)
            sources.append(src)
        # What it returns: its own new tensors, its inputs, views of either, plain values.
        objects = {id(x): i for i, x in enumerate(leaves)}
        values, spec = pytree.tree_flatten(out, is_leaf=lambda x: id(x) in objects)
        outs: list[Out] = []
        keep: list[int] = []
        for v in values:
            if id(v) in objects:
                outs.append(Passed(objects[id(v)]))
            elif type(v) is RemoteTensor:
                h = v._st.handle
                if base <= h < end:
                    if h - base not in keep:
                        keep.append(h - base)
                    outs.append(Made(h - base, *v._cs))
                elif h in where:
                    outs.append(ViewOf(where[h], *v._cs))
                else:
                    raise Uncapturable("forward returns a tensor it did not make from its inputs")
            elif type(v) in _SIMPLE or type(v) in _TAGGED:
                outs.append(Value(v))
            else:
                raise Uncapturable(f"forward returns a {type(v).__name__}")
        # Every handle it made and used must be freed by now, or be returned: anything else is held
        # somewhere (module or object state) that a replay would not update.
        made = {h for r in log.records for h in _handles(r) if base <= h < end}
        held = made - log.freed - {base + r for r in keep}
        if held:
            raise Uncapturable(f"forward keeps {len(held)} tensors it made outside its return value")
        if any(base + r not in made for r in keep):
            raise Uncapturable("forward returns a tensor it never wrote (an empty one)")
        behaviour = Behaviour(sig, end - base, tuple(sources), tuple(scalars), tuple(keep), tuple(outs), spec,
                              _aliases(leaves))
        return behaviour, recs, weights


def _handles(rec: Any) -> list[int]:
    if type(rec) is P.Run:
        return rec.outs
    return [rec.handle]
