"""``caserve bench serve``: one workload, one arrival sequence, one server -> one JSON result.

Result file layout (``schema: caserve-bench/1``)::

    {"schema", "label", "meta": {url, model, random_weights, hardware, dataset, arrivals, seed, date, ...},
     "metrics": {see caserve.bench.metrics.compute_metrics},
     "requests": [RequestRecord.to_json(), ...]}
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from caserve.bench import arrivals as arr
from caserve.bench.datasets import BenchRequest, load_workload
from caserve.bench.loadgen import LoadGenConfig, run_load_sync, server_info
from caserve.bench.metrics import DEFAULT_PERCENTILES, RequestRecord, compute_metrics

logger = logging.getLogger(__name__)

SCHEMA = "caserve-bench/1"


@dataclass
class WorkloadSpec:
    """What to send and when; the same spec always yields the same requests and offsets."""

    dataset: str = "synthetic"
    dataset_path: Optional[str] = None
    num_requests: int = 50
    process: str = "poisson"  # poisson | gamma | azure
    rate: float = 2.0
    cv: float = 1.0
    trace_path: Optional[str] = None
    time_scale: float = 1.0
    output_len: Optional[int] = None
    max_prompt_words: Optional[int] = None
    seed: int = 0

    def build(self) -> tuple[list[BenchRequest], np.ndarray]:
        offsets, trace = arr.make_arrivals(
            self.num_requests,
            process=self.process,
            rate=self.rate,
            cv=self.cv,
            trace_path=Path(self.trace_path) if self.trace_path else None,
            time_scale=self.time_scale,
            seed=self.seed,
        )
        out_lens = trace.generated_tokens if (trace is not None and self.output_len is None) else None
        reqs = load_workload(
            self.dataset,
            len(offsets),
            path=Path(self.dataset_path) if self.dataset_path else None,
            seed=self.seed,
            output_len=self.output_len,
            output_lens=out_lens,
            max_prompt_words=self.max_prompt_words,
        )
        return reqs, offsets


def hardware_label() -> str:
    """E.g. ``"2-core CPU (x86_64), no GPU"``; names the GPU when torch sees one."""
    cpu = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    try:
        import torch

        if torch.cuda.is_available():
            return f"{cpu}, GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return f"{cpu}, no GPU"


def bench_serve(
    url: str,
    workload: WorkloadSpec,
    *,
    model: Optional[str] = None,
    endpoint: str = "auto",
    slos: Optional[dict[str, float]] = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    label: str = "",
    max_concurrency: Optional[int] = None,
    progress: bool = True,
    extra_meta: Optional[dict[str, Any]] = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run the workload against ``url`` and return the result document."""
    reqs, offsets = workload.build()
    info = server_info(url)
    model = model or info.get("id")
    cfg = LoadGenConfig(
        url=url, model=model, endpoint=endpoint, progress=progress, max_concurrency=max_concurrency,
        timeout_s=timeout_s,
    )
    logger.info("bench %s: %d requests (%s, %s) against %s", label or "run", len(reqs), workload.dataset, workload.process, url)
    records, duration = run_load_sync(reqs, offsets, cfg)
    meta = {
        "url": url,
        "model": model,
        "random_weights": info.get("random_weights", "unknown"),
        "hardware": hardware_label(),
        "endpoint": endpoint,
        "workload": asdict(workload),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "server_info": info,
    }
    meta.update(extra_meta or {})
    return {
        "schema": SCHEMA,
        "label": label,
        "meta": meta,
        "metrics": compute_metrics(records, duration, percentiles=percentiles, slos=slos),
        "requests": [r.to_json() for r in records],
    }


def save_result(doc: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    logger.info("wrote %s", path)
    return path


def load_result(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} result (schema={doc.get('schema')!r})")
    return doc


def records_of(doc: dict[str, Any]) -> list[RequestRecord]:
    return [RequestRecord.from_json(d) for d in doc.get("requests", [])]


def format_summary(doc: dict[str, Any]) -> str:
    """A vLLM-style text block of the main metrics."""
    m = doc["metrics"]
    lines = [
        f"==== caserve bench: {doc.get('label') or doc['meta'].get('url')} ====",
        f"model: {doc['meta'].get('model')} (random weights: {doc['meta'].get('random_weights')})",
        f"hardware: {doc['meta'].get('hardware')}",
        f"successful requests: {m['completed']}  failed: {m['failed']}",
        f"duration (s): {m['duration_s']:.2f}",
        f"request throughput (req/s): {m['request_throughput']:.3f}",
        f"output token throughput (tok/s): {m['output_throughput']:.2f}",
        f"total token throughput (tok/s): {m['total_token_throughput']:.2f}",
    ]
    if m.get("request_goodput") is not None:
        lines.append(f"request goodput (req/s): {m['request_goodput']:.3f}  SLOs(ms): {m['slos_ms']}")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency"),
                      ("queue_delay_ms", "queue delay"), ("jct_ms", "JCT")):
        if key in m:
            s = m[key]
            if not s.get("count", 1):  # no sample (e.g. no request succeeded): zeros would read as fast
                lines.append(f"{name:>12} (ms): no samples")
                continue
            pct = "  ".join(f"{k} {v:.1f}" for k, v in s.items() if k.startswith("p"))
            lines.append(f"{name:>12} (ms): mean {s['mean']:.1f}  median {s['median']:.1f}  {pct}")
    return "\n".join(lines)


def first_error(doc: dict[str, Any]) -> Optional[str]:
    """The error of the first failed request of a result document (None when none failed)."""
    return next((r["error"] for r in doc.get("requests", []) if r.get("error")), None)
