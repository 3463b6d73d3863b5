"""One KV cache of fixed shape shared by a worker's slots, and the inputs of the forwards over it.

The cache holds ``slots`` rows of ``length`` columns per layer. Slot ``s`` keeps the token at position
``p`` of its sequence in column ``p`` of row ``s``. Every forward names, per input row, the slot it
writes (``rows`` [n, 1]) and, per token, the column (``cols`` [n, q]); both are tensors set on the cache
before the call, and attends over the first ``window`` columns only (a multiple of ``WINDOW``: short
sequences do not pay for the whole cache). A forward's Python thus reads only its arguments and shapes
(what graph-mode capture on a remote device needs: a decode step has one key per bucket and window).

Two forwards exist: a decode step over the first ``n`` slots ([n, 1], ``n`` covering every decoding
slot, so idle slots past the highest decoding one cost nothing; on a remote device a bucket from
:func:`bucket`, the smallest power of two, at most ``slots``, that covers them) and a prefill chunk of
one slot ([1, width], width a multiple of ``PREFILL_ROUND``). Padding tokens and slots that are not decoding
write columns no real token reads before they are written again (a chunk's padding the columns right
after it, an idle slot its next unfilled column) and see only themselves, so their outputs stay finite.
The boolean 4-D masks [n, 1, q, window] are used by Transformers as given (no device sync to inspect a
2-D mask).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import StaticCache

PREFILL_ROUND = 64  # prefill chunk widths are padded to a multiple of this: few shapes to plan and capture
WINDOW = 128  # attended columns are a multiple of this


class SlotCache(StaticCache):
    """A static cache written at per-row slots and per-token columns (see the module docstring).

    Built on ``StaticCache`` so that models treat it as a static cache; its own ``update`` replaces the
    contiguous writes at a shared position with one indexed write of every row's tokens (``index_put_``
    at (slot, head, column)). Its tensors are [slots, heads, length, dim], the layout attention reads:
    a head's window is contiguous."""

    def __init__(self, config: Any, slots: int, length: int, device: Any) -> None:
        super().__init__(config=config, max_cache_len=length)
        for layer in self.layers:  # the stock layers are never written, but their tensors are passed along
            for name, value in list(vars(layer).items()):
                if isinstance(value, torch.Tensor):
                    setattr(layer, name, value.to(device))
        self.slots, self.length = slots, length
        self.rows: torch.Tensor = torch.zeros(0, 1, dtype=torch.long)  # [n, 1], set before each forward
        self.cols: torch.Tensor = torch.zeros(0, 1, dtype=torch.long)  # [n, q]
        self.window = length  # columns attended by the next forward
        self.k: list[torch.Tensor] = []  # per layer [slots, heads, length, dim], made at the first write
        self.v: list[torch.Tensor] = []
        self._heads: dict[int, torch.Tensor] = {}  # heads -> [1, heads, 1] index on the cache's device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [n, heads, q, dim]
        n, heads, _, dim = key_states.shape
        if layer_idx == len(self.k):
            self.k.append(key_states.new_zeros(self.slots, heads, self.length, dim))
            self.v.append(value_states.new_zeros(self.slots, heads, self.length, value_states.shape[-1]))
        k, v = self.k[layer_idx], self.v[layer_idx]
        at = (self.rows[:, :, None], self._head_index(heads, k.device), self.cols[:, None, :])  # [n, heads, q]
        k[at] = key_states  # [n, heads, q, dim] at (slot, head, column)
        v[at] = value_states
        w = self.window
        if key_states.shape[2] == 1:  # a decode step (prefill widths are multiples of 64): rows 0..n-1
            return k[:n, :, :w], v[:n, :, :w]  # [n, heads, window, dim]
        picked = self.rows[:, 0]
        return k[picked, :, :w], v[picked, :, :w]

    def _head_index(self, heads: int, device: torch.device) -> torch.Tensor:
        at = self._heads.get(heads)
        if at is None:
            at = self._heads[heads] = torch.arange(heads).view(1, -1, 1).to(device)
        return at

    def copy_prefix(self, src: int, dst: torch.Tensor, count: int) -> None:
        """Columns ``[0, count)`` of slot ``src`` into slots ``dst`` ([m] int64 on the cache's device), in
        every layer: one indexed write per tensor (the choices of one request share one prefill)."""
        for t in self.k + self.v:
            t[dst, :, :count] = t[src, :, :count]  # [heads, count, dim] broadcast over the m slots

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions always come as position_ids; nothing may derive them from the cache

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()


def bucket(n: int, slots: int) -> int:
    """Rows of a decode step whose highest decoding slot is ``n - 1``: the smallest power of two >= ``n``,
    at most ``slots`` (a few fixed shapes: one captured step per bucket and window)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, slots)


def window_for(last_col: int, length: int) -> int:
    """Attended columns for a forward whose highest written column is ``last_col``."""
    return min(length, -(-(last_col + 1) // WINDOW) * WINDOW)


def decode_inputs(cols: Sequence[int], decoding: Sequence[bool], length: int) -> dict[str, torch.Tensor]:
    """Host tensors of one decode step over slots 0..n-1: slot s writes column ``cols[s]``; a decoding
    slot sees its columns up to it, any other slot only that column.
    Returns cols and position_ids [n, 1] and the boolean mask [n, 1, 1, window]."""
    col = torch.tensor(cols, dtype=torch.long).view(-1, 1)  # [n, 1]
    live = torch.tensor(decoding, dtype=torch.bool).view(-1, 1)
    window = window_for(int(col.max()), length)
    k = torch.arange(window).view(1, -1)  # [1, W]
    mask = torch.where(live, k <= col, k == col)  # [n, W]
    return {"cols": col, "position_ids": torch.where(live, col, torch.zeros_like(col)),
            "mask": mask[:, None, None, :]}


def prefill_inputs(start: int, count: int, width: int, length: int) -> dict[str, torch.Tensor]:
    """Host tensors of a prefill chunk of ``count`` tokens at columns ``start..start+count-1``, padded
    on the right to ``width`` (the padding writes the next columns, which later tokens overwrite).
    Returns cols and position_ids [1, width] and the boolean mask [1, 1, width, window]."""
    col = start + torch.arange(width).view(-1, 1)  # [W, 1]
    real = torch.arange(width).view(-1, 1) < count
    window = window_for(start + width - 1, length)
    k = torch.arange(window).view(1, -1)
    mask = torch.where(real, k <= col, k == col)  # [width, window]
    return {"cols": col.view(1, -1), "position_ids": torch.where(real, col, torch.zeros_like(col)).view(1, -1),
            "mask": mask[None, None]}
