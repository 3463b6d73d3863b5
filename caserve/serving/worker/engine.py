"""The worker's engine: continuous batching over a fixed number of slots sharing one KV cache.

A causal LM gets ``max_batch`` slots over one :class:`~caserve.serving.worker.slots.SlotCache` of
``max_batch x length`` (fixed shapes: graph-mode capture on a remote device keeps working). Each
:meth:`Engine.step`:

1. frees the slots of cancelled rows;
2. admits waiting rows into the lowest free slots (``batching="static"``: only when every slot is
   free, the baseline that runs one batch to its end); the choices of one ``n`` > 1 request
   (``Row.prompt_group``) with the same sequence are prefilled once: the first one's prefill is copied
   into the others' slots (their KV columns) and each samples its first token from the same logits
   with its own seed and state;
3. prefills waiting prompts in chunks of ``chunk`` tokens, as many chunks as the step's token budget
   (``step_tokens`` minus one token per decoding slot) allows, at least one; a prompt's last chunk
   samples its first token;
4. runs one decode step over the first slots, up to the highest decoding one (on a remote device a
   bucket covering it, a power of two: few shapes to capture; a static batch keeps the width it was
   admitted with), the others in it writing a column nothing reads; samples the decoding slots' next
   tokens on the device and keeps them there as the next step's inputs;
5. reads the sampled ids (one fetch per forward) and emits tokens, stops and ``done`` events. On a
   remote device (assisted workers) a step's ids are read only after the next step has been sent
   (``caserve.remote.fetch_later``), so the GPU server computes while the worker streams; a row that
   stops then has one step computed in vain, and its slot is refilled at the step after.

Chunk boundaries depend only on the row, never on what else runs, so a row's tokens are the same
whether it runs alone or among others. Sampling runs on the device (``sampling.SlotSampler``): only
the chosen ids, and the logprobs a request asked for, are read back; an echo request's prompt logprobs
are scored chunk by chunk from the prefill's own logits. Encoder-decoder, embedding and classification models run through ``BatchRunner``
one dispatched batch at a time. Device failures are not caught here: the worker decides what losing
a device means.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from typing import Any, Optional

import torch

from caserve.models import LoadedModel
from caserve.serving.messages import MODEL_TASKS, TASK_CLASSIFY, TASK_EMBED, TASK_GENERATE, Error, Event
from caserve.serving.messages import Row as RowMessage
from caserve.serving.messages import SamplingParams
from caserve.serving.worker import attention
from caserve.serving.worker.batch import BatchRunner
from caserve.serving.worker.config import BATCHING, MAX_LEN
from caserve.serving.worker.rows import Emit, Flush, IsCancelled, RowError, error_event, make_row
from caserve.serving.worker.logprobs import LogprobRenderer
from caserve.serving.worker.sampling import SampleResult, SlotSampler, pack, unpack
from caserve.serving.worker.slot_state import BatchStats, PendingRead, Slot
from caserve.serving.worker.slots import PREFILL_ROUND, SlotCache, bucket, decode_inputs, prefill_inputs, window_for

logger = logging.getLogger(__name__)

CHUNK = 256  # prompt tokens per prefill chunk (a multiple of PREFILL_ROUND)
STEP_TOKENS = 512  # token budget of one step: decoding slots plus prefill chunks
REPORT_S = 0.5  # seconds between progress reports while busy


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    def __init__(self, lm: LoadedModel, *, max_batch: int = 8, max_len: int = MAX_LEN,
                 batching: str = "continuous", step_tokens: int = STEP_TOKENS, chunk: int = CHUNK,
                 step_delay_s: float = 0.0, decode_ahead: bool = True) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, not {batching!r}")
        if max_batch < 1 or chunk < 1 or chunk % PREFILL_ROUND or step_tokens < 1:
            raise ValueError(f"need max_batch >= 1, step_tokens >= 1 and chunk a positive multiple of {PREFILL_ROUND}")
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.slots, self.batching, self.step_tokens, self.chunk = max_batch, batching, step_tokens, chunk
        self.step_delay_s = step_delay_s  # emulates a slower device (tests, benchmarks); 0 in production
        self.device = next(self.model.parameters()).device
        self.vocab = min(int(self.model.config.get_text_config().vocab_size), len(self.tok))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = {int(e) for e in eos + [self.tok.eos_token_id] if e is not None}
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else 0)
        self.batch = BatchRunner(lm, self.vocab, self.eos_ids, self.pad_id)
        self.causal = lm.task == "causal-lm"
        self.context = min(lm.max_context, max_len)  # most tokens one slot holds
        self.length = _round_up(self.context, PREFILL_ROUND) + PREFILL_ROUND  # room for a last chunk's padding
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x: cache
        self._takes_positions = "position_ids" in params
        self._takes_cache_position = "cache_position" in params  # older transformers
        self._takes_keep = "logits_to_keep" in params  # prefill: project only the last position onto the vocab
        self.remote = self.device.type == "caserve"  # assisted: captured steps want few fixed shapes
        self.ahead = decode_ahead and self.remote
        # Decode attention over each row's own columns (the varlen kernel, float32 models) or per run of
        # slots, each with its own window (attention.py), on the CPU only: the kernel is a CPU kernel and
        # RUN_COST was measured there. Not on a remote device (its captured steps need the few shapes of
        # one window per step), nor on a GPU (one window per step there, as before).
        self.runs = self.causal and self.device.type == "cpu" and attention.install(self.model)
        self.run_cost = attention.RUN_COST
        dtype = next(self.model.parameters()).dtype
        self.kernel = self.runs and dtype == torch.float32 and attention.load_kernel() is not None
        self.sampler = SlotSampler(max_batch, self.vocab, self.device, sorted(self.eos_ids))
        self.renderer = LogprobRenderer(self.tok)
        self.active: list[Optional[Slot]] = [None] * max_batch
        self.pending: collections.deque[RowMessage] = collections.deque()
        self.reads: collections.deque[PendingRead] = collections.deque()
        self.stats = BatchStats()
        self.wake = threading.Event()
        self._cache: Optional[SlotCache] = None
        self._next_ids: Optional[torch.Tensor] = None  # [slots] on the device: each slot's next input
        self._all_rows: Optional[torch.Tensor] = None  # [slots, 1] on the device: 0..slots-1
        self._step_no = 0
        self._static_width = max_batch  # batching="static": the decode width of the running batch
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}  # slot lists as device tensors

    @property
    def tasks(self) -> set[str]:
        return MODEL_TASKS[self.lm.task]

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.reads or any(s is not None for s in self.active))

    @property
    def occupied(self) -> int:
        return sum(1 for s in self.active if s is not None)

    def submit(self, rows: list[RowMessage]) -> None:
        """Queue rows for admission (thread-safe); they take slots at the next step."""
        self.pending.extend(rows)
        self.wake.set()

    def take_stats(self) -> BatchStats:
        stats, self.stats = self.stats, BatchStats()
        return stats

    def run(self, rows: list[RowMessage], emit: Emit, cancelled: IsCancelled) -> BatchStats:
        """Run ``rows`` (and anything queued before) to the end; every row gets exactly one ``done`` or
        ``error`` event unless cancelled (or the device fails)."""
        self.submit(rows)
        while self.busy:
            self.step(emit, cancelled)
        return self.take_stats()

    def serve(self, flush: Flush, cancelled: IsCancelled, stop: threading.Event) -> None:
        """Step while there is work; wait for :meth:`submit` otherwise; return when ``stop`` is set.
        Each step's events go to ``flush`` together, in order (one hand-over per step, not per token).
        A ``Progress`` report joins them every ``REPORT_S`` while busy and when the engine becomes idle."""
        reported = time.monotonic()
        while not stop.is_set():
            if not self.busy:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            events: list[Event] = []
            try:
                self.step(events.append, cancelled)
                now = time.monotonic()
                if now - reported >= REPORT_S or not self.busy:
                    events.append(self.take_stats().event(self.occupied, self.free_slots))
                    reported = now
            finally:  # a step that fails part-way still hands over what it emitted before failing
                if events:
                    flush(events)

    @property
    def free_slots(self) -> int:
        if self.batching == "static" and (self.occupied or self.reads):
            return 0
        return max(0, self.slots - self.occupied - len(self.pending))

    def warm_up(self) -> None:
        """Pay first-call costs (cache allocation, op planning, a decode step's capture) before serving,
        so that the first requests and the router's first estimates do not carry them."""
        if not self.causal:
            return
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        row = RowMessage(dispatch="warm-up", job="warm-up", task=TASK_GENERATE, prompt_ids=[0],
                         params=params)
        self.run([row], lambda event: None, lambda dispatch: False)

    def abandon(self) -> list[str]:
        """Drop every row (after a failure, or when the router session ends); returns their dispatch ids."""
        dropped = [r.dispatch for r in self.pending] + [s.row.dispatch for s in self.active if s is not None]
        self.pending.clear()
        self.reads.clear()
        for slot in [s for s in self.active if s is not None]:
            self._free(slot)
        return dropped

    # ---------------------------------------------------------------------------------- one step

    def step(self, emit: Emit, cancelled: IsCancelled) -> None:
        with torch.inference_mode():
            self._step_no += 1
            if not self.causal:
                self._run_batch(emit, cancelled)
                return
            for slot in [s for s in self.active if s is not None]:
                if cancelled(slot.row.dispatch):
                    slot.row.finish_reason = "cancelled"  # the router already answered; no done event
                    self._free(slot)
            self._admit(emit, cancelled)
            decoding = sum(1 for s in self.active if s is not None and s.decoding)
            budget, chunks = self.step_tokens - decoding, 0
            for slot in sorted((s for s in self.active if s is not None and s.filled < len(s.seq)
                                and s.leader is None), key=lambda s: s.row.started):
                while slot.filled < len(slot.seq) and (budget > 0 or chunks == 0):
                    budget -= self._prefill_chunk(slot, emit)
                    chunks += 1
            decoded = self._decode(emit)
            for read in list(self.reads):
                if self.ahead and decoded and read.step == self._step_no:
                    break  # keep the newest step in flight while the next one is prepared
                self.reads.popleft()
                self._apply(read, emit)

    def _admit(self, emit: Emit, cancelled: IsCancelled) -> None:
        if self.batching == "static" and (self.occupied or self.reads):
            return
        while self.pending and None in self.active:
            raw = self.pending.popleft()
            if cancelled(raw.dispatch):
                continue
            if raw.task != TASK_GENERATE:
                emit(Error(dispatch=raw.dispatch, error_type="bad_request",
                           message=f"a causal LM cannot serve {raw.task!r} requests"))
                continue
            try:
                row = make_row(self.lm, self.vocab, raw, context=self.context)
            except RowError as exc:
                emit(error_event(raw.dispatch, exc))
                continue
            if row.max_new <= 0 and row.params.prompt_logprobs is None:  # an earlier attempt produced everything
                row.finish_reason = "length"
                row.done(emit)
                continue
            index = self.active.index(None)  # the lowest free slot: decode steps cover few slots
            try:
                self.sampler.start(index, row.params, row.prompt_ids, row.text.ids)
            except ValueError as exc:
                emit(error_event(row.dispatch, RowError("bad_request", str(exc))))
                continue
            slot = Slot(index, row, row.sequence, group=raw.prompt_group)
            self.active[index] = slot
            self._follow(slot)
        if self.batching == "static":  # a static batch runs at its admitted width until its last row ends
            self._static_width = bucket(1 + max((s.index for s in self.active if s is not None), default=0),
                                        self.slots)

    def _follow(self, slot: Slot) -> None:
        """Share the prefill of another choice of ``slot``'s request with the same sequence (and prompt
        scoring): wait for it and copy its KV columns if it is being prefilled; if it is already
        decoding (this choice came later, when a slot freed), copy all but its last prompt column now
        and prefill only the last token, whose logits the first sample needs."""
        if slot.group is None:
            return
        siblings = [o for o in self.active if o is not None and o is not slot and o.leader is None
                    and o.group == slot.group and o.seq == slot.seq]
        for other in siblings:
            if other.filled < len(other.seq) \
                    and other.row.params.prompt_logprobs == slot.row.params.prompt_logprobs:
                slot.leader = other
                other.followers.append(slot)
                return
        done = [o for o in siblings if o.filled == len(o.seq)]
        if done and slot.row.params.prompt_logprobs is None and len(slot.seq) > 1:
            self._slot_cache().copy_prefix(done[0].index, self._index([slot.index]), len(slot.seq) - 1)
            slot.filled = len(slot.seq) - 1

    def _free(self, slot: Slot) -> None:
        if self.active[slot.index] is not slot:
            return
        self.active[slot.index] = None
        self.sampler.free(slot.index)
        if slot.leader is not None:
            slot.leader.followers.remove(slot)
            slot.leader = None
        if slot.followers:  # freed before its prefill ended: the next choice prefills for the others
            heir, *rest = slot.followers
            heir.leader, heir.followers = None, rest
            for other in rest:
                other.leader = heir
            slot.followers = []

    def _forward(self, ids: torch.Tensor, rows: torch.Tensor, host: dict[str, torch.Tensor],
                 keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward over the slot cache; ``host`` holds cols, position_ids and mask (CPU); ``keep``
        ([k] on the device) the positions whose logits are wanted (all when None). Returns the logits
        [n, q or k, V] on the device."""
        cache = self._slot_cache()
        cache.rows, cache.cols = rows, host["cols"].to(self.device)
        cache.window = int(host["mask"].shape[-1])
        kwargs: dict[str, Any] = {"use_cache": True, self._cache_arg: cache,
                                  "attention_mask": host["mask"].to(self.device)}
        positions = host["position_ids"].to(self.device)
        if self._takes_positions:
            kwargs["position_ids"] = positions
        if self._takes_cache_position:
            kwargs["cache_position"] = positions[0]
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        return self.model(input_ids=ids, **kwargs).logits

    def _slot_cache(self) -> SlotCache:
        if self._cache is None:
            self._cache = SlotCache(self.model.config, self.slots, self.length, self.device)
            self._all_rows = torch.arange(self.slots).view(-1, 1).to(self.device)
            self._next_ids = torch.full((self.slots,), self.pad_id, dtype=torch.long).to(self.device)
        return self._cache

    def _prefill_chunk(self, slot: Slot, emit: Emit) -> int:
        """Prefill the next chunk of ``slot``'s sequence; the last one samples its first token.
        Returns the chunk's padded width (what it cost of the step's budget)."""
        t0 = time.perf_counter()
        start = slot.filled
        count = min(self.chunk, len(slot.seq) - start)
        width = _round_up(count, PREFILL_ROUND)
        ids = torch.tensor([slot.seq[start:start + count] + [self.pad_id] * (width - count)]).to(self.device)
        rows = torch.tensor([[slot.index]]).to(self.device)
        echo = slot.row.params.prompt_logprobs is not None
        # Only the chunk's last real position needs logits (unless the prompt is scored): projecting all
        # W positions onto a large vocabulary would cost more than the rest of the chunk.
        keep = self._index([count - 1]) if self._takes_keep and not echo else None
        logits = self._forward(ids, rows, prefill_inputs(start, count, width, self.length), keep)  # [1, W or 1, V]
        if echo:
            self._score_prompt(slot, logits[0, :count], start)
        slot.filled += count
        if slot.filled == len(slot.seq):
            self._prefilled(slot, logits[:, -1 if keep is not None else count - 1, :], emit)
        self.stats.prefill_tokens += count
        self.stats.prefill_s += time.perf_counter() - t0
        return width

    def _prefilled(self, slot: Slot, last: torch.Tensor, emit: Emit) -> None:
        """``slot``'s sequence is in the cache (``last`` [1, V]: its last position's logits): its followers
        copy its KV columns, and each of them samples its first token from ``last`` with its own state."""
        group = [slot] + slot.followers
        if slot.followers:
            self._slot_cache().copy_prefix(slot.index, self._index([f.index for f in slot.followers]), len(slot.seq))
            for f in slot.followers:
                f.filled, f.leader = len(f.seq), None
                if slot.row.prompt_logprobs is not None:
                    f.row.prompt_logprobs = list(slot.row.prompt_logprobs)
            slot.followers = []
        sampling = []
        for s in group:
            if s.row.max_new <= 0:  # echo with max_tokens 0: scored, done
                s.row.finish_reason = "length"
                s.row.done(emit)
                self._free(s)
            else:
                sampling.append(s)
        if not sampling:
            return
        index = [s.index for s in sampling]
        result = self.sampler.sample(last.expand(len(index), -1), index)
        assert self._next_ids is not None
        self._next_ids = self._next_ids.index_copy(0, self._index(index), result.ids)
        for s in sampling:
            s.issued = 1
        self._read_later(result, sampling)

    def _index(self, slots: list[int]) -> torch.Tensor:
        """``slots`` as an int64 tensor on the device, made once per distinct list."""
        key = tuple(slots)
        at = self._indices.get(key)
        if at is None:
            if len(self._indices) >= 512:
                self._indices.clear()
            at = self._indices[key] = torch.tensor(key, dtype=torch.long).to(self.device)
        return at

    def _decode(self, emit: Emit) -> bool:
        """One decode step over the first ``width`` slots: up to the highest decoding one, rounded up to
        a bucket on a remote device (few shapes to capture); a static batch keeps its admitted width.
        False when no slot is decoding."""
        decoding = [s for s in self.active if s is not None and s.decoding]
        if not decoding:
            return False
        t0 = time.perf_counter()
        if self.batching == "static":
            width = self._static_width
        elif self.remote:
            width = bucket(decoding[-1].index + 1, self.slots)
        else:  # eager devices: rows past the highest decoding slot would be computed for nothing
            width = decoding[-1].index + 1
        # An idle slot writes column 0, a slot being prefilled its next unfilled one (its next chunk's).
        cols = [0 if s is None else s.filled for s in self.active[:width]]
        for s in decoding:
            cols[s.index] = len(s.seq) + s.issued - 1  # the column of its newest sampled token
        assert self._next_ids is not None and self._all_rows is not None
        live = [s is not None and s.decoding for s in self.active[:width]]
        layout: Optional[attention.Layout] = None
        if self.kernel:  # each row over its own columns; a slot that is not decoding over its written one
            layout = attention.Ranges([0 if d else c for c, d in zip(cols, live)], [c + 1 for c in cols])
        elif self.runs:
            layout = attention.plan_runs([window_for(c, self.length) for c in cols], self.run_cost)
        with attention.decoding(layout):
            logits = self._forward(self._next_ids[:width].view(-1, 1), self._all_rows[:width],
                                   decode_inputs(cols, live, self.length))[:, -1, :]  # [width, V]
        index = [s.index for s in decoding]
        if len(index) == self.slots:
            result = self.sampler.sample(logits, index)
            self._next_ids = result.ids
        else:
            at = self._index(index)
            result = self.sampler.sample(logits if len(index) == width else logits.index_select(0, at), index)
            self._next_ids = self._next_ids.index_copy(0, at, result.ids)
        for s in decoding:
            s.issued += 1
        self._read_later(result, decoding)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.stats.steps += 1
        self.stats.occupancy += len(decoding)
        self.stats.decode_s += time.perf_counter() - t0
        return True

    def _score_prompt(self, slot: Slot, logits: torch.Tensor, start: int) -> None:
        """Echo: the logprobs of the prompt tokens this chunk (``logits`` [count, V], from position
        ``start``) scores; the chunk's last row scores the next chunk's first token."""
        row, k = slot.row, slot.row.params.prompt_logprobs or 0
        end = min(start + logits.shape[0], len(row.prompt_ids))
        if start >= end:
            return
        if start == 0:
            row.prompt_logprobs = [self.renderer.first(row.prompt_ids[0])]
            ids, scoring = row.prompt_ids[:end], logits[: end]
        else:
            assert slot.last_logits is not None and row.prompt_logprobs is not None
            ids, scoring = row.prompt_ids[start - 1:end], torch.cat([slot.last_logits, logits[: end - start]])
        row.prompt_logprobs += self.renderer.prompt(self.sampler.prompt_logprobs(scoring, ids, k), ids)
        slot.last_logits = logits[-1:]

    def _read_later(self, result: SampleResult, owners: list[Slot]) -> None:
        packed = pack(result)  # ids, or ids with the logprobs rows asked for: one transfer either way
        if self.ahead:
            from caserve.remote import fetch_later

            fetch = fetch_later(packed)
        else:
            fetch = packed.cpu
        self.reads.append(PendingRead(fetch, owners, self._step_no))

    def _apply(self, read: PendingRead, emit: Emit) -> None:
        tokens, extra = unpack(read.fetch())
        now = time.perf_counter()
        for i, (slot, token) in enumerate(zip(read.owners, tokens)):
            row = slot.row
            if self.active[slot.index] is not slot or row.finish_reason is not None:
                continue  # stopped or cancelled: a step computed ahead in vain
            if row.prefilled is None:
                row.prefilled = now
            self.stats.generated_tokens += 1
            if row.take(int(token), self.eos_ids, emit, self.renderer.generated(extra, i, row.params.logprobs)):
                self._free(slot)

    # ---------------------------------------------------------------------------------- other models

    def _run_batch(self, emit: Emit, cancelled: IsCancelled) -> None:
        """Encoder-decoder, embedding and classification models: the waiting rows of one task, at most
        ``max_batch``, as one batch."""
        task = self.pending[0].task
        rows = []
        for _ in range(len(self.pending)):
            raw = self.pending.popleft()
            if raw.task == task and len(rows) < self.slots:
                rows.append(raw)
            else:
                self.pending.append(raw)
        t0 = time.perf_counter()
        if task == TASK_GENERATE:
            self.stats.steps += self.batch.generate(rows, emit, cancelled)
        elif task in (TASK_EMBED, TASK_CLASSIFY):
            self.batch.encode(rows, emit, classify=task == TASK_CLASSIFY)
        else:
            for raw in rows:
                emit(Error(dispatch=raw.dispatch, error_type="bad_request", message=f"unknown task {task!r}"))
        self.stats.prefill_s += time.perf_counter() - t0
