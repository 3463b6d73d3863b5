"""Model resolution: a name, HF id or local path becomes a ready model, tokenizer and task.

caserve runs where nothing can be downloaded, so every model of the zoo can also be built from its
published configuration with random weights and an offline byte-level tokenizer. Such a model has the
real architecture and size (so its speed is representative) but says nothing about quality; it is
marked ``random_weights=True`` and every result that uses it must say so.

Resolution order for :func:`load_model`:

1. ``caserve/tiny-gpt2``: the built-in default, a 4-layer 64-wide GPT-2 with random weights.
2. A local directory: ``from_pretrained(path)``.
3. A zoo name: real weights from the local Hugging Face cache when present, else random weights from
   the published configuration (``shrink=True`` scales the architecture down for CPU-sized runs).
4. Any other id: ``from_pretrained(id)`` (downloads when the hub is reachable).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import transformers
from transformers import PreTrainedTokenizerFast

from caserve.defaults import DEFAULT_MODEL

logger = logging.getLogger(__name__)

Task = Literal["causal-lm", "seq2seq", "embedding", "classification"]
TASKS: tuple[str, ...] = ("causal-lm", "seq2seq", "embedding", "classification")


@dataclass(frozen=True)
class ZooEntry:
    """One model of the evaluation zoo: its HF id, config class and published configuration."""

    name: str
    config_class: str
    config: dict[str, Any]
    task: Task

    def make_config(self, shrink: bool = False, **overrides: Any) -> transformers.PretrainedConfig:
        cls = getattr(transformers, self.config_class)
        kwargs = dict(self.config)
        if shrink:
            kwargs = _shrunk(self.config_class, kwargs)
        kwargs.update(overrides)
        return cls(**kwargs)


# Published configurations (the fields that differ from each config class's defaults).
ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("gpt2", "GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024), "causal-lm"),
        ZooEntry("distilgpt2", "GPT2Config", dict(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024), "causal-lm"),
        ZooEntry(
            "facebook/opt-125m",
            "OPTConfig",
            dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272,
                 max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
                 pad_token_id=1, bos_token_id=2, eos_token_id=2),
            "causal-lm",
        ),
        ZooEntry(
            "EleutherAI/pythia-160m",
            "GPTNeoXConfig",
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                 bos_token_id=0, eos_token_id=0),
            "causal-lm",
        ),
        ZooEntry(
            "Qwen/Qwen2.5-0.5B",
            "Qwen2Config",
            dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643),
            "causal-lm",
        ),
        ZooEntry(
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "LlamaConfig",
            dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, bos_token_id=1, eos_token_id=2),
            "causal-lm",
        ),
        ZooEntry("bert-base-uncased", "BertConfig", dict(vocab_size=30522), "embedding"),
        ZooEntry("distilbert-base-uncased", "DistilBertConfig", dict(vocab_size=30522), "embedding"),
        ZooEntry(
            "roberta-base",
            "RobertaConfig",
            dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2),
            "embedding",
        ),
        ZooEntry(
            "t5-small",
            "T5Config",
            dict(d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8, vocab_size=32128,
                 feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
            "seq2seq",
        ),
    ]
}

TINY_GPT2 = ZooEntry(
    DEFAULT_MODEL, "GPT2Config", dict(n_layer=4, n_embd=64, n_head=4, vocab_size=512, n_positions=1024), "causal-lm"
)

# Field names that size each architecture, for shrink=True: (layers, width, heads, ffn, kv heads).
_SIZE_FIELDS: dict[str, tuple[str, str, str, str | None, str | None]] = {
    "GPT2Config": ("n_layer", "n_embd", "n_head", None, None),
    "OPTConfig": ("num_hidden_layers", "hidden_size", "num_attention_heads", "ffn_dim", None),
    "GPTNeoXConfig": ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", None),
    "Qwen2Config": ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "num_key_value_heads"),
    "LlamaConfig": ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "num_key_value_heads"),
    "BertConfig": ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", None),
    "RobertaConfig": ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", None),
    "DistilBertConfig": ("n_layers", "dim", "n_heads", "hidden_dim", None),
    "T5Config": ("num_layers", "d_model", "num_heads", "d_ff", None),
}


def _shrunk(config_class: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The same architecture at 2 layers, 64 wide, 4 heads and a 512-token vocabulary."""
    layers, width, heads, ffn, kv = _SIZE_FIELDS[config_class]
    out = dict(kwargs)
    out.update({layers: 2, width: 64, heads: 4, "vocab_size": 512})
    if ffn:
        out[ffn] = 256
    if kv:
        out[kv] = 2
    if config_class == "OPTConfig":
        out["word_embed_proj_dim"] = 64
    if config_class == "T5Config":
        out["d_kv"] = 16
        out["num_decoder_layers"] = 2
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if key in out and out[key] >= 512:
            out[key] = 0
    return out


