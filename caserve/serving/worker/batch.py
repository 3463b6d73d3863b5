"""Models that the slot engine does not run, run one dispatched batch at a time: encoder-decoder
generation (a left-padded batch with a dynamic KV cache, each row stopping on its own), embeddings
(mean-pooled last hidden state, L2-normalised) and classification (softmax, top label)."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from caserve.models import LoadedModel
from caserve.serving.messages import ClassScore, Done, Row as RowMessage
from caserve.serving.worker.rows import Emit, IsCancelled, Row, RowError, error_event, make_row
from caserve.serving.worker.logprobs import LogprobRenderer
from caserve.serving.worker.sampling import SlotSampler, pack, unpack

logger = logging.getLogger(__name__)


class BatchRunner:
    def __init__(self, lm: LoadedModel, vocab: int, eos_ids: set[int], pad_id: int) -> None:
        self.lm, self.vocab, self.eos_ids, self.pad_id = lm, vocab, eos_ids, pad_id
        self.model, self.tok = lm.model, lm.tokenizer
        self.device = next(self.model.parameters()).device
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.renderer = LogprobRenderer(self.tok)

    # ---------------------------------------------------------------------------------- seq2seq

    def generate(self, raw_rows: list[RowMessage], emit: Emit, cancelled: IsCancelled) -> int:
        """Run encoder-decoder rows to the end; returns the decode steps run."""
        rows: list[Row] = []
        for raw in raw_rows:
            try:
                row = make_row(self.lm, self.vocab, raw, context=self.lm.max_context, seq2seq=True)
            except RowError as exc:
                emit(error_event(raw.dispatch, exc))
                continue
            if row.max_new <= 0:  # an earlier attempt already produced everything
                row.finish_reason = "length"
                row.done(emit)
                continue
            rows.append(row)
        if not rows:
            return 0
        sampler = SlotSampler(len(rows), self.vocab, self.device, sorted(self.eos_ids))
        live = []
        for i, row in enumerate(rows):
            try:
                sampler.start(i, row.params, row.prompt_ids, row.text.ids)
                live.append(row)
            except ValueError as exc:
                emit(error_event(row.dispatch, RowError("bad_request", str(exc))))
                row.finish_reason = "error"
        logits, state = self._prefill(rows)
        steps = 0
        while True:
            active = [i for i, r in enumerate(rows) if r.finish_reason is None]
            for i in active:
                if cancelled(rows[i].dispatch):
                    rows[i].finish_reason = "cancelled"  # the router already answered; no done event
            active = [i for i in active if rows[i].finish_reason is None]
            if not active:
                return steps
            ids, extra = unpack(pack(sampler.sample(logits[active], active)).cpu())
            for n, (i, token) in enumerate(zip(active, ids)):
                if rows[i].prefilled is None:
                    rows[i].prefilled = time.perf_counter()
                rows[i].take(int(token), self.eos_ids, emit,
                             self.renderer.generated(extra, n, rows[i].params.logprobs))
            if all(r.finish_reason is not None for r in rows):
                return steps
            last = [r.text.ids[-1] if r.finish_reason is None else self.pad_id for r in rows]
            logits, state = self._decode(last, state)
            steps += 1

    def _prefill(self, rows: list[Row]) -> tuple[torch.Tensor, dict[str, Any]]:
        start = int(self.model.config.decoder_start_token_id or 0)
        enc_ids, enc_mask = _left_pad([r.prompt_ids for r in rows], self.pad_id)
        dec_ids, dec_mask = _left_pad([[start] + r.text.ids for r in rows], self.pad_id)
        enc_mask = enc_mask.to(self.device)
        encoded = self.model.get_encoder()(input_ids=enc_ids.to(self.device), attention_mask=enc_mask)
        out = self.model(encoder_outputs=encoded, attention_mask=enc_mask, decoder_input_ids=dec_ids.to(self.device),
                         decoder_attention_mask=dec_mask.to(self.device), use_cache=True)
        state = {"past": _cache_of(out), "enc": encoded, "enc_mask": enc_mask, "dec_mask": dec_mask}
        return out.logits[:, -1, :], state

    def _decode(self, last: list[int], state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = len(last)
        dec_mask = torch.cat([state["dec_mask"], torch.ones(batch, 1, dtype=state["dec_mask"].dtype)], dim=1)
        out = self.model(encoder_outputs=state["enc"], attention_mask=state["enc_mask"],
                         decoder_input_ids=torch.tensor(last).view(batch, 1).to(self.device),
                         decoder_attention_mask=dec_mask.to(self.device), use_cache=True,
                         **{self.cache_arg: state["past"]})
        return out.logits[:, -1, :], {**state, "past": _cache_of(out), "dec_mask": dec_mask}

    # ---------------------------------------------------------------------------------- encoders

    def encode(self, rows: list[RowMessage], emit: Emit, *, classify: bool) -> None:
        seqs: list[list[int]] = []
        owners: list[tuple[RowMessage, int]] = []  # (row, number of inputs)
        for row in rows:
            try:
                if not row.inputs:
                    raise RowError("bad_request", f"a {row.task} row needs inputs")
                ids = [self._input_ids(x) for x in row.inputs]
            except RowError as exc:
                emit(error_event(row.dispatch, exc))
                continue
            seqs.extend(ids)
            owners.append((row, len(ids)))
        if not seqs:
            return
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
        i = 0
        for row, n in owners:
            prompt_tokens = sum(len(s) for s in seqs[i:i + n])
            if classify:
                emit(Done(dispatch=row.dispatch, prompt_tokens=prompt_tokens, classes=classes[i:i + n]))
            else:
                emit(Done(dispatch=row.dispatch, prompt_tokens=prompt_tokens, embeddings=vectors[i:i + n]))
            i += n

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


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    return ids, mask
