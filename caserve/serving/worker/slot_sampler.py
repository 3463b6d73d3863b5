"""The slot engine's sampling interface, as a thin adapter over the per-row ``sample_token``.

The engine calls sampling only through these three names; the device sampler (issue 12 item 3, in
``caserve.serving.worker.sampling``) replaces this module with the same interface:

* :class:`SamplingParams`: one request's parameters (built from the router's ``params`` dict).
* ``SlotSampler(slots, vocab, device, eos_ids)`` with ``start(slot, params, prompt_ids)``,
  ``free(slot)``, ``sample(logits [n, V] on the device, slots) -> SampleResult`` (``ids``: LongTensor
  [n] on the device) and ``prompt_logprobs(logits [T, V], ids [T])``.

This adapter samples greedy rows on the device (argmax) and sampled rows on the CPU with each
request's own generator, exactly as the batch engine did, so seeded outputs do not change. What it
cannot do (penalties, top-k, min-p, logit bias, logprobs, ...) is refused with :class:`Unsupported`
when a request starts, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import torch

from caserve.serving.worker.sampling import GREEDY_BELOW, make_generator, sample_token


class Unsupported(ValueError):
    """A sampling parameter this sampler cannot honour (the request is refused, not run without it)."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: Optional[int] = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # top-k logprobs per generated token
    prompt_logprobs: Optional[int] = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "SamplingParams":
        """The router's ``params`` dict; unknown keys (``max_tokens``, ``n``) are the engine's business."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in params.items() if k in known and v is not None}
        if "stop" in values:
            values["stop"] = list(values["stop"])
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


_NEUTRAL = SamplingParams()
_ADAPTED = ("temperature", "top_p", "seed", "stop", "ignore_eos")  # what this adapter honours


@dataclass
class SampleResult:
    ids: torch.Tensor  # LongTensor [n] on the device
    logprobs: Optional[torch.Tensor] = None  # [n] chosen-token logprobs (when asked for)
    top_logprobs: Optional[torch.Tensor] = None  # [n, k]
    top_ids: Optional[torch.Tensor] = None  # [n, k]


class SlotSampler:
    """Per-slot sampling state over ``slots`` slots (see the module docstring)."""

    def __init__(self, slots: int, vocab: int, device: Any, eos_ids: Sequence[int]) -> None:
        self.slots, self.vocab, self.device = slots, vocab, device
        self.eos_ids = set(eos_ids)
        self._params: list[Optional[SamplingParams]] = [None] * slots
        self._generators: list[Optional[torch.Generator]] = [None] * slots

    def start(self, slot: int, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        for f in fields(SamplingParams):
            if f.name not in _ADAPTED and getattr(params, f.name) != getattr(_NEUTRAL, f.name):
                raise Unsupported(f"sampling parameter {f.name!r} is not supported by this worker")
        self._params[slot] = params
        self._generators[slot] = make_generator(params.seed)

    def free(self, slot: int) -> None:
        self._params[slot] = self._generators[slot] = None

    def sample(self, logits: torch.Tensor, slots: Sequence[int]) -> SampleResult:
        """``logits`` [n, V'] (V' >= vocab) on the device, row i for ``slots[i]``: the chosen ids [n]."""
        assert logits.dim() == 2 and logits.shape[0] == len(slots), (tuple(logits.shape), len(slots))
        logits = logits[:, : self.vocab]
        params = [self._params[s] for s in slots]
        assert all(p is not None for p in params), "sampling from a free slot"
        ids = logits.float().argmax(-1)  # [n], on the device
        if all(p.greedy for p in params):  # type: ignore[union-attr]
            return SampleResult(ids)
        host = logits.float().cpu()  # [n, V]: sampled rows need their values (the device sampler avoids this)
        chosen = [sample_token(host[i], p.temperature, p.top_p, self._generators[s])  # type: ignore[arg-type,union-attr]
                  for i, (s, p) in enumerate(zip(slots, params))]
        return SampleResult(torch.tensor(chosen, dtype=torch.long).to(logits.device))

    def prompt_logprobs(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        raise Unsupported("prompt logprobs are not supported by this worker")
