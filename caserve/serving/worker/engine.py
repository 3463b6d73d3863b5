"""Batched execution of one dispatched batch on a loaded model: generation, embeddings, classification.

Generation is a plain prefill + decode loop over a left-padded batch with a KV cache
(``prefill`` then ``decode_step`` per token), so every row keeps its own sampling parameters, stop
strings and cancellation, and tokens stream out as they are sampled. The loop only calls the model's
``forward``, so it runs the same on CPU, CUDA and a remote ``caserve`` device.

Rows arrive as :class:`~caserve.serving.messages.Row` structs; events go out through ``emit`` as the
:mod:`~caserve.serving.messages` structs ``Tokens``, ``Done`` and ``Error``.
Device failures are not caught here: the worker decides what losing a device means.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from transformers import StaticCache

from caserve.models import LoadedModel
from caserve.serving.messages import (
    MODEL_TASKS, TASK_CLASSIFY, TASK_EMBED, TASK_GENERATE, BatchDone, ClassScore, Done, Error, Event, Row, Tokens,
)
from caserve.serving.worker.sampling import GREEDY_BELOW, TextTracker, make_generator, sample_token

logger = logging.getLogger(__name__)

Emit = Callable[[Event], None]
STATIC_CACHE_ROUND = 64  # static cache lengths are rounded up, so few distinct shapes (graphs) occur
MAX_CACHES = 4  # static KV caches kept for reuse, per engine
PREFILL_ROUND = 64  # with a static cache, prompt widths are rounded up (left padding) for the same reason
IsCancelled = Callable[[str], bool]


class RowError(Exception):
    """A row the model cannot run (bad ids, too long); reported to that row's client only."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass
class _Row:
    dispatch: str
    prompt_ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    ignore_eos: bool
    text: TextTracker
    generator: torch.Generator
    generated: int = 0
    finish_reason: Optional[str] = None
    new_ids: list[int] = field(default_factory=list)


@dataclass
class BatchStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    generated_tokens: int = 0

    def event(self) -> BatchDone:
        return BatchDone(prefill_s=self.prefill_s, decode_s=self.decode_s, steps=self.steps,
                         generated_tokens=self.generated_tokens)


