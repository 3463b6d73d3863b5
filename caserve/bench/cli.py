"""``caserve bench ...`` and ``caserve sim``: parse the arguments, then call into caserve.bench."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from caserve.cli_common import setup_logging

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks and evaluation.")


def _csv_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _workload(dataset, dataset_path, num_requests, arrivals, rate, cv, trace, time_scale, output_len, max_prompt_words, seed):
    from caserve.bench.run import WorkloadSpec

    return WorkloadSpec(
        dataset=dataset, dataset_path=str(dataset_path) if dataset_path else None, num_requests=num_requests,
        process=arrivals, rate=rate, cv=cv, trace_path=str(trace) if trace else None, time_scale=time_scale,
        output_len=output_len, max_prompt_words=max_prompt_words, seed=seed,
    )


_DATASET = typer.Option("synthetic", help="synthetic | sharegpt | wikitext2 | sst2 | agnews")
_DATASET_PATH = typer.Option(None, exists=True, dir_okay=False, readable=True,
                             help="File of the dataset's format (default: in $CASERVE_DATA_DIR, else ../shared/datasets/).")
_NUM = typer.Option(50, "--num-requests", "-n", help="Requests to send.")
_ARRIVALS = typer.Option("poisson", help="poisson | gamma | azure (trace replay)")
_RATE = typer.Option(2.0, help="Mean request rate (req/s; inf: all at once). Ignored for azure.")
_CV = typer.Option(1.0, help="Gamma inter-arrival coefficient of variation (burstiness; 1 = Poisson).")
_TRACE = typer.Option(None, exists=True, dir_okay=False, readable=True,
                      help="Azure trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens).")
_TSCALE = typer.Option(1.0, help="Multiply trace offsets by this (0.1 = 10x faster).")
_OUTLEN = typer.Option(None, help="max_tokens per request (default: dataset's / trace's).")
_MAXWORDS = typer.Option(None, help="Truncate prompts to this many words.")
_SEED = typer.Option(0, help="Seed of workload sampling and arrivals.")
_GOODPUT = typer.Option([], help="SLO for goodput, repeatable: ttft:MS, tpot:MS, e2el:MS.")


@bench_app.command("serve")
def bench_serve_cmd(
    url: str = typer.Option("http://127.0.0.1:8000", help="Base URL of any OpenAI-compatible server."),
    model: Optional[str] = typer.Option(None, help="Model name to send (default: the server's first)."),
    endpoint: str = typer.Option("auto", help="completions | chat | embeddings | auto (by dataset)"),
    dataset: str = _DATASET, dataset_path: Optional[Path] = _DATASET_PATH, num_requests: int = _NUM,
    arrivals: str = _ARRIVALS, rate: float = _RATE, cv: float = _CV, trace: Optional[Path] = _TRACE,
    time_scale: float = _TSCALE, output_len: Optional[int] = _OUTLEN, max_prompt_words: Optional[int] = _MAXWORDS,
    seed: int = _SEED,
    goodput: list[str] = _GOODPUT,
    percentiles: str = typer.Option("50,90,99", help="Percentiles to report."),
    max_concurrency: Optional[int] = typer.Option(None, help="Cap on requests in flight."),
    out: Path = typer.Option(Path("results/bench.json"), help="JSON result file."),
    label: str = typer.Option("", help="Label stored in the result."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Open-loop load against a server; vLLM-style metrics plus caserve queue delay / JCT."""
    setup_logging(verbose)
    from caserve.bench.metrics import parse_slos
    from caserve.bench.run import bench_serve, first_error, format_summary, save_result

    wl = _workload(dataset, dataset_path, num_requests, arrivals, rate, cv, trace, time_scale, output_len, max_prompt_words, seed)
    doc = bench_serve(url, wl, model=model, endpoint=endpoint, slos=parse_slos(goodput), percentiles=_csv_floats(percentiles),
                      label=label, max_concurrency=max_concurrency, progress=progress)
    save_result(doc, out)
    typer.echo(format_summary(doc))
    if doc["metrics"]["completed"] == 0:  # nothing was measured: a script must not take this for a result
        typer.echo(f"error: every request failed; the first: {first_error(doc)}", err=True)
        raise typer.Exit(1)


