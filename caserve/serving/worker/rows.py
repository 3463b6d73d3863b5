"""One dispatched generation row as the worker sees it: its prompt ids, limits, text and events.

Shared by the slot engine (causal LMs) and the batch runner (seq2seq). Rows arrive as
:class:`~caserve.serving.messages.Row` structs; events go out through ``emit`` as the
:mod:`~caserve.serving.messages` structs ``Tokens``, ``Done`` and ``Error``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from caserve.models import LoadedModel
from caserve.serving.messages import Done, Error, Event, Row as RowMessage, SamplingParams, TokenLogprob, Tokens
from caserve.serving.worker.detokenize import TextTracker

Emit = Callable[[Event], None]
Flush = Callable[[list[Event]], None]  # a step's events, handed over together
IsCancelled = Callable[[str], bool]


class RowError(Exception):
    """A row the model cannot run (bad ids, too long); reported to that row's client only."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(eq=False)
class Row:
    dispatch: str
    prompt_ids: list[int]
    max_new: int
    params: SamplingParams
    text: TextTracker  # text.ids starts with the tokens an earlier attempt generated
    generated: int = 0
    finish_reason: Optional[str] = None
    started: float = field(default_factory=time.perf_counter)
    prefilled: Optional[float] = None  # perf_counter when its first token was sampled
    prompt_logprobs: Optional[list[TokenLogprob]] = None  # echo: one entry per prompt token, filled by prefill
    prompt_sent: bool = False  # echo: the prompt's logprobs and text went with an event already

    @property
    def sequence(self) -> list[int]:
        """What the model reads before generating on: the prompt and an earlier attempt's tokens."""
        return self.prompt_ids + self.text.ids

    def take(self, token: int, eos_ids: set[int], emit: Emit, logprob: Optional[TokenLogprob] = None) -> bool:
        """Give the row its next token (with its logprob entry, when asked for) and emit what follows;
        True when the row has finished."""
        if (token in eos_ids and not self.params.ignore_eos) or token in self.params.stop_token_ids:
            self.finish_reason = "stop"
        else:
            self.generated += 1
            delta = self.text.add(token)
            logprobs = None if logprob is None else [logprob]
            emit(Tokens(dispatch=self.dispatch, ids=[token], text=delta, logprobs=logprobs, **self._echo()))
            if self.text.stopped:
                self.finish_reason = "stop"
            elif self.generated >= self.max_new:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self.done(emit)
            return True
        return False

    def done(self, emit: Emit) -> None:
        rest = self.text.flush()
        if rest:
            emit(Tokens(dispatch=self.dispatch, ids=[], text=rest, **self._echo()))
        now = time.perf_counter()
        prefilled = self.prefilled if self.prefilled is not None else now
        durations = {"prefill_s": prefilled - self.started, "decode_s": now - prefilled}  # worker clock
        emit(Done(dispatch=self.dispatch, finish_reason=self.finish_reason,  # type: ignore[arg-type]
                  prompt_tokens=len(self.prompt_ids), durations=durations, **self._echo()))

    def _echo(self) -> dict[str, Any]:
        """An echo row's prompt logprobs and text, for its first event (nothing after that)."""
        if self.prompt_logprobs is None or self.prompt_sent:
            return {}
        self.prompt_sent = True
        return {"prompt_logprobs": self.prompt_logprobs,
                "prompt_text": self.text.decoder.tokenizer.decode(self.prompt_ids, skip_special_tokens=True)}


def error_event(dispatch: str, exc: RowError) -> Error:
    return Error(dispatch=dispatch, error_type=exc.error_type, message=str(exc))


def prompt_ids(lm: LoadedModel, vocab: int, row: RowMessage) -> list[int]:
    tok = lm.tokenizer
    if row.messages is not None:
        if getattr(tok, "chat_template", None):
            messages = [{"role": m.role, "content": m.content} for m in row.messages]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = "".join(f"{m.role}: {m.content}\n" for m in row.messages) + "assistant:"
        return list(tok(text)["input_ids"])
    if row.prompt_ids is not None:
        if any(i >= vocab for i in row.prompt_ids):
            raise RowError("bad_request", f"prompt token ids must be in [0, {vocab})")
        return list(row.prompt_ids)
    if row.prompt is None:
        raise RowError("bad_request", "a generate row needs a prompt, prompt_ids or messages")
    return list(tok(row.prompt)["input_ids"])


def make_row(lm: LoadedModel, vocab: int, row: RowMessage, *, context: int, seq2seq: bool = False) -> Row:
    """A validated row; ``context`` is the most tokens a sequence may hold on this worker."""
    prompt = prompt_ids(lm, vocab, row)
    prefix = list(row.prefix_ids)
    raw = row.params
    if raw is None:
        raise RowError("bad_request", "a generate row needs sampling params")
    if not prompt:
        raise RowError("bad_request", "the prompt is empty after tokenization")
    used = len(prompt) + (0 if seq2seq else len(prefix))
    if len(prompt) >= context or used >= context:
        raise RowError("context_length_exceeded",
                       f"This model's maximum context length is {context} tokens, "
                       f"but the prompt has {len(prompt)} tokens.")
    room = context - (1 if seq2seq else len(prompt))  # most tokens this request can generate
    if not raw.fit_context and raw.max_tokens > room:
        raise RowError("context_length_exceeded",
                       f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{raw.max_tokens + (0 if seq2seq else len(prompt))} tokens "
                       f"({len(prompt)} in the prompt, {raw.max_tokens} for the completion).")
    if raw.prompt_logprobs is not None and seq2seq:
        raise RowError("bad_request", "prompt logprobs (echo) need a decoder-only model")
    for t in list(raw.logit_bias) + list(raw.stop_token_ids):
        if not 0 <= t < vocab:
            raise RowError("bad_request", f"token id {t} is outside the vocabulary [0, {vocab})")
    max_new = min(raw.max_tokens - len(prefix), context - used - (1 if seq2seq else 0))
    text = TextTracker(lm.tokenizer, list(raw.stop), prefix, row.prefix_chars_sent)
    return Row(row.dispatch, prompt, max_new, raw, text)
