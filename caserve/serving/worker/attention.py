"""Decode attention over each row's own columns (varlen kernel) or a window per run of consecutive slots.

A decode step's keys are the first ``window`` columns of every slot, ``window`` set by the longest
sequence in the step (:mod:`caserve.serving.worker.slots`). With continuous batching a long request shares
steps with requests that have just started, and attention (memory-bound) would read, for each of them, as
many columns as for the long one. Here the step's slots are split into runs of consecutive slots, each
attending over its own window: the keys, values and mask of a run are views of the step's (no copy), and
each run is one SDPA call. Runs are chosen on the host from the columns the step writes, before the
forward (:func:`plan_runs`), so nothing is read from the device.

Where the varlen kernel of :mod:`~caserve.serving.worker.decode_kernel` is built (float32 CPU
models), a decode step needs no runs: each row attends over exactly its own columns, one kernel call per
layer, and the engine passes per-row column ranges (:class:`Ranges`) instead of a plan.

The attention function is installed under its own name (:func:`install`) on models that use SDPA,
and acts only while :func:`decoding` has set a plan or ranges for the current thread and the forward
has one query position (a decode step); otherwise, and for what the kernel does not take (dropout,
softcapping, attention sinks, sliding windows, position biases, other dtypes), it is Transformers' SDPA
function over the step's mask. Prefill chunks, and every forward outside the engine, are plain SDPA.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from caserve.serving.worker.decode_kernel import Ranges, load as load_kernel

logger = logging.getLogger(__name__)

NAME = "caserve_slot_runs"
RUN_COST = 1024  # what one more SDPA call costs, in slot-columns read (measured on CPU: about 25 us each)
MAX_BLOCKS = 16  # runs are planned over at most this many blocks of consecutive slots (host time per step)

Plan = tuple[tuple[int, int, int], ...]  # (first slot, end slot, window) per run, covering 0..n
Layout = Union[Plan, Ranges]  # what a decode step's attention follows
_LAYOUT: contextvars.ContextVar[Optional[Layout]] = contextvars.ContextVar("caserve_decode_layout", default=None)
_NOT_IN_KERNEL = ("softcap", "s_aux", "sinks", "sliding_window", "position_bias")  # kwargs it cannot honour


def slot_run_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A decode step ([n, heads, 1, dim] queries; keys and values [n, kv_heads, window, dim]; mask
    [n, 1, 1, window]): the varlen kernel over each row's column range, or SDPA over each planned run of
    slots with its own window; plain SDPA when neither applies."""
    layout = _LAYOUT.get()
    if layout is None or query.shape[2] != 1 or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if isinstance(layout, Ranges):
        kernel = load_kernel()
        if kernel is not None and kernel.supports(query, key, value) and not kwargs.get("dropout") \
                and all(kwargs.get(name) is None for name in _NOT_IN_KERNEL):
            scale = kwargs.get("scaling")
            return kernel(query, key, value, layout, query.shape[-1] ** -0.5 if scale is None else scale), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # the mask is exact
    plan = layout
    if len(plan) < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = [sdpa_attention_forward(module, query[a:b], key[a:b, :, :w], value[a:b, :, :w],
                                   attention_mask[a:b, ..., :w], **kwargs)[0] for a, b, w in plan]
    return torch.cat(outs), None


def install(model: torch.nn.Module) -> bool:
    """Use :func:`slot_run_attention` in ``model`` if it uses SDPA; False (model unchanged) otherwise."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    AttentionInterface.register(NAME, slot_run_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, TypeError) as exc:  # a model that does not take a registered implementation
        logger.info("per-run decode windows are off for %s: %s", type(model).__name__, exc)
        return False
    return True


@contextlib.contextmanager
def decoding(layout: Optional[Layout]) -> Iterator[None]:
    """Apply ``layout`` (a plan of runs, or per-row column ranges) to the decode forwards run inside the
    block, in this thread."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def plan_runs(windows: Sequence[int], run_cost: int = RUN_COST) -> Plan:
    """Split slots ``0..n-1`` (``windows[s]``: the columns slot ``s`` needs) into runs of consecutive slots
    that minimise the columns read plus ``run_cost`` per run; each run's window is its largest.
    Slots are grouped in at most ``MAX_BLOCKS`` equal blocks first, so the search stays small."""
    n = len(windows)
    if min(windows) == max(windows):  # the usual step: nothing to split
        return ((0, n, windows[0]),)
    size = -(-n // MAX_BLOCKS)
    edges = list(range(0, n, size)) + [n]  # block boundaries
    blocks = len(edges) - 1
    tops = [max(windows[edges[b]:edges[b + 1]]) for b in range(blocks)]  # each block's window
    best = [0] + [0] * blocks  # best[j]: cost of slots 0..edges[j]
    cut, run_top = [0] * (blocks + 1), [0] * (blocks + 1)  # the last run's first block and window
    for j in range(1, blocks + 1):
        top, best[j] = 0, -1
        for i in range(j - 1, -1, -1):  # the last run covers blocks i..j-1
            top = max(top, tops[i])
            cost = best[i] + run_cost + (edges[j] - edges[i]) * top
            if best[j] < 0 or cost <= best[j]:  # on a tie, the longer last run
                best[j], cut[j], run_top[j] = cost, i, top
    plan: list[tuple[int, int, int]] = []
    j = blocks
    while j > 0:
        plan.append((edges[cut[j]], edges[j], run_top[j]))
        j = cut[j]
    return tuple(reversed(plan))