def _server_cmd(server: str, server_cmd: Optional[str]) -> str:
    from caserve.bench.compare import SERVER_CMDS

    if server_cmd:
        return server_cmd
    if server not in SERVER_CMDS:
        raise typer.BadParameter(f"--server must be one of {', '.join(SERVER_CMDS)}")
    return SERVER_CMDS[server]


@bench_app.command("compare")
def bench_compare_cmd(
    model: str = typer.Option("caserve/tiny-gpt2", help="Model every configuration serves."),
    native: int = typer.Option(1, help="GPU-native workers in every configuration."),
    assisted: str = typer.Option("1,2", help="Comma-separated K: assisted workers added to native."),
    server: str = typer.Option("caserve", help="caserve (caserve serve) | ref (FIFO reference server)."),
    server_cmd: Optional[str] = typer.Option(None, help="Custom command template ({python} {model} {port} {native} {assisted})."),
    endpoint: str = typer.Option("auto", help="completions | chat | embeddings | auto"),
    dataset: str = _DATASET, dataset_path: Optional[Path] = _DATASET_PATH, num_requests: int = _NUM,
    arrivals: str = _ARRIVALS, rate: float = _RATE, cv: float = _CV, trace: Optional[Path] = _TRACE,
    time_scale: float = _TSCALE, output_len: Optional[int] = _OUTLEN, max_prompt_words: Optional[int] = _MAXWORDS,
    seed: int = _SEED,
    goodput: list[str] = _GOODPUT,
    warmup: int = typer.Option(2, help="Unmeasured warm-up requests per configuration."),
    server_args: str = typer.Option("", help="Extra arguments for every server, e.g. '--max-batch 1 --policy ect'."),
    shrink: bool = typer.Option(False, help="Zoo models: the shrunk architecture (random weights)."),
    load: Optional[float] = typer.Option(None, help="Set the rate to LOAD x native-only capacity (calibrated)."),
    out_dir: Path = typer.Option(Path("results/compare"), help="Directory for compare.json, .md and plots."),
    progress: bool = typer.Option(True),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Same arrivals against native-only and native + K assisted workers: table, JSON, plots."""
    setup_logging(verbose)
    from caserve.bench.compare import compare, markdown_table
    from caserve.bench.metrics import parse_slos

    wl = _workload(dataset, dataset_path, num_requests, arrivals, rate, cv, trace, time_scale, output_len, max_prompt_words, seed)
    res = compare(model, wl, native=native, assisted=_csv_ints(assisted), server_cmd=_server_cmd(server, server_cmd),
                  out_dir=out_dir, endpoint=endpoint, slos=parse_slos(goodput), warmup=warmup, progress=progress,
                  server_args=server_args, shrink=shrink, load=load)
    typer.echo(markdown_table(res["rows"]))
    typer.echo(f"wrote {out_dir}/compare.json, compare.md, jct_cdf.png, queue_delay.png")


@bench_app.command("batching")
def bench_batching_cmd(
    model: str = typer.Option("caserve/tiny-gpt2", help="Model both configurations serve."),
    sharegpt: Path = typer.Option(..., exists=True, dir_okay=False, readable=True, help="ShareGPT JSON file (prompts: first human turns)."),
    trace: Path = typer.Option(..., exists=True, dir_okay=False, readable=True, help="Azure LLM trace CSV (output lengths: GeneratedTokens)."),
    num_requests: int = typer.Option(60, "--num-requests", "-n", min=1, help="Requests per run."),
    loads: str = typer.Option("0.5,0.9,1.5", help="Comma-separated Poisson loads, x the static capacity."),
    max_batch: int = typer.Option(8, min=1, help="Slots of the one worker."),
    max_output: int = typer.Option(256, min=1, help="Cap on a request's output tokens."),
    max_prompt_words: int = typer.Option(96, min=1, help="Prompts are cut to this many words."),
    max_len: int = typer.Option(2048, min=2, help="The worker's --max-len (outputs are cut to fit it and the "
                                "model's context after their prompt)."),
    shrink: bool = typer.Option(False, help="Zoo models: the shrunk architecture (random weights)."),
    worker_threads: int = typer.Option(1, min=1, help="The worker's --worker-threads (torch intra-op threads), "
                                       "the same in both modes."),
    seed: int = typer.Option(0),
    saturation_rounds: int = typer.Option(3, min=1, help="Saturation bursts per mode, alternating; the ratio "
                                          "is the median of the rounds' own ratios."),
    load_rounds: int = typer.Option(1, min=1, help="Runs per mode at each load, alternating, each with its own "
                                    "seeded arrivals; the p99 JCT reduction is the median of the rounds' own."),
    engine_rounds: int = typer.Option(0, min=0, help="Then the burst inside the engine in this process, static "
                                      "and continuous interleaved step by step, in this many rounds (0: not run)."),
    out_dir: Path = typer.Option(Path("results/batching"), help="Directory for batching.json and .md."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Static against continuous batching on the same arrivals: saturation throughput, then Poisson loads."""
    setup_logging(verbose)
    from caserve.bench.batching import BatchingSpec, markdown, run_batching

    spec = BatchingSpec(model=model, sharegpt=sharegpt, trace=trace, num_requests=num_requests,
                        loads=tuple(_csv_floats(loads)), max_batch=max_batch, max_output=max_output,
                        max_prompt_words=max_prompt_words, max_len=max_len, shrink=shrink, seed=seed,
                        worker_threads=worker_threads, saturation_rounds=saturation_rounds, load_rounds=load_rounds,
                        engine_rounds=engine_rounds)
    typer.echo(markdown(run_batching(spec, out_dir)))


@bench_app.command("matrix")
def bench_matrix_cmd(
    models: str = typer.Option("", help="Comma-separated models (default: the 10 LMs of the zoo)."),
    datasets: str = typer.Option("sharegpt,wikitext2,sst2,agnews", help="Comma-separated datasets."),
    num_requests: int = typer.Option(8, "--num-requests", "-n", help="Requests per cell."),
    output_len: int = typer.Option(16, help="max_tokens for generation datasets."),
    load: float = typer.Option(1.0, help="Arrival rate as a multiple of native-only capacity."),
    native: int = typer.Option(1), assisted: int = typer.Option(1),
    server: str = typer.Option("caserve", help="caserve | ref"),
    server_cmd: Optional[str] = typer.Option(None, help="Custom server command template."),
    server_args: str = typer.Option("", help="Extra arguments for every server."),
    shrink: bool = typer.Option(True, help="Shrunk zoo models (small CPU version); --no-shrink: full size."),
    seed: int = _SEED,
    out_dir: Path = typer.Option(Path("results/matrix")),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Models x datasets, native-only vs native + assisted: markdown + JSON summary and heatmaps."""
    setup_logging(verbose)
    from caserve.bench.matrix import MatrixSpec, markdown, run_matrix

    spec = MatrixSpec(models=[m for m in models.split(",") if m], datasets=[d for d in datasets.split(",") if d],
                      num_requests=num_requests, output_len=output_len, load=load, native=native, assisted=assisted,
                      server_cmd=_server_cmd(server, server_cmd), server_args=server_args, shrink=shrink, seed=seed)
    res = run_matrix(spec, out_dir)
    typer.echo(markdown(res))


def sim_cmd(
    bench_json: list[Path] = typer.Option(..., "--bench-json", exists=True, dir_okay=False, readable=True, help="Bench/compare result JSON(s) giving service times."),
    gpus: int = typer.Option(100, help="GPUs (each with --native-per-gpu native workers)."),
    cpu_nodes: str = typer.Option("0,10,100,300,1000", help="Comma-separated CPU-node counts to sweep."),
    tenants_per_gpu: int = typer.Option(8, help="Max assisted workers sharing one GPU."),
    tenant_slowdown: float = typer.Option(0.0, help="Assisted service x (1 + s*(tenants-1))."),
    assisted_factor: float = typer.Option(1.0, help="If no assisted run was measured: assisted = factor x native."),
    cv: float = typer.Option(1.0, help="Burstiness: coefficient of variation of inter-arrival gaps (1 = Poisson)."),
    trace: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, readable=True,
                                         help="Replay an Azure trace's arrivals instead (overrides load/rate/cv)."),
    time_scale: float = typer.Option(1.0, help="Multiply trace offsets by this (0.01 = 100x denser)."),
    policy: str = typer.Option("fifo", help="fifo | ect"),
    load: float = typer.Option(0.95, help="Poisson rate as a multiple of native-only capacity."),
    rate: Optional[float] = typer.Option(None, help="Absolute rate (req/s), overrides --load."),
    num_requests: int = typer.Option(20000, help="Simulated requests."),
    validate: bool = typer.Option(False, help="Also replay each input run and compare mean JCT."),
    seed: int = _SEED,
    out_dir: Path = typer.Option(Path("results/sim")),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Project queue delay and JCT to large clusters from measured service times."""
    setup_logging(verbose)
    from caserve.bench.simrun import run_sim

    typer.echo(run_sim(bench_json, gpus=gpus, cpu_nodes=_csv_ints(cpu_nodes), tenants_per_gpu=tenants_per_gpu,
                       tenant_slowdown=tenant_slowdown, policy=policy, load=load, rate=rate,
                       num_requests=num_requests, validate=validate, seed=seed, out_dir=out_dir,
                       assisted_factor=assisted_factor, cv=cv, trace=trace, time_scale=time_scale))


def _delays(text: str) -> Optional[list[Optional[float]]]:
    """``direct,0,25`` -> [None, 0.0, 25.0]; empty -> None (no relay)."""
    out: list[Optional[float]] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            value = None if item == "direct" else float(item)
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not a delay in us or 'direct'", param_hint="--delays") from None
        if value is not None and not 0 <= value <= 100_000:
            raise typer.BadParameter(f"delay {value} us is outside 0..100000", param_hint="--delays")
        out.append(value)
    return out or None


@bench_app.command("remote-overhead")
def bench_remote_overhead(
    models: str = typer.Option("tiny-gpt2,gpt2-124m", help="Comma-separated: tiny-gpt2, gpt2-124m."),
    modes: str = typer.Option("eager,graph,engine", help="Comma-separated: eager (generate, dynamic KV cache), "
                              "graph (generate in graph mode), engine (caserve's serving engine, as workers run it)."),
    server: Optional[str] = typer.Option(None, help="host:port of a running GPU server (default: start one here)."),
    device: str = typer.Option("auto", help="Device of the GPU server this command starts."),
    native_device: str = typer.Option("cpu", help="Device of the native baseline (cuda on a GPU node)."),
    transport: str = typer.Option("auto", help="auto (Unix socket on one host), tcp or unix."),
    new_tokens: int = typer.Option(32, help="Tokens generated per run."),
    runs: int = typer.Option(3, help="Runs per configuration; medians are reported."),
    threads: int = typer.Option(1, help="torch CPU threads, for this process and the server it starts."),
    out: Path = typer.Option(Path("results/remote_overhead.json"), help="JSON result file."),
    delays: str = typer.Option("", help="Network sensitivity: comma-separated one-way delays (us) of a TCP relay "
                               "between client and server, e.g. direct,0,25,50,100 (direct: no relay)."),
) -> None:
    """Native vs remote ms/token, ops, frames and bytes per token, round trips, server CPU per token."""
    setup_logging(False)
    from caserve.bench import remote_overhead as ro

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ro.MODELS]
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {unknown}; choose from {sorted(ro.MODELS)}")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if not mode_list or any(m not in ro.MODES for m in mode_list):
        raise typer.BadParameter(f"modes must be among {sorted(ro.MODES)}")
    results = ro.run(names, mode_list, server=server, device=device, transport=transport, native_device=native_device,
                     new_tokens=new_tokens, runs=runs, threads=threads, out=out, delays_us=_delays(delays))
    ro.print_table(results)
    typer.echo(f"wrote {out}")


@bench_app.command("server-scaling")
def bench_server_scaling(
    model: str = typer.Option("tiny-gpt2", help="Bench model: tiny-gpt2, gpt2-124m, qwen2.5-0.5b (random weights)."),
    tenants: str = typer.Option("1,2,4,8,16,32", help="Comma-separated tenant counts (one process each)."),
    device: str = typer.Option("auto", help="Device of the GPU server this command starts."),
    server_threads: int = typer.Option(0, min=0, help="GPU server's torch threads (0: its default)."),
    new_tokens: int = typer.Option(32, min=1, help="Tokens per decode."),
    runs: int = typer.Option(2, min=1, help="Decodes per tenant per round."),
    transport: str = typer.Option("auto", help="auto (Unix socket on one host), tcp or unix."),
    delay_us: Optional[float] = typer.Option(None, min=0, help="Put a TCP relay adding this one-way delay (us) "
                                             "between the tenants and the server."),
    out: Path = typer.Option(Path("results/server_scaling.json"), help="JSON result file."),
) -> None:
    """N tenants decoding with the serving engine against one GPU server: tokens/s, server CPU per step."""
    setup_logging(False)
    from caserve.bench import remote_overhead as ro
    from caserve.bench import server_scaling as ss

    if model not in ro.MODELS:
        raise typer.BadParameter(f"choose from {sorted(ro.MODELS)}", param_hint="--model")
    if delay_us is not None and transport == "unix":
        raise typer.BadParameter("a relay delay needs the TCP transport", param_hint="--transport")
    counts = _csv_ints(tenants)
    if not counts or min(counts) < 1:
        raise typer.BadParameter("tenant counts must be integers >= 1", param_hint="--tenants")
    doc = ss.run(model=model, tenants=counts, device=device, server_threads=server_threads,
                 new_tokens=new_tokens, runs=runs, transport=transport, delay_us=delay_us, out=out)
    typer.echo(ss.markdown(doc))
    for err in doc["errors"]:
        typer.echo(f"error: {err}", err=True)
    typer.echo(f"wrote {out}")


@bench_app.command("gpu-suite")
def bench_gpu_suite(
    out: Path = typer.Option(..., help="Folder for the suite's files (at most 7)."),
    device: str = typer.Option("cuda", help="cuda (the GPU run) or cpu (a dry run of the whole pipeline)."),
    quick: bool = typer.Option(False, help="Small models and counts: the CPU dry run (about two minutes)."),
    time_limit: Optional[float] = typer.Option(None, min=30, help="Seconds for the whole suite (default: 470, "
                                               "quick 1200); each step also has its own budget."),
) -> None:
    """Every GPU figure in one command: environment, CUDA tests, remote overhead, server scaling, one box."""
    setup_logging(False)
    import torch

    from caserve.bench import gpu_suite

    if device not in ("cuda", "cpu"):
        raise typer.BadParameter("cuda or cpu", param_hint="--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here; use --device cpu --quick for the dry run", param_hint="--device")
    doc = gpu_suite.run(out, device=device, quick=quick, time_limit_s=time_limit)
    typer.echo((out / "summary.md").read_text())
    bad = [n for n, r in doc["steps"].items() if r["status"] != "ok"]
    if bad:
        typer.echo(f"steps not ok: {', '.join(bad)}", err=True)
        raise typer.Exit(1)
