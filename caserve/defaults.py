"""Defaults that light processes share without importing torch or transformers.

The router, ``caserve serve``'s supervising process, the CLI and the cluster config only need the
default model's name; importing :mod:`caserve.models` for it would load torch and transformers (several
seconds and a few hundred MB) into processes that never run a model.
"""

from __future__ import annotations

DEFAULT_MODEL = "caserve/tiny-gpt2"