@dataclass
class LoadedModel:
    """A model ready to serve: on its device, in eval mode, with its tokenizer and task."""

    name: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    task: Task
    random_weights: bool
    max_context: int

    @property
    def label(self) -> str:
        """How results should name this model: random weights are always said."""
        return f"{self.name} (random weights)" if self.random_weights else self.name


# --------------------------------------------------------------------------------------------------
# Offline tokenizer


SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]


def byte_level_tokenizer(encoder: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built without any file: ids 0..255 are bytes, then the special tokens.

    Used with random-weight models, where no trained vocabulary exists offline. Every id is < 262, so
    it fits any vocabulary size in the zoo. ``encoder=True`` wraps inputs as ``[CLS] ... [SEP]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: byte for byte, ch in enumerate(_byte_symbols())}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if encoder:
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tok.model_max_length = 1 << 30
    return tok


def _byte_symbols() -> list[str]:
    """The printable symbol standing for each byte in byte-level BPE, indexed by byte value.

    Printable Latin-1 bytes stand for themselves; the others (controls, space) are moved to code points
    from 256 up, in byte order, so that every byte has a visible, whitespace-free symbol.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


# --------------------------------------------------------------------------------------------------
# Loading


_AUTO_CLASSES: dict[str, Callable[..., Any]] = {
    "causal-lm": transformers.AutoModelForCausalLM,
    "seq2seq": transformers.AutoModelForSeq2SeqLM,
    "embedding": transformers.AutoModel,
    "classification": transformers.AutoModelForSequenceClassification,
}


def task_of_config(config: transformers.PretrainedConfig) -> Task:
    """The task a model serves by default, from its configuration."""
    archs = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    if config.is_encoder_decoder:
        return "seq2seq"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if config.model_type in ("bert", "distilbert", "roberta", "xlm-roberta", "mpnet", "electra"):
        return "embedding"
    return "causal-lm"


def max_context_of(config: transformers.PretrainedConfig) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if config.model_type in ("roberta", "xlm-roberta", "camembert"):
                # RoBERTa counts positions from its padding id + 1 (2 for roberta-base: 512 usable).
                return value - (getattr(config, "pad_token_id", None) or 1) - 1
            return value
    return 512  # relative-position models (T5) have no hard limit; 512 is what they were trained on


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    shrink: bool = False,
    task: Task | None = None,
) -> LoadedModel:
    """Resolve ``name_or_path`` (see the module docstring) and return it on ``device`` in eval mode."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if name_or_path == DEFAULT_MODEL:
        return _random(TINY_GPT2, device, dtype, shrink=False, task=task)
    local = os.path.expanduser(name_or_path)  # "~/x" names a folder here as in the CLI's check_model_path
    if os.path.isdir(local):
        return _pretrained(local, device, dtype, task=task, local_only=True)
    entry = ZOO.get(name_or_path)
    if entry is None:
        return _pretrained(name_or_path, device, dtype, task=task, local_only=False)
    if not shrink:
        try:
            return _pretrained(name_or_path, device, dtype, task=task or entry.task, local_only=True)
        except (OSError, ValueError) as exc:
            logger.info("%s: no local weights (%s); using random weights", name_or_path, type(exc).__name__)
    return _random(entry, device, dtype, shrink=shrink, task=task)


def _finish(model: torch.nn.Module, device: str | torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def _pretrained(path: str, device, dtype, *, task: Task | None, local_only: bool) -> LoadedModel:
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=local_only)
    task = task or task_of_config(config)
    model = _AUTO_CLASSES[task].from_pretrained(path, config=config, local_files_only=local_only)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    logger.info("loaded %s (%s) with real weights", path, task)
    return LoadedModel(path, _finish(model, device, dtype), tokenizer, task, False, max_context_of(config))


def _random(entry: ZooEntry, device, dtype, *, shrink: bool, task: Task | None) -> LoadedModel:
    task = task or entry.task
    tokenizer = byte_level_tokenizer(encoder=task in ("embedding", "classification"))
    special_ids: dict[str, Any] = {}
    if entry.task != "seq2seq":  # T5 keeps its own start/pad ids, which the byte tokenizer never emits
        special_ids = dict(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    config = entry.make_config(shrink=shrink, **special_ids)
    if task == "classification":
        config.num_labels = 2
    torch.manual_seed(0)  # the same random model in every process (router, workers, tests)
    model = _AUTO_CLASSES[task].from_config(config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    name = entry.name + (" (shrunk)" if shrink else "")
    logger.info("built %s (%s) with random weights", name, task)
    return LoadedModel(name, _finish(model, device, dtype), tokenizer, task, True, max_context_of(config))
