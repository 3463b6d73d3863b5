"""``caserve bench matrix``: every model x every dataset, native-only vs native + K assisted, in one run.

Loop order keeps server starts to ``models x configurations``::

    for model:                      # 10 LMs of the zoo
        for config in [native only, native + K assisted]:
            start one server
            for dataset:            # sharegpt, wikitext2, sst2, agnews
                warm up, replay the cell's arrival sequence
            stop the server

A cell's arrival rate is calibrated once, on the native-only server: ``load * native / mean service
time`` of a few sequential warm-up requests, so every cell queues about equally on the baseline; the
assisted configuration replays exactly the same offsets. Generative models get classification datasets as
short completions (``classify_tokens``); encoder models get every dataset as ``/v1/embeddings``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from caserve.bench import plots
from caserve.bench.compare import SERVE_CMD, Config, calibrate, launched_server, markdown_table, table_rows, warm_up
from caserve.bench.run import WorkloadSpec, bench_serve, save_result
from caserve.bench.zoo import model_task, weights_are_random

logger = logging.getLogger(__name__)

MATRIX_DATASETS = ("sharegpt", "wikitext2", "sst2", "agnews")


class MatrixError(RuntimeError):
    """The matrix could not run at all (e.g. no models)."""


@dataclass
class MatrixSpec:
    models: list[str] = field(default_factory=list)  # empty: the whole zoo
    datasets: list[str] = field(default_factory=lambda: list(MATRIX_DATASETS))
    num_requests: int = 8
    output_len: int = 16
    classify_tokens: int = 2
    max_prompt_words: int = 24  # random-weight models tokenize bytes: 24 words ~ 150 tokens < 512
    load: float = 1.0
    native: int = 1
    assisted: int = 1
    server_cmd: str = SERVE_CMD
    server_args: str = ""
    shrink: bool = True  # small version: shrunk zoo models (random weights)
    calibration_requests: int = 3
    warmup: int = 2  # rounds of one request per worker, per cell
    seed: int = 0


def cell_plan(model: str, dataset: str, spec: MatrixSpec) -> tuple[str, WorkloadSpec]:
    """(endpoint, workload without a rate yet) for one cell."""
    task = model_task(model)
    if task in ("embedding", "classification"):
        endpoint, out_len = "embeddings", 0
    elif dataset in ("sst2", "agnews"):
        endpoint, out_len = "completions", spec.classify_tokens
    else:
        endpoint, out_len = "completions", spec.output_len
    wl = WorkloadSpec(dataset=dataset, num_requests=spec.num_requests, process="poisson", rate=1.0,
                      output_len=out_len, max_prompt_words=spec.max_prompt_words, seed=spec.seed)
    return endpoint, wl


def run_matrix(spec: MatrixSpec, out_dir: Path, *, progress: bool = False) -> dict[str, Any]:
    from caserve.models import ZOO

    models = spec.models or list(ZOO)
    if not models or not spec.datasets:
        raise MatrixError("matrix needs at least one model and one dataset")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = [Config(spec.native, 0), Config(spec.native, spec.assisted)]
    cells: dict[str, dict[str, Any]] = {}
    t_start = time.monotonic()
    for model in models:
        rates: dict[str, float] = {}
        for cfg in configs:
            key = f"{model.replace('/', '_')}_{cfg.native}n_{cfg.assisted}a"
            try:
                extra = " ".join(a for a in (spec.server_args, "--shrink" if spec.shrink else "") if a)
                with launched_server(spec.server_cmd, model=model, cfg=cfg, log_path=out_dir / "logs" / f"{key}.log",
                                     extra=extra) as url:
                    for ds in spec.datasets:
                        endpoint, wl = cell_plan(model, ds, spec)
                        warm_up(url, wl, n=spec.warmup, endpoint=endpoint, workers=cfg.native + cfg.assisted)
                        if ds not in rates:  # native-only config runs first: calibrate there
                            rates[ds] = calibrate(url, wl, endpoint, n=spec.calibration_requests, load=spec.load, native=spec.native)
                        wl = replace(wl, rate=rates[ds])
                        doc = bench_serve(url, wl, endpoint=endpoint, label=cfg.label, progress=progress,
                                          extra_meta={"workers": {"native": cfg.native, "assisted": cfg.assisted},
                                                      "requested_model": model})
                        if doc["meta"]["random_weights"] == "unknown":
                            doc["meta"]["random_weights"] = weights_are_random(model, shrink=spec.shrink)
                        cells.setdefault(f"{model}|{ds}", {"model": model, "dataset": ds, "endpoint": endpoint, "runs": []})["runs"].append(doc)
            except Exception as exc:  # noqa: BLE001 - one model failing must not lose the others' results
                logger.error("matrix: %s %s failed: %s", model, cfg.label, exc)
                for ds in spec.datasets:
                    cells.setdefault(f"{model}|{ds}", {"model": model, "dataset": ds, "runs": []}).setdefault("errors", []).append(f"{cfg.label}: {exc}")
    for cell in cells.values():
        cell["rows"] = table_rows(cell["runs"]) if cell["runs"] else []
    result = {"schema": "caserve-matrix/1", "spec": asdict(spec), "elapsed_s": time.monotonic() - t_start,
              "cells": list(cells.values())}
    write_outputs(result, out_dir, models, spec.datasets)
    return result


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for c in result["cells"]:
        r = c.get("rows") or []
        base = r[0] if r else None
        best = r[-1] if len(r) > 1 else None
        rw = base.get("random_weights") if base else None
        rows.append({
            "model": c["model"], "dataset": c["dataset"], "endpoint": c.get("endpoint"),
            "random_weights": rw,
            "native_mean_jct_s": base["mean_jct_s"] if base else None,
            "assisted_mean_jct_s": best["mean_jct_s"] if best else None,
            "native_mean_queue_s": base["mean_queue_delay_s"] if base else None,
            "assisted_mean_queue_s": best["mean_queue_delay_s"] if best else None,
            "failed": [row["failed"] for row in r],
            "jct_reduction_pct": best["jct_reduction_pct"] if best else None,
            "queue_delay_reduction_pct": best["queue_delay_reduction_pct"] if best else None,
            "errors": c.get("errors", []),
        })
    return rows


def _f(v: Optional[float], fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def _pct(v: Optional[float], failed: Sequence[int]) -> str:
    """A reduction, or why it is not one: with failed requests the means cover different request sets."""
    if any(failed):
        return f"n/a (failures; raw {_f(v, '{:.0f}%')})"
    return _f(v, "{:.1f}%")


def markdown(result: dict[str, Any]) -> str:
    spec = result["spec"]
    hw = next((r["hardware"] for c in result["cells"] for r in c.get("rows", [])), "unknown")
    lines = [
        "# caserve bench matrix\n",
        f"hardware: {hw}; native={spec['native']} vs native={spec['native']} + assisted={spec['assisted']}; "
        f"{spec['num_requests']} requests per cell at load {spec['load']}; elapsed {result['elapsed_s']:.0f}s. "
        "Means are over successful requests; where any request failed the two configurations served different "
        "request sets, so no reduction is claimed (the raw figure is shown in brackets).\n",
        "| model | dataset | weights | endpoint | failed (native / +assisted) | native mean JCT (s) | assisted mean JCT (s) | JCT reduction | native mean queue (s) | assisted mean queue (s) | queue reduction |",
        "|" + "---|" * 11,
    ]
    for r in summary_rows(result):
        w = "random" if r["random_weights"] is True else ("real" if r["random_weights"] is False else str(r["random_weights"]))
        lines.append(
            f"| {r['model']} | {r['dataset']} | {w} | {r['endpoint']} | {' / '.join(map(str, r['failed'])) or 'n/a'} | {_f(r['native_mean_jct_s'])} | {_f(r['assisted_mean_jct_s'])} | "
            f"{_pct(r['jct_reduction_pct'], r['failed'])} | {_f(r['native_mean_queue_s'])} | {_f(r['assisted_mean_queue_s'])} | "
            f"{_pct(r['queue_delay_reduction_pct'], r['failed'])} |" + (f" errors: {'; '.join(r['errors'])}" if r["errors"] else "")
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path, models: Sequence[str], datasets: Sequence[str]) -> None:
    save_result(result, out_dir / "matrix.json")
    (out_dir / "matrix_summary.json").write_text(json.dumps(summary_rows(result), indent=1))
    (out_dir / "matrix.md").write_text(markdown(result))
    for metric, name in (("jct_reduction_pct", "jct"), ("queue_delay_reduction_pct", "queue_delay")):
        grid = np.full((len(models), len(datasets)), np.nan)
        for r in summary_rows(result):
            if r[metric] is not None and not any(r["failed"]) and r["model"] in models and r["dataset"] in datasets:
                grid[list(models).index(r["model"]), list(datasets).index(r["dataset"])] = r[metric]
        plots.reduction_heatmap(list(models), list(datasets), grid, out_dir / f"matrix_{name}_reduction.png",
                                title=f"{name.replace('_', ' ')} reduction with assisted workers (blank: failures or not run)")
    for c in result["cells"]:
        if c.get("rows"):
            logger.debug("%s/%s\n%s", c["model"], c["dataset"], markdown_table(c["rows"]))
