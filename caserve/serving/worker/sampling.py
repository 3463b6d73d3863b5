"""Token sampling on the model's device, one slot per running request.

:class:`SlotSampler` keeps every per-request input of sampling on the device: the parameters of each
slot (temperature, top-p, top-k, min-p, penalties), the token counts that the penalties read, the
logit bias and the ids banned until ``min_tokens``. A step reads the logits of the active slots
``[n, V]`` on the device and returns the chosen ids ``[n]`` on the device, plus the log-probabilities
the requests asked for; nothing else crosses to the host (on an assisted worker: the network).

Greedy rows are a plain ``argmax``. Sampled rows use a Gumbel-max draw whose noise is a hash of
``(seed, step, token id)`` computed with exact integer tensor ops, so a seeded request draws the same
tokens on every device (CPU, CUDA, a remote ``caserve`` device) without any device RNG; every op is
an ordinary ATen op.

Order of processing (as most servers do): logit bias, ``min_tokens`` ban, repetition / presence /
frequency penalties, then temperature, top-k, top-p and min-p. Reported log-probabilities are those of
the model itself (``log_softmax`` of the raw logits), not of the processed distribution.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch

from caserve.serving.messages import MAX_LOGPROBS, SamplingParams

__all__ = ["SamplingParams", "SlotSampler", "SampleResult", "PromptLogprobs", "row_key", "uniform_noise",
           "pack", "unpack"]

logger = logging.getLogger(__name__)

_M32 = 0xFFFF_FFFF
_F = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


class SampleResult(NamedTuple):
    """One step's choices, on the device. The log-probability tensors are None unless a row asked."""

    ids: torch.Tensor  # [n] int64
    logprobs: Optional[torch.Tensor] = None  # [n] float32: each chosen id's
    top_ids: Optional[torch.Tensor] = None  # [n, k] int64
    top_logprobs: Optional[torch.Tensor] = None  # [n, k] float32


def pack(result: SampleResult) -> torch.Tensor:
    """What of a step leaves the device, as one tensor (one transfer): the ids [n], or, when rows asked
    for logprobs, float64 rows ``[id, logprob, top ids..., top logprobs...]`` (ids are exact in float64)."""
    if result.logprobs is None:
        return result.ids
    parts = [result.ids.double()[:, None], result.logprobs.double()[:, None]]
    if result.top_ids is not None and result.top_logprobs is not None:
        parts += [result.top_ids.double(), result.top_logprobs.double()]
    return torch.cat(parts, dim=1)


def unpack(host: torch.Tensor) -> tuple[list[int], dict[str, Any]]:
    """:func:`pack`'s tensor, on the host: the ids and (when packed) ``{"ids", "logprobs", "top_ids",
    "top_logprobs"}`` as lists, for ``LogprobRenderer.generated``."""
    if host.dim() == 1:
        return [int(t) for t in host.tolist()], {}
    rows = host.tolist()
    k = (host.shape[1] - 2) // 2
    ids = [int(r[0]) for r in rows]
    return ids, {"ids": ids, "logprobs": [r[1] for r in rows], "top_ids": [[int(t) for t in r[2:2 + k]] for r in rows],
                 "top_logprobs": [r[2 + k:] for r in rows]}


class PromptLogprobs(NamedTuple):
    """Log-probabilities of prompt tokens 1..T-1, each given the tokens before it (token 0 has none)."""

    logprobs: torch.Tensor  # [T-1]
    top_ids: Optional[torch.Tensor] = None  # [T-1, k]
    top_logprobs: Optional[torch.Tensor] = None  # [T-1, k]


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, in place, on an int64 tensor holding values in [0, 2^32). Every product stays
    below 2^63, so the result is exact (the same bits) on every device."""
    x ^= x >> 16
    x.mul_(0x045D9F3B).bitwise_and_(_M32)
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_M32)
    x ^= x >> 15
    return x


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x045D9F3B) & _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    return x ^ (x >> 15)


def row_key(seed: int, step: int) -> int:
    """The 32-bit key of the noise of draw ``step`` of a request seeded ``seed`` (any Python int)."""
    s = seed & 0xFFFF_FFFF_FFFF_FFFF
    return _mix32_int((s >> 32) ^ _mix32_int((s & _M32) ^ _mix32_int(step & _M32 ^ 0x9E3779B9)))


def uniform_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), float32 [n, V], from ``keys`` [n, 1] and ``token_ids`` [V] (int64):
    the hash of (key xor token id), one bijection of 32-bit words per row."""
    h = mix32(token_ids[None, :] ^ keys)  # a fresh tensor, hashed in place (no temporaries of [n, V])
    return (h >> 8).to(torch.float32).add_(0.5).mul_(1.0 / (1 << 24))  # 24 bits: exact in float32


