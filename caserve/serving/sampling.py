"""Per-row token sampling and incremental detokenization with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

GREEDY_BELOW = 1e-5  # temperature under this means argmax


def make_generator(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from ``logits`` [V] (float32, CPU): greedy, or temperature + nucleus (top-p) sampling."""
    assert logits.dim() == 1
    if temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        sorted_p[drop] = 0.0
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TextTracker:
    """Turns a growing list of generated ids into text deltas, holding back what may still change.

    Held back: a trailing partial UTF-8 character (decoded as U+FFFD) and, when stop strings are set,
    the last ``len(longest stop) - 1`` characters. ``prefix_ids`` were generated (and their text
    delivered) by an earlier attempt of the same request.
    """

    tokenizer: object
    stops: list[str]
    prefix_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    stopped: bool = False

    def __post_init__(self) -> None:
        self.ids = list(self.prefix_ids)
        self.sent = len(self._text().rstrip("\ufffd"))
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def add(self, token_id: int) -> str:
        """Append one id; return the text that is now final. Sets ``stopped`` when a stop string appears."""
        self.ids.append(token_id)
        text = self._text()
        if self.stops:
            start = max(0, self.sent - self._hold)
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                return self._advance(text, min(hits))
        end = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
        return self._advance(text, max(self.sent, end - self._hold))

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        return "" if self.stopped else self._advance(self._text(), len(self._text()))

    def _advance(self, text: str, end: int) -> str:
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
