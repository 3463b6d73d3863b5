"""The gpu-suite's report: ``suite.json`` (lean: no per-request records), ``summary.md`` and the plots."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_report(doc: dict[str, Any], out: Path, *, final: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _plots(doc, out)
    lean = copy.deepcopy(doc)
    for run in (lean.get("onebox") or {}).get("runs", []):
        run.pop("requests", None)
    lean["complete"] = final
    (out / "suite.json").write_text(json.dumps(lean, indent=1, default=str))
    (out / "summary.md").write_text(summary(lean))


def summary(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    lines = [f"# caserve gpu-suite ({doc['device']}){'' if doc.get('complete') else ' (partial)'}", "",
             f"GPU: {env.get('gpu', 'none')}; driver {env.get('driver')}; torch {env.get('torch')} (CUDA "
             f"{env.get('cuda')}); transformers {env.get('transformers')}; {env.get('cores')} cores; "
             f"caserve {env.get('commit')}; started {doc.get('started')}", "",
             "| step | status | seconds | budget (s) |", "|---|---|---|---|"]
    for name, rec in doc["steps"].items():
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', '')} | {rec.get('budget_s', '')} |")
    tests = doc["steps"].get("cuda_tests", {})
    if tests.get("counts"):
        c = tests["counts"]
        lines += ["", f"CUDA tests ({', '.join(tests.get('files', []))}): {c['tests']} run, {c['failures']} failed, "
                  f"{c['errors']} errors, {c['skipped']} skipped (log: cuda_tests.log)"]
    if doc.get("remote_overhead"):
        lines += ["", "## Remote overhead (median per generated token, batch 1)", "",
                  "| model | mode | native ms | assisted ms | native tok/s | assisted tok/s | assisted/native | "
                  "server CPU ms / step | round trips / token |", "|" + "---|" * 9]
        for r in doc["remote_overhead"]:
            lines.append(f"| {r['model']} | {r['mode']} | {r['native_ms_per_token']:.2f} | "
                         f"{r['remote_ms_per_token']:.2f} | {1e3 / r['native_ms_per_token']:.1f} | "
                         f"{1e3 / r['remote_ms_per_token']:.1f} | {r['ratio']:.2f} | "
                         f"{r['server_cpu_s_per_token'] * 1e3:.2f} | {r['syncs_per_token']:.2f} |")
    if doc.get("server_scaling"):
        from caserve.bench.server_scaling import markdown

        ss = doc["server_scaling"]
        lines += ["", f"## Server scaling ({ss['model']}, {ss['new_tokens']} tokens per decode)", "", markdown(ss)]
    ob = doc.get("onebox")
    if ob:
        from caserve.bench.onebox import markdown

        spec = ob.get("spec", {})
        lines += ["", "## One box: 1 native + K assisted workers, pinned cores", "",
                  f"{spec.get('model')}, {spec.get('num_requests')} ShareGPT prompts, Poisson at {spec.get('load')}x "
                  f"the native-only capacity ({_f(ob.get('native_capacity_rps'))} req/s measured -> "
                  f"{_f(ob.get('rate_rps'))} req/s); Azure conversation output lengths x {spec.get('output_scale')} "
                  f"(at most {spec.get('max_output')}); shared cores: {ob.get('shared_cores')}", "", markdown(ob)]
        if ob.get("error"):
            lines += ["", f"onebox error: {ob['error']}"]
    failed = [(n, r) for n, r in doc["steps"].items() if r["status"] not in ("ok",)]
    for name, rec in failed:
        tail = (rec.get("log_tail") or rec.get("reason") or "").strip().splitlines()[-8:]
        lines += ["", f"### {name}: {rec['status']}", "", "```", *tail, "```"]
    return "\n".join(lines) + "\n"


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _plots(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        if doc.get("remote_overhead"):
            _remote_plot(doc["remote_overhead"], out / "remote_overhead.png", plt)
        ss = doc.get("server_scaling")
        if ss and ss.get("rounds"):
            _scaling_plot(ss, out / "server_scaling.png", plt)
        if doc.get("onebox") and doc["onebox"].get("runs"):
            from caserve.bench.onebox import plot

            plot(doc["onebox"], out)
    except Exception:  # noqa: BLE001 - a plot must not lose the JSON and the table
        logger.exception("plotting failed")


def _remote_plot(results: list[dict[str, Any]], path: Path, plt) -> None:
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / 4
    for j, model in enumerate(models):
        rows = {r["mode"]: r for r in results if r["model"] == model}
        native = next(iter(rows.values()))["native_ms_per_token"]
        bars = [("native", 1e3 / native)] + [(m, 1e3 / r["remote_ms_per_token"]) for m, r in rows.items()]
        for i, (label, v) in enumerate(bars):
            axes[0].bar(j + i * width, v, width, color=f"C{i}", label=label if j == 0 else None)
        for i, (m, r) in enumerate(rows.items()):
            axes[1].bar(j + (i + 1) * width, r["server_cpu_s_per_token"] * 1e3, width, color=f"C{i + 1}",
                        label=m if j == 0 else None)
    for ax, ylabel in zip(axes, ("tokens/s (batch 1)", "GPU-server CPU ms per step")):
        ax.set_xticks([j + 1.5 * width for j in range(len(models))], [m.split(" (")[0] for m in models], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("native vs assisted (eager / graph / engine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scaling_plot(ss: dict[str, Any], path: Path, plt) -> None:
    n = [r["tenants"] for r in ss["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [r["tokens_per_s"] for r in ss["rounds"]], marker="o", color="C0", label="tokens/s (all tenants)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tenants (one decoding process each)")
    ax.set_ylabel("aggregate tokens/s", color="C0")
    ax2 = ax.twinx()
    ax2.plot(n, [r["server_cpu_s_per_step"] * 1e3 for r in ss["rounds"]], marker="s", color="C3")
    ax2.set_ylabel("server CPU ms per decode step", color="C3")
    ax.grid(alpha=0.3)
    ax.set_title(f"one GPU server, {ss['model']}: saturates at {ss.get('saturates_at')} tenants", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