class SlotSampler:
    """Sampling state of ``slots`` requests on ``device``; see the module docstring."""

    def __init__(self, slots: int, vocab: int, device: Union[str, torch.device], eos_ids: Sequence[int]) -> None:
        self.slots, self.vocab, self.device = slots, vocab, torch.device(device)
        self.eos_ids = sorted({int(e) for e in eos_ids if 0 <= int(e) < vocab})
        self.params: list[Optional[SamplingParams]] = [None] * slots
        self.steps = [0] * slots  # tokens drawn so far by each slot's request (its continuation included)
        self.seeds = [0] * slots
        self._fparams = torch.ones(slots, len(_F), device=self.device)  # one row of _F per slot
        self._top_k = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._token_ids = torch.arange(vocab, dtype=torch.long, device=self.device)
        self._counts: Optional[torch.Tensor] = None  # [slots, V] float32: output tokens (penalties)
        self._seen: Optional[torch.Tensor] = None  # [slots, V] bool: prompt and output (repetition)
        self._bias: Optional[torch.Tensor] = None  # [slots, V] float32
        self._ban: Optional[torch.Tensor] = None  # [slots, V] bool: EOS and stop ids (min_tokens)
        self._index_cache: tuple[tuple[int, ...], Optional[torch.Tensor]] = ((), None)

    # ------------------------------------------------------------------------------ slot lifetime

    def start(self, slot: int, params: SamplingParams, prompt_ids: Sequence[int],
              output_ids: Sequence[int] = ()) -> None:
        """Give ``slot`` to a request. ``output_ids`` were generated by an earlier attempt of it (a
        continuation): they count for penalties and the seeded draws go on after them."""
        bad = [t for t in list(params.logit_bias) + list(params.stop_token_ids) if not 0 <= int(t) < self.vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
        self.params[slot] = params
        self.steps[slot] = len(output_ids)
        self.seeds[slot] = secrets.randbits(64) if params.seed is None else int(params.seed)
        temperature = 1.0 if params.greedy else params.temperature
        values = [temperature, params.top_p, params.min_p, params.repetition_penalty, params.presence_penalty,
                  params.frequency_penalty]
        self._fparams[slot] = torch.tensor(values, dtype=torch.float32).to(self.device)
        self._top_k[slot] = int(params.top_k if 0 < params.top_k < self.vocab else 0)
        if params.penalized:
            counts, seen = self._table("_counts", torch.float32), self._table("_seen", torch.bool)
            counts[slot] = 0.0
            seen[slot] = False
            if output_ids:
                out = torch.tensor(list(output_ids), dtype=torch.long).to(self.device)
                counts[slot].index_put_((out,), torch.ones((), device=self.device), accumulate=True)
                seen[slot, out] = True
            if prompt_ids:
                seen[slot, torch.tensor(list(prompt_ids), dtype=torch.long).to(self.device)] = True
        if params.logit_bias:
            bias = self._table("_bias", torch.float32)
            bias[slot] = 0.0
            ids = torch.tensor([int(t) for t in params.logit_bias], dtype=torch.long)
            bias[slot, ids.to(self.device)] = torch.tensor(list(params.logit_bias.values())).to(self.device)
        if params.min_tokens:
            ban = self._table("_ban", torch.bool)
            ban[slot] = False
            banned = self.eos_ids + [int(t) for t in params.stop_token_ids]
            if banned:
                ban[slot, torch.tensor(banned, dtype=torch.long).to(self.device)] = True

    def free(self, slot: int) -> None:
        self.params[slot] = None

    def _table(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        table = getattr(self, name)
        if table is None:
            table = torch.zeros(self.slots, self.vocab, dtype=dtype, device=self.device)
            setattr(self, name, table)
        return table

    def _index(self, slots: tuple[int, ...]) -> torch.Tensor:
        """``slots`` as an int64 tensor on the device (the last one is kept: decode steps repeat it)."""
        if self._index_cache[0] != slots or self._index_cache[1] is None:
            self._index_cache = (slots, torch.tensor(slots, dtype=torch.long).to(self.device))
        return self._index_cache[1]  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ one step

    def sample(self, logits: torch.Tensor, slots: Sequence[int]) -> SampleResult:
        """The next id of each active slot from ``logits`` [n, >= V] (row i belongs to ``slots[i]``)."""
        slots = tuple(int(s) for s in slots)
        params = [self.params[s] for s in slots]
        assert logits.dim() == 2 and logits.shape[0] == len(slots), (tuple(logits.shape), slots)
        assert all(p is not None for p in params), "sample() on a slot that was not started"
        raw = logits[:, : self.vocab]
        ps: list[SamplingParams] = params  # type: ignore[assignment]
        if all(p.plain_greedy for p in ps):
            ids = raw.argmax(-1)
            self._advance(slots, ps, ids)
            return SampleResult(ids)
        index = self._index(slots)
        x = self._process(raw.float(), slots, ps, index)
        if all(p.greedy for p in ps):
            ids = x.argmax(-1)
        else:
            ids = self._draw(x, slots, ps, index)
            if any(p.greedy for p in ps):
                greedy = torch.tensor([p.greedy for p in ps]).to(self.device)
                ids = torch.where(greedy, x.argmax(-1), ids)
        self._advance(slots, ps, ids)
        asked = [p.logprobs for p in ps if p.logprobs is not None]
        if not asked:
            return SampleResult(ids)
        lp = torch.log_softmax(raw.float(), dim=-1)  # [n, V]
        chosen = lp.gather(1, ids[:, None])[:, 0]
        k = min(max(asked), MAX_LOGPROBS, self.vocab)
        if k <= 0:
            return SampleResult(ids, chosen)
        top_lp, top_ids = lp.topk(k, dim=-1)
        return SampleResult(ids, chosen, top_ids, top_lp)

    def prompt_logprobs(self, logits: torch.Tensor, ids: Union[torch.Tensor, Sequence[int]],
                        k: int = 0) -> PromptLogprobs:
        """Log-probabilities of ``ids[1:]`` given ``logits[:-1]`` ([T, >= V], the prompt's own forward),
        with the ``k`` most likely alternatives at each position."""
        ids_t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
        ids_t = ids_t.to(logits.device)
        lp = torch.log_softmax(logits[:-1, : self.vocab].float(), dim=-1)  # [T-1, V]
        chosen = lp.gather(1, ids_t[1:, None])[:, 0]
        k = min(k, MAX_LOGPROBS, self.vocab)
        if k <= 0 or lp.shape[0] == 0:
            return PromptLogprobs(chosen)
        top_lp, top_ids = lp.topk(k, dim=-1)
        return PromptLogprobs(chosen, top_ids, top_lp)

    def _process(self, x: torch.Tensor, slots: tuple[int, ...], ps: list[SamplingParams],
                 index: torch.Tensor) -> torch.Tensor:
        """Bias, bans and penalties: what even greedy rows see ([n, V] float32)."""
        if any(p.logit_bias for p in ps) and self._bias is not None:
            x = x + self._bias.index_select(0, index)
        banned = [i for i, (s, p) in enumerate(zip(slots, ps)) if self.steps[s] < p.min_tokens]
        if banned and self._ban is not None:
            rows = torch.tensor(banned, dtype=torch.long).to(self.device)
            ban = torch.zeros_like(x, dtype=torch.bool)
            ban[rows] = self._ban.index_select(0, index.index_select(0, rows))
            x = x.masked_fill(ban, float("-inf"))
        if any(p.penalized for p in ps) and self._counts is not None and self._seen is not None:
            f = self._fparams.index_select(0, index)  # [n, len(_F)]
            rep, pres, freq = f[:, 3:4], f[:, 4:5], f[:, 5:6]
            seen = self._seen.index_select(0, index)
            counts = self._counts.index_select(0, index)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
            x = x - freq * counts - pres * (counts > 0).to(x.dtype)
        return x

    def _draw(self, x: torch.Tensor, slots: tuple[int, ...], ps: list[SamplingParams],
              index: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then a seeded Gumbel-max draw: ids [n]."""
        f = self._fparams.index_select(0, index)
        x = x / f[:, 0:1]
        neg_inf = float("-inf")
        if any(0 < p.top_k < self.vocab for p in ps):
            k_max = max(p.top_k for p in ps if 0 < p.top_k < self.vocab)
            top = x.topk(k_max, dim=-1).values  # [n, k_max], descending
            k = self._top_k.index_select(0, index)
            kth = top.gather(1, (k - 1).clamp(min=0, max=k_max - 1)[:, None])
            kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, neg_inf))
            x = x.masked_fill(x < kth, neg_inf)
        if any(p.top_p < 1.0 for p in ps):
            probs, order = torch.softmax(x, dim=-1).sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= f[:, 1:2]
            drop_sorted = drop_sorted & (f[:, 1:2] < 1.0)
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            x = x.masked_fill(drop, neg_inf)
        if any(p.min_p > 0.0 for p in ps):
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < f[:, 2:3] * probs.max(dim=-1, keepdim=True).values, neg_inf)
        keys = torch.tensor([[row_key(self.seeds[s], self.steps[s])] for s in slots], dtype=torch.long)
        gumbel = uniform_noise(keys.to(self.device), self._token_ids).log_().neg_().log_().neg_()
        return gumbel.add_(x).argmax(-1)

    def _advance(self, slots: tuple[int, ...], ps: list[SamplingParams], ids: torch.Tensor) -> None:
        """After a step: count the chosen ids for the penalties (on the device) and the draws (host)."""
        for s in slots:
            self.steps[s] += 1
        rows = [i for i, p in enumerate(ps) if p.penalized]
        if not rows or self._counts is None or self._seen is None:
            return
        index = self._index(slots)
        if len(rows) != len(slots):
            sel = torch.tensor(rows, dtype=torch.long).to(self.device)
            index, ids = index.index_select(0, sel), ids.index_select(0, sel)
        self._counts.index_put_((index, ids), torch.ones((), device=self.device), accumulate=True)
        self._seen.index_put_((index, ids), torch.ones((), dtype=torch.bool, device=self.device))
