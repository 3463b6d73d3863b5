"""Log-probabilities as the worker reports them (:class:`~caserve.serving.messages.TokenLogprob`): per
token its text, its UTF-8 bytes, its logprob and the most likely alternatives. The router has no
tokenizer, so the worker names every token; the first token of a prompt has logprob None and no
alternatives, as in OpenAI's ``echo``."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from caserve.serving.messages import TokenLogprob, TopLogprob
from caserve.serving.worker.sampling import PromptLogprobs


class LogprobRenderer:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._names: dict[int, str] = {}

    def name(self, token_id: int) -> str:
        """A token's own text (a partial UTF-8 character shows as U+FFFD)."""
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = self.tok.decode([token_id])
        return name

    def top(self, token_id: int, logprob: float) -> TopLogprob:
        name = self.name(token_id)
        return TopLogprob(id=token_id, token=name, logprob=float(logprob), bytes=list(name.encode("utf-8")))

    def token(self, token_id: int, logprob: Optional[float], top_ids: Sequence[int] = (),
              top_logprobs: Sequence[float] = ()) -> TokenLogprob:
        name = self.name(token_id)
        return TokenLogprob(id=token_id, token=name, logprob=None if logprob is None else float(logprob),
                            bytes=list(name.encode("utf-8")),
                            top=[self.top(int(t), v) for t, v in zip(top_ids, top_logprobs)])

    def generated(self, extra: dict[str, Any], i: int, k: Optional[int]) -> Optional[TokenLogprob]:
        """Row ``i`` of a step's host-side log-probabilities (``sampling.unpack``), ``k`` alternatives."""
        if k is None or "logprobs" not in extra:
            return None
        return self.token(int(extra["ids"][i]), extra["logprobs"][i], extra["top_ids"][i][:k],
                          extra["top_logprobs"][i][:k])

    def first(self, token_id: int) -> TokenLogprob:
        """A prompt's first token: nothing predicts it (logprob None)."""
        return self.token(int(token_id), None)

    def prompt(self, scored: PromptLogprobs, ids: Sequence[int]) -> list[TokenLogprob]:
        """Entries of ``ids[1:]`` scored by ``SlotSampler.prompt_logprobs(logits, ids, k)``."""
        lps = scored.logprobs.double().tolist()
        n = len(lps)
        top_ids = scored.top_ids.tolist() if scored.top_ids is not None else [[]] * n
        top_lps = scored.top_logprobs.double().tolist() if scored.top_logprobs is not None else [[]] * n
        return [self.token(int(ids[j + 1]), lps[j], top_ids[j], top_lps[j]) for j in range(n)]
