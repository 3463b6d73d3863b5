"""One KV cache of fixed shape shared by a worker's slots, and the inputs of the forwards over it.

The cache holds ``slots`` rows of ``length`` columns per layer. Slot ``s`` keeps the token at position
``p`` of its sequence in column ``p`` of row ``s``; the last column is scratch, written by padding and
by idle slots, and never seen by a real token. Every forward names, per input row, the slot it writes
(``rows`` [n, 1]) and, per token, the column (``cols`` [n, q]); both are tensors set on the cache
before the call, so that a forward's Python reads only its arguments and shapes (what graph-mode
capture on a remote device needs: a decode step over all slots has the same key every time).

Two forwards exist: a decode step over all slots ([slots, 1]) and a prefill chunk of one slot
([1, width], width a multiple of ``PREFILL_ROUND``). Their boolean 4-D masks [n, 1, q, length] are
used by Transformers as given (no device sync to inspect a 2-D mask).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import StaticCache

PREFILL_ROUND = 64  # prefill chunk widths are padded to a multiple of this: few shapes to plan and capture


class SlotCache(StaticCache):
    """A static cache written at per-row slots and per-token columns (see the module docstring).

    Built on ``StaticCache`` so that models treat it as a static cache; its own ``update`` replaces the
    contiguous writes at a shared position with indexed writes, and keeps its tensors as
    [slots, length, heads, dim] so that one ``index_put_`` writes every row's tokens."""

    def __init__(self, config: Any, slots: int, length: int, device: Any) -> None:
        super().__init__(config=config, max_cache_len=length)
        for layer in self.layers:  # the stock layers are never written, but their tensors are passed along
            for name, value in list(vars(layer).items()):
                if isinstance(value, torch.Tensor):
                    setattr(layer, name, value.to(device))
        self.slots, self.length = slots, length
        self.rows: torch.Tensor = torch.zeros(0, 1, dtype=torch.long)  # [n, 1], set before each forward
        self.cols: torch.Tensor = torch.zeros(0, 1, dtype=torch.long)  # [n, q]
        self.k: list[torch.Tensor] = []  # per layer [slots, length, heads, dim], made at the first write
        self.v: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [n, heads, q, dim]
        if layer_idx == len(self.k):
            n, heads, _, dim = key_states.shape
            self.k.append(key_states.new_zeros(self.slots, self.length, heads, dim))
            self.v.append(value_states.new_zeros(self.slots, self.length, heads, value_states.shape[-1]))
        k, v = self.k[layer_idx], self.v[layer_idx]
        k[self.rows, self.cols] = key_states.transpose(1, 2)  # [n, q, heads, dim] at (slot, column)
        v[self.rows, self.cols] = value_states.transpose(1, 2)
        if key_states.shape[0] == self.slots:  # a decode step: rows are all slots in order
            return k.transpose(1, 2), v.transpose(1, 2)
        picked = self.rows[:, 0]
        return k[picked].transpose(1, 2), v[picked].transpose(1, 2)  # [n, heads, length, dim]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions always come as position_ids; nothing may derive them from the cache

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()


def decode_inputs(positions: Sequence[int], length: int) -> dict[str, torch.Tensor]:
    """Host tensors of one decode step over all slots: ``positions[s]`` is slot s's next column, or -1
    for an idle slot (it writes the scratch column and sees only it).
    Returns cols and position_ids [slots, 1] and the boolean mask [slots, 1, 1, length]."""
    pos = torch.tensor(positions, dtype=torch.long).view(-1, 1)  # [S, 1]
    idle = pos < 0
    cols = torch.where(idle, torch.full_like(pos, length - 1), pos)
    k = torch.arange(length).view(1, -1)  # [1, L]
    mask = torch.where(idle, k == length - 1, k <= pos)  # [S, L]
    return {"cols": cols, "position_ids": torch.where(idle, torch.zeros_like(pos), pos),
            "mask": mask[:, None, None, :]}


def prefill_inputs(start: int, count: int, width: int, length: int) -> dict[str, torch.Tensor]:
    """Host tensors of a prefill chunk of ``count`` tokens at columns ``start..start+count-1``, padded
    on the right to ``width`` (padding writes the scratch column and sees only it).
    Returns cols and position_ids [1, width] and the boolean mask [1, 1, width, length]."""
    i = torch.arange(width).view(-1, 1)  # [W, 1]
    real = i < count
    col = torch.where(real, start + i, torch.full_like(i, length - 1))  # [W, 1]
    k = torch.arange(length).view(1, -1)
    mask = torch.where(real, k <= col, k == length - 1)  # [W, L]
    return {"cols": col.view(1, -1), "position_ids": torch.where(real, col, torch.zeros_like(col)).view(1, -1),
            "mask": mask[None, None]}
