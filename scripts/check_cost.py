"""What the GPU server's checks cost, for an A/B between two checkouts (docs/results.md, section 9).

    PYTHONPATH=<checkout> python scripts/check_cost.py templates   # ms per new template
    PYTHONPATH=<checkout> python scripts/check_cost.py calls       # Python calls per forward

``templates``: a fresh in-process server and session per model; the first forward of a 24-token prompt
defines every template, the second (same shapes) none: (first - second) / templates. ``calls``: Python
function calls (cProfile) per forward, client and in-process server together, eager and graph mode; exact,
so it does not depend on the machine's noise. Each server uses its checkout's default quota. Prints JSON.
The script uses only ``caserve.remote``, ``caserve.remote.server.GPUServer`` and ``caserve.models``, which
every checkout since the layout change has, so the same file runs against old and new trees.
"""

from __future__ import annotations

import cProfile
import gc
import json
import pstats
import sys
import time

import torch

import caserve.remote as R
from caserve.models import load_model
from caserve.remote.server import GPUServer

MODELS = [("caserve/tiny-gpt2", False), ("Qwen/Qwen2.5-0.5B", True), ("gpt2", True)]


def _forget_meta_verdicts() -> None:
    try:  # the server-wide cache of meta-call verdicts (absent before the hardening)
        from caserve.remote.server import metacheck
    except ImportError:
        return
    metacheck._CACHE.clear()


def templates() -> dict:
    out = {}
    for name, shrink in MODELS:
        for timed in (False, True):  # the first pass warms this process's Python and torch for the model
            _forget_meta_verdicts()
            dev = R.connect(server=GPUServer("cpu"))
            model = load_model(name, shrink=shrink).model.to(dev)
            ids = torch.randint(3, 100, (1, 24)).to(dev)
            with torch.inference_mode():
                before = R.stats(dev)["meta_misses"]
                t0 = time.perf_counter()
                model(ids).logits.cpu()
                t1 = time.perf_counter()
                defined = R.stats(dev)["meta_misses"] - before
                model(ids).logits.cpu()
                t2 = time.perf_counter()
            R.disconnect(dev)
        out[name] = {"first_ms": (t1 - t0) * 1e3, "second_ms": (t2 - t1) * 1e3, "templates": defined,
                     "ms_per_template": ((t1 - t0) - (t2 - t1)) * 1e3 / defined}
    return out


def _calls(model: torch.nn.Module, ids: torch.Tensor, n: int = 20) -> float:
    with torch.inference_mode():
        for _ in range(5):
            model(ids).logits[:, -1].argmax(-1).cpu()
        gc.collect()
        gc.disable()  # a collection's finalizers (freed storages) would add calls whenever it happens to run
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(n):
            model(ids).logits[:, -1].argmax(-1).cpu()
        profile.disable()
        gc.enable()
    return pstats.Stats(profile).total_calls / n  # type: ignore[attr-defined]


def calls() -> dict:
    out = {}
    for name, shrink in MODELS[:2]:
        dev = R.connect(server=GPUServer("cpu"))
        model = load_model(name, shrink=shrink).model.to(dev)
        ids = torch.randint(3, 100, (1, 8)).to(dev)
        out[f"{name} eager"] = _calls(model, ids)
        R.graph_mode(model)
        out[f"{name} graph"] = _calls(model, ids)
        R.disconnect(dev)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    what = sys.argv[1] if len(sys.argv) > 1 else "calls"
    print(json.dumps({"templates": templates, "calls": calls}[what]()))
