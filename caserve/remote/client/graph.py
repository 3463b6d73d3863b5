"""Graph mode: a model's forward recorded once, replayed on the GPU server with one message.

In eager mode every op of every forward is one record that the server decodes, looks up and runs. In
graph mode the records of a forward call are held back in *regions* of up to ``GRAPH_CHUNK`` records
(so the server keeps working while the client is still in forward). When a region ends its records
are written with *references* instead of handles (``r >= 0``: the r-th handle minted since the
region began; ``r < 0``: an external handle such as a weight or the KV cache) and that form is the
region's signature:

- seen for the first time: the records go out as in eager mode;
- seen a second time: the graph is sent once (``DefineGraph``, templates resolved by the server),
  then replayed;
- known: one ``Replay`` record carries the graph id, the first handle and the external handles.

Replaying sends exactly the records eager mode would send, so results never differ from eager. A sync
point inside forward (``.item()``, a mask read to decide whether to skip it) cuts the region: what was
recorded so far is sent as a segment of its own, matched and replayed like any region, and recording
resumes after the sync. A region that copies a shared weight or reseeds falls back to eager for that
call, with a debug log line saying why. Shapes must repeat for a graph to pay off: decoding
with a static KV cache (``generate(..., cache_implementation="static")``) repeats them every step.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import types
from typing import Any, Callable

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.client.capture import Capture, Uncapturable, call_key
from caserve.remote.client.records import RecordRef, Region, reference_form
from caserve.remote.client.session import Session, session_of

logger = logging.getLogger(__name__)

MAX_SIGNATURES = 4096  # segments seen once and remembered, per session


class GraphCache:
    """Per-session graphs: signature -> graph id, and signatures seen once."""

    def __init__(self, limits: P.Limits) -> None:
        self.limits = limits  # the server's, from Welcome
        self.graphs: dict[tuple, int] = {}
        self.seen: set[tuple] = set()
        self.ids = itertools.count(1)
        self.replays = 0  # recorded regions replayed
        self.step_replays = 0  # captured steps replayed (caserve.remote.client.capture)
        self.fallbacks = 0
        self.defined = 0  # graphs defined on the server since the last template reset
        self.defined_records = 0  # and the records they hold

    def room(self, records: int) -> bool:
        """Whether the server takes one more graph of ``records`` records (it bounds both, per tenant)."""
        limits = self.limits
        return (self.defined < limits.max_graphs and records <= limits.max_graph_records
                and self.defined_records + records <= limits.max_tenant_graph_records)

    def define(self, recs: list[RecordRef]) -> P.DefineGraph:
        """The definition of a new graph of ``recs`` (reference form), counted against the server's limits."""
        self.defined += 1
        self.defined_records += len(recs)
        return P.DefineGraph(next(self.ids), [r.struct() for r in recs])

    def clear(self) -> None:
        """The server forgot every graph (ResetTemplates)."""
        self.graphs.clear()
        self.seen.clear()
        self.defined = self.defined_records = 0


def end_region(session: Session, region: Region) -> None:
    """Send a finished region: replayed, defined and replayed, or eagerly (called under the session lock)."""
    cache: GraphCache = session.graph_cache
    payload_base = len(session.payloads)
    for data, owner in zip(region.payloads, region.owners):
        session.add_payload(data, owner)
    if region.aborted is not None or not region.records:
        if region.aborted is not None:
            cache.fallbacks += 1
            logger.debug("graph mode: forward ran eagerly (%s)", region.aborted)
        _send_eagerly(session, region, payload_base)
        return
    key, recs, ext, scalars = reference_form(region)
    gid = cache.graphs.get(key)
    if gid is None and key in cache.seen and cache.room(len(recs)):
        definition = cache.define(recs)
        gid = cache.graphs[key] = definition.gid
        session.ops.append(definition)
        logger.debug("graph mode: graph %d defined (%d records, %d external handles)", gid, len(recs), len(ext))
    if gid is None:
        if len(cache.seen) >= MAX_SIGNATURES:
            cache.seen.clear()
        cache.seen.add(key)
        logger.debug("graph mode: new forward signature (%d records); sent eagerly", len(recs))
        _send_eagerly(session, region, payload_base)
        return
    cache.replays += 1
    session.ops.append(P.Replay(gid, region.base, ext, payload_base, scalars))


def _send_eagerly(session: Session, region: Region, payload_base: int) -> None:
    for r in region.records:
        if type(r) in (P.Upload, P.CopyIn):
            r.payload += payload_base
        session.ops.append(r)


def enable(model: torch.nn.Module, capture: bool = True) -> torch.nn.Module:
    """Record ``model``'s forward calls as graph regions on its caserve device (see the module docstring);
    with ``capture``, repeated calls become captured steps replayed without running forward's Python
    (:mod:`caserve.remote.client.capture`).

    Returns the model. Calls on a non-caserve device, or nested inside another region, run as before.
    """
    if getattr(model, "_caserve_graph_mode", None) is not None:
        return model
    original = model.forward
    model._caserve_graph_mode = GraphForward(original, Capture(model) if capture else None)

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _graph_forward(self, *args, **kwargs)

    # Callers read forward's signature (generate passes only the arguments forward names): keep it.
    sig = inspect.signature(original)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])  # type: ignore[attr-defined]
    forward.__doc__ = original.__doc__
    model.forward = types.MethodType(forward, model)
    return model


class GraphForward:
    """A model's original forward and its captured steps."""

    def __init__(self, forward: Callable[..., Any], capture: Capture | None) -> None:
        self.forward = forward
        self.capture = capture


def attach(session: Session) -> None:
    """Give a session graph mode's state and its region-end hook (once, on its first graph forward)."""
    with session.lock:
        if session.region_end is None:
            session.graph_cache = GraphCache(session.limits)
            session.region_end = end_region


def _graph_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: GraphForward = self._caserve_graph_mode
    p = next(self.parameters(), None)
    if p is None or p.device.type != "caserve":
        return state.forward(*args, **kwargs)
    session = session_of(p.device)
    if session.region_depth:  # nested inside another model's region: part of that one
        return state.forward(*args, **kwargs)
    if session.region_end is None:
        attach(session)
    capture, key, leaves = state.capture, None, []
    if capture is not None:
        try:
            key = call_key(args, kwargs, leaves) + (self.training,)
        except Uncapturable as exc:
            logger.debug("graph mode: forward not captured (%s)", exc)
        if key is not None:
            out = capture.replay(session, key, leaves)
            if out is not None:
                return out
            if not capture.wants(key):
                key = None
    session.begin_region(watch=key is not None)
    log = None
    try:
        out = state.forward(*args, **kwargs)
    finally:
        log = session.end_region()
    if key is not None and log is not None:
        capture.observe(session, key, args, kwargs, leaves, out, log, self.training)
    return out
