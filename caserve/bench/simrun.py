"""``caserve sim``: measured bench JSON in, projected cluster-scale queue delay and JCT out."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from caserve.bench import plots
from caserve.bench.sim import ServiceModel, SimError, project, validate_against

logger = logging.getLogger(__name__)


def bench_docs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Every single-run bench document in the given bench / compare / matrix result files."""
    docs: list[dict[str, Any]] = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        schema = doc.get("schema", "")
        if schema.startswith("caserve-bench/"):
            docs.append(doc)
        elif schema.startswith("caserve-compare/"):
            docs.extend(doc["runs"])
        elif schema.startswith("caserve-matrix/"):
            docs.extend(run for cell in doc["cells"] for run in cell["runs"])
        else:
            raise SimError(f"{p}: not a caserve bench, compare or matrix result (schema={schema!r})")
    if not docs:
        raise SimError("no bench runs in the given files")
    return docs


def run_sim(
    paths: Sequence[Path],
    *,
    gpus: int,
    cpu_nodes: Sequence[int],
    tenants_per_gpu: int = 8,
    tenant_slowdown: float = 0.0,
    policy: str = "fifo",
    load: float = 0.95,
    rate: Optional[float] = None,
    num_requests: int = 20000,
    validate: bool = False,
    seed: int = 0,
    out_dir: Optional[Path] = None,
    assisted_factor: float = 1.0,
    cv: float = 1.0,
    trace: Optional[Path] = None,
    time_scale: float = 1.0,
) -> str:
    """Run the sweep (and optional validation), write ``sim.json``/``sim.md``/``sim_jct.png``; return the
    markdown report."""
    docs = bench_docs(paths)
    measured = ServiceModel.from_results(docs)
    service = measured.with_assisted_factor(assisted_factor)
    assumed = "" if service is measured else f" (assisted: not measured, assumed {assisted_factor:g} x native)"
    arrivals = None
    if trace is not None:  # replay an Azure trace's arrival times (time_scale < 1 compresses it)
        from caserve.bench.arrivals import azure_trace

        arrivals = azure_trace(trace, n=num_requests, time_scale=time_scale).offsets
    proj = project(service, gpus=gpus, cpu_nodes=cpu_nodes, rate_rps=rate, load=load, num_requests=num_requests,
                   arrivals=arrivals,
                   tenants_per_gpu=tenants_per_gpu, tenant_slowdown=tenant_slowdown, policy=policy, cv=cv, seed=seed)
    validations = []
    if validate:
        for d in docs:
            try:
                v = validate_against(d, policy=policy)
            except SimError as exc:
                logger.warning("cannot validate %s: %s", d.get("label"), exc)
                continue
            v["label"] = d.get("label")
            validations.append(v)
    lines = [
        f"# caserve sim: {gpus} GPUs, policy {policy}, {tenants_per_gpu} tenants/GPU, "
        f"{proj.rate_rps:.1f} req/s ({'trace ' + str(trace) + f' x{time_scale:g}' if trace else f'arrival CV {cv:g}'}), "
        f"{num_requests} requests",
        "",
        f"hardware of the measured runs: {sorted({d.get('meta', {}).get('hardware', '?') for d in docs})}",
        f"service times (s){assumed}: {json.dumps(service.to_json())}",
        "",
        "| CPU nodes | assisted workers | mean queue delay (s) | p99 queue delay (s) | mean JCT (s) | p99 JCT (s) | JCT reduction | queue-delay reduction |",
        "|" + "---|" * 8,
    ]
    for r in proj.rows:
        lines.append(f"| {r['cpu_nodes']} | {r['assisted_workers']} | {r['mean_queue_delay_s']:.4f} | {r['p99_queue_delay_s']:.4f} | "
                     f"{r['mean_jct_s']:.4f} | {r['p99_jct_s']:.4f} | {r['jct_reduction_pct']:.1f}% | {r['queue_delay_reduction_pct']:.1f}% |")
    if validations:
        lines += ["", "| validated run | measured mean JCT (s) | simulated, resampled (s) | error | simulated, trace-driven (s) | error |",
                  "|---|---|---|---|---|---|"]
        for v in validations:
            lines.append(f"| {v['label']} | {v['measured_mean_jct_s']:.4f} | {v['simulated_mean_jct_s']:.4f} | {100 * v['relative_error']:.1f}% | "
                         f"{v['replay_mean_jct_s']:.4f} | {100 * v['replay_relative_error']:.1f}% |")
    report = "\n".join(lines) + "\n"
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sim.json").write_text(json.dumps({"schema": "caserve-sim/1", "service": service.to_json(), "assisted_assumed": bool(assumed),
                                                  "projection": proj.to_json(), "validation": validations}, indent=1))
        (out / "sim.md").write_text(report)
        xs = [r["cpu_nodes"] for r in proj.rows]
        plots.projection({"mean JCT": (xs, [r["mean_jct_s"] for r in proj.rows]),
                          "mean queue delay": (xs, [r["mean_queue_delay_s"] for r in proj.rows])},
                         out / "sim_jct.png", ylabel="seconds", title=f"{gpus} GPUs, {proj.rate_rps:.0f} req/s ({policy})")
    return report
