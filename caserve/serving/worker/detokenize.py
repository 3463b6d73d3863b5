"""Incremental detokenization: generated ids become text deltas, decoding only a short window per token.

A streaming decoder keeps two offsets into the ids: ``prefix`` (where the window starts: one or more
ids whose text is already known, so that tokenizers that add spaces or merge bytes between tokens
decode the new id in context) and ``read`` (the first id whose text is not known yet). For each new id
it decodes ``ids[prefix:read]`` and ``ids[prefix:]``; when the second is longer and does not end in a
partial UTF-8 character (U+FFFD), the difference is new text and both offsets move on. The cost per
token is the window's, not the output's, and the text equals one decode of all ids (tested on
byte-level BPE and WordPiece tokenizers with multi-byte characters, the clean-up below on and off).

Windows are decoded raw, without Transformers' clean-up of spaces before punctuation
(``clean_up_tokenization_spaces``): through the Rust ``tokenizers`` backend where there is one (4.7
instead of 13.6 us per token through the wrapper for caserve's byte-level tokenizer, median of 3 runs
of 2000 tokens on the 2-core CPU). Where a full decode would clean the text up, the raw text is cleaned
in pieces that end at a *cut*: between two letters or digits that no clean-up pattern joins (every
pattern starts with a space, and the only two letters or digits adjacent in one are "ve" and "re"), so
no pattern spans a cut, and the cleaned pieces join into the clean-up of the whole text. What follows
the last cut waits for the next one, or for the end.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
_JOINED = ("ve", "re")  # letter pairs inside a clean-up pattern (" 've", " 're")


class _RawDecoder:
    """``decode`` without the clean-up, for a tokenizer without a Rust backend."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,  # type: ignore[no-any-return]
                                     clean_up_tokenization_spaces=False)


def cleanup_of(tokenizer: Any) -> Optional[Callable[[str], str]]:
    """The clean-up ``tokenizer.decode`` applies to a whole text, or None. Transformers 5.24 skips it for
    BPE models unless told otherwise (an attribute older versions lack: they clean up)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE" and not getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True):
        return None
    return tokenizer.clean_up_tokenization  # type: ignore[no-any-return]


def _last_cut(text: str, start: int) -> int:
    """The last cut (see the module docstring) in ``text`` at or after ``start``; 0 when none."""
    for p in range(len(text) - 1, max(start, 1) - 1, -1):
        if text[p - 1].isalnum() and text[p].isalnum() and text[p - 1:p + 1] not in _JOINED:
            return p
    return 0


class IncrementalDecoder:
    """Text of a growing id sequence; ``text`` holds what is final (no trailing partial character)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decoder = backend if backend is not None else _RawDecoder(tokenizer)
        self._clean = cleanup_of(tokenizer)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        self._uncleaned = ""  # raw text after the last cut, with a clean-up only

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self.skip)  # type: ignore[no-any-return]

    def push(self, token_id: int) -> str:
        """Append one id; return the text that became final with it (often "", e.g. mid-character)."""
        self.ids.append(int(token_id))
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(self._prefix_text) and not window.endswith(REPLACEMENT):
            new = self._final(window[len(self._prefix_text):], end=False)
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
            return new
        return ""

    def finish(self) -> str:
        """The text still pending at the end (a partial character decodes as U+FFFD, as a full decode does)."""
        window = self._decode(self.ids[self._prefix:])
        new = self._final(window[len(self._prefix_text):], end=True)
        self._prefix = self._read = len(self.ids)
        self._prefix_text = ""
        return new

    def _final(self, raw: str, end: bool) -> str:
        """Raw text that became final; returns the text it adds (cleaned up to the last cut, or to the
        end, where the tokenizer cleans up)."""
        if self._clean is None:
            self.text += raw
            return raw
        seen = len(self._uncleaned)
        self._uncleaned += raw
        cut = len(self._uncleaned) if end else _last_cut(self._uncleaned, seen)
        new = self._clean(self._uncleaned[:cut])
        self._uncleaned = self._uncleaned[cut:]
        self.text += new
        return new


class TextTracker:
    """Turns a growing list of generated ids into text deltas, holding back what may still change.

    Held back: a trailing partial UTF-8 character and, when stop strings are set, the last
    ``len(longest stop) - 1`` characters. ``prefix_ids`` were generated by an earlier attempt of the same
    request, which delivered the first ``prefix_chars_sent`` characters of their text (None: all of it
    that was final).
    """

    def __init__(self, tokenizer: Any, stops: list[str], prefix_ids: Sequence[int] = (),
                 prefix_chars_sent: Optional[int] = None) -> None:
        self.stops = [s for s in stops if s]
        self.decoder = IncrementalDecoder(tokenizer)
        for token_id in prefix_ids:
            self.decoder.push(token_id)
        final = len(self.decoder.text)
        self.sent = final if prefix_chars_sent is None else min(final, prefix_chars_sent)
        self.stopped = False
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    @property
    def ids(self) -> list[int]:
        return self.decoder.ids

    @property
    def text(self) -> str:
        return self.decoder.text

    def add(self, token_id: int) -> str:
        """Append one id; return the text that is now final. Sets ``stopped`` when a stop string appears."""
        if self.decoder.push(token_id) and self._stop_found():
            return self._advance(self._stop_at)
        return self._advance(max(self.sent, len(self.text) - self._hold))

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        if self.stopped:
            return ""
        if self.decoder.finish() and self._stop_found():
            return self._advance(self._stop_at)
        return self._advance(len(self.text))

    def _stop_found(self) -> bool:
        if not self.stops:
            return False
        start = max(0, self.sent - self._hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._stop_at = True, min(hits)
        return bool(hits)

    def _advance(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
