"""Bench-side facts about models of the zoo (the zoo itself and the loader live in :mod:`caserve.models`)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def model_task(name: str) -> str:
    """The zoo's task for ``name``; ``causal-lm`` for names outside the zoo."""
    from caserve.models import ZOO

    entry = ZOO.get(name)
    return entry.task if entry is not None else "causal-lm"


def weights_are_random(name: str, *, shrink: bool) -> bool | str:
    """Whether a server loading ``name`` (with ``shrink``) ends up with random weights, decided the way
    :func:`caserve.models.load_model` decides, without loading the model; ``"unknown"`` for other ids."""
    from caserve.models import DEFAULT_MODEL, ZOO

    if name == DEFAULT_MODEL:
        return True
    if os.path.isdir(name):
        return False
    if name not in ZOO:
        return "unknown"
    if shrink:
        return True
    try:
        import transformers

        transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        from huggingface_hub import try_to_load_from_cache

        for fname in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(name, fname), str):
                return False
    except (OSError, ValueError, ImportError) as exc:
        logger.debug("%s: no local weights (%s)", name, type(exc).__name__)
    return True
