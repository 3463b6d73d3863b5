"""What the slot engine keeps per slot and per step (``caserve.serving.worker.engine``): a slot's request
and prefill state, a step's result waiting to be read, and the statistics reported to the router."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from caserve.serving.messages import Progress
from caserve.serving.worker.rows import Row


@dataclass(eq=False)
class Slot:
    """One slot's request and how far its sequence is in the cache."""

    index: int
    row: Row
    seq: list[int]  # what is prefilled: prompt and an earlier attempt's tokens
    filled: int = 0  # tokens of seq in the cache
    issued: int = 0  # tokens sampled on the device (read or not)
    last_logits: Optional[torch.Tensor] = None  # echo: the last prefilled position's logits [1, V]
    group: Optional[str] = None  # the request's prompt_group (its n choices)
    leader: Optional["Slot"] = None  # set: this slot waits for the leader's prefill of the same sequence
    followers: list["Slot"] = field(default_factory=list)  # slots that take this one's prefill

    @property
    def decoding(self) -> bool:
        return self.filled == len(self.seq) and 0 < self.issued < self.row.max_new


@dataclass
class PendingRead:
    """A step's sampled ids on the device, read later (one step late on a remote device)."""

    fetch: Callable[[], torch.Tensor]  # the step's sampling.pack()ed result as a CPU tensor
    owners: list[Slot]
    step: int


@dataclass
class BatchStats:
    """What the engine did since the last report: the router's service model learns from it."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    occupancy: int = 0  # sum over decode steps of the slots decoding

    def event(self, active: int, free_slots: int) -> Progress:
        return Progress(prefill_s=self.prefill_s, decode_s=self.decode_s, steps=self.steps,
                        generated_tokens=self.generated_tokens, prefill_tokens=self.prefill_tokens,
                        occupancy=self.occupancy, active=active, free_slots=free_slots)