class Engine:
    def __init__(self, lm: LoadedModel, *, step_delay_s: float = 0.0, static_cache: bool = False,
                 decode_ahead: bool = True) -> None:
        self.lm = lm
        self.step_delay_s = step_delay_s  # emulates a slower device (tests, benchmarks); 0 in production
        self.model, self.tok = lm.model, lm.tokenizer
        self.device = next(self.model.parameters()).device
        self.vocab = min(int(self.model.config.get_text_config().vocab_size), len(self.tok))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = {int(e) for e in eos + [self.tok.eos_token_id] if e is not None}
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else 0)
        self.seq2seq = lm.task == "seq2seq"
        self._stats, self._decode_start = BatchStats(), None
        params = inspect.signature(self.model.forward).parameters
        self._takes_positions = "position_ids" in params
        # transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` before).
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # A static KV cache makes every decode step of a batch the same shapes and, with a 4-D mask,
        # free of device syncs inside forward: what a remote device wants (causal LMs only).
        # (transformers >= 5.2x tracks the cache position inside StaticCache; older ones take cache_position.)
        self._takes_cache_position = "cache_position" in params
        self.static_cache = static_cache and not self.seq2seq and self._cache_arg in params
        self._caches: dict[tuple[int, int], StaticCache] = {}  # (batch, length) -> cache, least recent first
        # Greedy batches on a remote device decode one step ahead (see _decode_greedy_ahead).
        self.decode_ahead = decode_ahead and self.static_cache and self.device.type == "caserve"

    @property
    def tasks(self) -> set[str]:
        return MODEL_TASKS[self.lm.task]

    def run(self, rows: list[Row], emit: Emit, cancelled: IsCancelled) -> BatchStats:
        """Run one batch; every row gets exactly one ``done`` or ``error`` event (unless the device fails)."""
        task = rows[0].task
        with torch.inference_mode():
            if task == TASK_GENERATE:
                return self._generate(rows, emit, cancelled)
            if task == TASK_EMBED:
                return self._encode(rows, emit, classify=False)
            if task == TASK_CLASSIFY:
                return self._encode(rows, emit, classify=True)
        raise ValueError(f"unknown task {task!r}")

    # ---------------------------------------------------------------------------------- generation

    def _prompt_ids(self, row: Row) -> list[int]:
        if row.messages is not None:
            if getattr(self.tok, "chat_template", None):
                messages = [{"role": m.role, "content": m.content} for m in row.messages]
                text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                return list(self.tok(text, add_special_tokens=False)["input_ids"])
            text = "".join(f"{m.role}: {m.content}\n" for m in row.messages) + "assistant:"
            return list(self.tok(text)["input_ids"])
        if row.prompt_ids is not None:
            if any(i >= self.vocab for i in row.prompt_ids):
                raise RowError("bad_request", f"prompt token ids must be in [0, {self.vocab})")
            return list(row.prompt_ids)
        if row.prompt is None:
            raise RowError("bad_request", "a generate row needs a prompt, prompt_ids or messages")
        return list(self.tok(row.prompt)["input_ids"])

    def _make_row(self, row: Row) -> _Row:
        prompt = self._prompt_ids(row)
        prefix = list(row.prefix_ids)
        params = row.params
        if params is None:
            raise RowError("bad_request", "a generate row needs sampling params")
        ctx = self.lm.max_context
        if not prompt:
            raise RowError("bad_request", "the prompt is empty after tokenization")
        used = len(prompt) + (0 if self.seq2seq else len(prefix))
        if len(prompt) >= ctx or used >= ctx:
            raise RowError("context_length_exceeded",
                           f"This model's maximum context length is {ctx} tokens, "
                           f"but the prompt has {len(prompt)} tokens.")
        max_new = min(params.max_tokens - len(prefix), ctx - used - (1 if self.seq2seq else 0))
        return _Row(row.dispatch, prompt, max_new, params.temperature, params.top_p, params.ignore_eos,
                    TextTracker(self.tok, list(params.stop), prefix, row.prefix_chars_sent),
                    make_generator(params.seed))

    def _generate(self, raw_rows: list[Row], emit: Emit, cancelled: IsCancelled) -> BatchStats:
        stats = BatchStats()
        self._decode_start = None
        rows: list[_Row] = []
        for raw in raw_rows:
            try:
                row = self._make_row(raw)
            except RowError as exc:
                emit(Error(dispatch=raw.dispatch, error_type=exc.error_type, message=str(exc)))
                continue
            if row.max_new <= 0:  # an earlier attempt already produced everything
                row.finish_reason = "length"
                self._done(row, emit)
                continue
            rows.append(row)
        if not rows:
            return stats
        t0 = time.perf_counter()
        self._stats, self._decode_start = stats, None
        logits, state = self._prefill(rows)  # logits: [B, V] float32 on CPU
        stats.prefill_s = time.perf_counter() - t0
        t1 = self._decode_start = time.perf_counter()
        self._sample(rows, logits, cancelled, emit)
        if self.decode_ahead and all(r.temperature < GREEDY_BELOW for r in rows):
            self._decode_greedy_ahead(rows, state, cancelled, emit, stats)
        while any(r.finish_reason is None for r in rows):
            last = [r.text.ids[-1] if r.finish_reason is None else self.pad_id for r in rows]
            logits, state = self._decode_step(last, state)
            stats.steps += 1
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            self._sample(rows, logits, cancelled, emit)
        stats.decode_s = time.perf_counter() - t1
        stats.generated_tokens = sum(r.generated for r in rows)
        return stats

    def _sample(self, rows: list[_Row], logits: torch.Tensor, cancelled: IsCancelled, emit: Emit) -> None:
        self._take(rows, lambda b, row: sample_token(logits[b, : self.vocab], row.temperature, row.top_p,
                                                     row.generator), cancelled, emit)

    def _take(self, rows: list[_Row], choose: Callable[[int, _Row], int], cancelled: IsCancelled,
              emit: Emit) -> None:
        """Give every unfinished row its next token, ``choose(b, row)``, and emit what follows."""
        for b, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            if cancelled(row.dispatch):
                row.finish_reason = "cancelled"
                continue  # the router already answered this client; no done event
            token = choose(b, row)
            if token in self.eos_ids and not row.ignore_eos:
                row.finish_reason = "stop"
            else:
                row.generated += 1
                delta = row.text.add(token)
                emit(Tokens(dispatch=row.dispatch, ids=[token], text=delta))
                if row.text.stopped:
                    row.finish_reason = "stop"
                elif row.generated >= row.max_new:
                    row.finish_reason = "length"
            if row.finish_reason is not None:
                self._done(row, emit)

    def _done(self, row: _Row, emit: Emit) -> None:
        rest = row.text.flush()
        if rest:
            emit(Tokens(dispatch=row.dispatch, ids=[], text=rest))
        durations = {}
        if self._decode_start is not None:  # this attempt's share of the batch: durations, worker clock
            durations = {"prefill_s": self._stats.prefill_s, "decode_s": time.perf_counter() - self._decode_start}
        emit(Done(dispatch=row.dispatch, finish_reason=row.finish_reason,  # type: ignore[arg-type]
                  prompt_tokens=len(row.prompt_ids), durations=durations))

    def _prefill(self, rows: list[_Row]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.seq2seq:
            return self._prefill_seq2seq(rows)
        seqs = [r.prompt_ids + r.text.ids for r in rows]  # text.ids starts with an earlier attempt's tokens
        # Static cache: prompts padded to a multiple of PREFILL_ROUND, so that prefills of similar lengths
        # share shapes (op plans, templates, graphs) instead of each length planning its ops anew.
        ids, mask = _left_pad(seqs, self.pad_id, PREFILL_ROUND if self.static_cache else 1)  # [B, T] each
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"use_cache": True}
        if self.static_cache:  # mask [B, L]: the whole cache length, future positions masked out
            width = ids.shape[1]
            length = -(-(width + max(r.max_new for r in rows)) // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND
            mask = torch.cat([mask, torch.zeros(len(rows), length - width, dtype=mask.dtype)], dim=1)
            if self._takes_cache_position:
                kwargs["cache_position"] = torch.arange(width).to(self.device)
            kwargs[self._cache_arg] = self._static_cache(len(rows), length)
            # A 4-D mask is used as given: no device sync inside forward to read the 2-D one.
            kwargs["attention_mask"] = _prefill_mask(mask, width).to(self.device)
        else:
            kwargs["attention_mask"] = mask.to(self.device)
        if self._takes_positions:
            kwargs["position_ids"] = positions.to(self.device)
        out = self.model(input_ids=ids.to(self.device), **kwargs)
        past = kwargs[self._cache_arg] if self.static_cache else _cache_of(out)
        state = {"past": past, "mask": mask, "pos": positions[:, -1:], "t": ids.shape[1]}
        return out.logits[:, -1, :].float().cpu(), state

    def _static_cache(self, batch: int, length: int) -> StaticCache:
        """A static KV cache for ``batch`` rows of ``length`` positions: the last one of that shape, reset,
        when there is one. Reusing it keeps its tensors and Python state the same from batch to batch, so
        on a remote device in graph mode even prefills are captured and replayed as one message."""
        cache = self._caches.pop((batch, length), None)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
        else:
            cache.reset()
        self._caches[(batch, length)] = cache
        while len(self._caches) > MAX_CACHES:
            self._caches.pop(next(iter(self._caches)))  # the least recently used
        return cache

    def _decode_step(self, last: list[int], state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.seq2seq:
            return self._decode_seq2seq(last, state)
        ids = torch.tensor(last).view(len(last), 1).to(self.device)
        logits, state = self._step(ids, state)
        return logits.float().cpu(), state

    def _decode_greedy_ahead(self, rows: list[_Row], state: dict[str, Any], cancelled: IsCancelled, emit: Emit,
                             stats: BatchStats) -> None:
        """Greedy decoding that never waits for the step it just sent: step t+1 takes step t's tokens
        straight from the device (argmax there) and goes out before the client reads step t's tokens,
        so the device computes while the client streams, checks stops and prepares the next step. A row
        that stops has one step computed in vain. Used by assisted workers (a remote device)."""
        from caserve.remote import fetch_later

        last = [r.text.ids[-1] if r.finish_reason is None else self.pad_id for r in rows]
        ids = torch.tensor(last).view(len(rows), 1).to(self.device)
        budget = max((r.max_new - r.generated for r in rows if r.finish_reason is None), default=0)
        waiting = None
        while True:
            ahead = None
            if budget > 0 and any(r.finish_reason is None for r in rows):
                logits, state = self._step(ids, state)
                ids = logits.float().argmax(-1, keepdim=True)  # [B, 1], on the device
                ahead = fetch_later(ids)
                budget -= 1
                stats.steps += 1
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
            if waiting is not None:
                tokens = waiting().view(-1).tolist()
                self._take(rows, lambda b, row: int(tokens[b]), cancelled, emit)
            if ahead is None:
                return
            waiting = ahead

    def _step(self, ids: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One decode step of ``ids`` [B, 1] on the device: the last position's logits [B, vocab], on the
        device, and the next state."""
        batch, t = ids.shape[0], state["t"]
        kwargs: dict[str, Any] = {"use_cache": True, self._cache_arg: state["past"]}
        if self.static_cache:
            mask = state["mask"].clone()  # a new tensor: an uploaded one may still be in flight
            mask[:, t] = 1  # [B, L]
            if self._takes_cache_position:
                kwargs["cache_position"] = torch.tensor([t]).to(self.device)
        else:
            mask = torch.cat([state["mask"], torch.ones(batch, 1, dtype=state["mask"].dtype)], dim=1)  # [B, t+1]
        pos = state["pos"] + 1  # [B, 1]
        # Static: a 4-D boolean mask [B, 1, 1, L] is used as given; a 2-D one makes transformers read its
        # values on every step (to skip masking), which is a device sync.
        kwargs["attention_mask"] = (mask.bool()[:, None, None, :] if self.static_cache else mask).to(self.device)
        if self._takes_positions:
            kwargs["position_ids"] = pos.to(self.device)
        out = self.model(input_ids=ids, **kwargs)
        past = state["past"] if self.static_cache else _cache_of(out)
        return out.logits[:, -1, : self.vocab], {"past": past, "mask": mask, "pos": pos, "t": t + 1}

    def _prefill_seq2seq(self, rows: list[_Row]) -> tuple[torch.Tensor, dict[str, Any]]:
        start = int(self.model.config.decoder_start_token_id or 0)
        enc_ids, enc_mask = _left_pad([r.prompt_ids for r in rows], self.pad_id)
        dec_ids, dec_mask = _left_pad([[start] + r.text.ids for r in rows], self.pad_id)
        enc_mask = enc_mask.to(self.device)
        encoded = self.model.get_encoder()(input_ids=enc_ids.to(self.device), attention_mask=enc_mask)
        out = self.model(encoder_outputs=encoded, attention_mask=enc_mask, decoder_input_ids=dec_ids.to(self.device),
                         decoder_attention_mask=dec_mask.to(self.device), use_cache=True)
        state = {"past": _cache_of(out), "enc": encoded, "enc_mask": enc_mask, "dec_mask": dec_mask}
        return out.logits[:, -1, :].float().cpu(), state

    def _decode_seq2seq(self, last: list[int], state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = len(last)
        dec_mask = torch.cat([state["dec_mask"], torch.ones(batch, 1, dtype=state["dec_mask"].dtype)], dim=1)
        out = self.model(encoder_outputs=state["enc"], attention_mask=state["enc_mask"],
                         decoder_input_ids=torch.tensor(last).view(batch, 1).to(self.device),
                         decoder_attention_mask=dec_mask.to(self.device), use_cache=True,
                         **{self._cache_arg: state["past"]})
        return out.logits[:, -1, :].float().cpu(), {**state, "past": _cache_of(out), "dec_mask": dec_mask}

    # ---------------------------------------------------------------------------------- encoders

    def _encode(self, rows: list[Row], emit: Emit, *, classify: bool) -> BatchStats:
        """Embeddings (mean-pooled last hidden state, L2-normalised) or classification (softmax, top label)."""
        stats = BatchStats()
        seqs: list[list[int]] = []
        owners: list[tuple[Row, int]] = []  # (row, number of inputs)
        for row in rows:
            try:
                if not row.inputs:
                    raise RowError("bad_request", f"a {row.task} row needs inputs")
                ids = [self._input_ids(x) for x in row.inputs]
            except RowError as exc:
                emit(Error(dispatch=row.dispatch, error_type=exc.error_type, message=str(exc)))
                continue
            seqs.extend(ids)
            owners.append((row, len(ids)))
        if not seqs:
            return stats
        t0 = time.perf_counter()
        ids, mask = _right_pad(seqs, self.pad_id)  # [N, T]
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        if classify:
            probs = torch.softmax(out.logits.float(), dim=-1).cpu()  # [N, labels]
            labels = getattr(self.model.config, "id2label", None) or {}
            classes = [ClassScore(label=str(labels.get(int(p.argmax()), int(p.argmax()))), score=float(p.max()),
                                  scores=[float(x) for x in p]) for p in probs]
        else:
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [N, T, H]
            m = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # [N, H]
            vectors: list[list[float]] = F.normalize(pooled.float(), dim=-1).cpu().tolist()
        stats.prefill_s = time.perf_counter() - t0
        i = 0
        for row, n in owners:
            prompt_tokens = sum(len(s) for s in seqs[i:i + n])
            if classify:
                emit(Done(dispatch=row.dispatch, prompt_tokens=prompt_tokens, classes=classes[i:i + n]))
            else:
                emit(Done(dispatch=row.dispatch, prompt_tokens=prompt_tokens, embeddings=vectors[i:i + n]))
            i += n
        return stats

    def _input_ids(self, x: Any) -> list[int]:
        ids = [int(i) for i in x] if isinstance(x, list) else list(self.tok(x)["input_ids"])
        if not ids:
            raise RowError("bad_request", "an input is empty")
        if len(ids) > self.lm.max_context:
            raise RowError("context_length_exceeded",
                           f"This model's maximum context length is {self.lm.max_context} tokens, "
                           f"but an input has {len(ids)} tokens.")
        if any(i < 0 or i >= self.vocab for i in ids):
            raise RowError("bad_request", f"input token ids must be in [0, {self.vocab})")
        return ids


def _cache_of(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _prefill_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The boolean attention mask [B, 1, width, L] of a prefill into a static cache of length L: query i
    sees the unpadded keys up to i (``mask`` [B, L] marks them), and itself, so that a padding query is
    never masked entirely (its output is unused, but must stay finite: it feeds the next layer's keys)."""
    length = mask.shape[1]
    q = torch.arange(width)[:, None]
    k = torch.arange(length)[None, :]
    seen = (k <= q)[None] & mask.bool()[:, None, :]  # [B, width, L]
    return (seen | (k == q)[None])[:, None]


def _left_pad(seqs: list[list[int]], pad: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    width = -(-width // multiple) * multiple
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    return ids, mask
