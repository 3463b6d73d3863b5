"""End-to-end: the CLI commands, with servers started and stopped as subprocesses."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bench_helpers import TEST_DATA
from caserve.cli import app

runner = CliRunner()

# FIFO reference server with a fixed 40 ms service time (sleeps: exact and CPU-free).
SLEEP_CMD = ("{python} -m caserve.bench.refserver --model {model} --port {port} --native-workers {native} "
             "--assisted-workers {assisted} --prefill-ms 40 --per-token-ms 0")


def test_compare_then_sim(tmp_path):
    out = tmp_path / "cmp"
    r = runner.invoke(app, ["bench", "compare", "--model", "sleep", "--server-cmd", SLEEP_CMD, "--assisted", "1,3",
                            "-n", "30", "--load", "1.6", "--output-len", "1", "--out-dir", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "compare.json").read_text())
    rows = doc["rows"]
    assert [row["workers"] for row in rows] == [{"native": 1, "assisted": 0}, {"native": 1, "assisted": 1},
                                                {"native": 1, "assisted": 3}]
    assert all(row["completed"] == 30 and row["jct_source"] == "server" for row in rows)
    # ~25 req/s of native capacity (40 ms per request), calibrated, times 1.6: the native-only queue grows;
    # assisted workers drain it
    assert doc["load"] == 1.6 and 25 < doc["workload"]["rate"] < 42
    assert rows[0]["mean_queue_delay_s"] > 0.1
    assert rows[1]["jct_reduction_pct"] > 30 and rows[2]["queue_delay_reduction_pct"] > 80
    for f in ("compare.md", "jct_cdf.png", "queue_delay.png"):
        assert (out / f).stat().st_size > 0
    # identical arrival sequences in every configuration
    scheds = [[q["scheduled"] for q in run["requests"]] for run in doc["runs"]]
    assert scheds[0] == scheds[1] == scheds[2]

    s = runner.invoke(app, ["sim", "--bench-json", str(out / "compare.json"), "--gpus", "10",
                            "--cpu-nodes", "0,10,40", "--num-requests", "5000", "--validate", "--out-dir", str(tmp_path / "sim")])
    assert s.exit_code == 0, s.output
    sim = json.loads((tmp_path / "sim" / "sim.json").read_text())
    jct = [row["mean_jct_s"] for row in sim["projection"]["rows"]]
    assert jct[0] > jct[1] >= jct[2] * 0.999
    assert len(sim["validation"]) == 3 and all(v["replay_relative_error"] < 0.15 for v in sim["validation"]), sim["validation"]
    assert (tmp_path / "sim" / "sim_jct.png").stat().st_size > 0

    trace = TEST_DATA / "azure_llm_trace_2023_conv.csv"
    t = runner.invoke(app, ["sim", "--bench-json", str(out / "compare.json"), "--gpus", "2", "--cpu-nodes", "0,4",
                            "--num-requests", "150", "--trace", str(trace), "--time-scale", "0.01",
                            "--out-dir", str(tmp_path / "simtrace")])
    assert t.exit_code == 0, t.output
    proj = json.loads((tmp_path / "simtrace" / "sim.json").read_text())["projection"]
    assert proj["rows"][0]["requests"] == 150 and proj["rows"][1]["mean_jct_s"] < proj["rows"][0]["mean_jct_s"]


def test_bench_serve_cli_against_reference_server(tmp_path):
    from caserve.bench.compare import REF_CMD, Config, launched_server

    with launched_server(REF_CMD, model="sleep", cfg=Config(1, 0)) as url:
        r = runner.invoke(app, ["bench", "serve", "--url", url, "--dataset", "sharegpt", "-n", "6", "--rate", "inf",
                                "--output-len", "3", "--goodput", "ttft:60000", "--out", str(tmp_path / "b.json"),
                                "--no-progress", "--arrivals", "gamma", "--cv", "2"])
    assert r.exit_code == 0, r.output
    assert "TTFT" in r.output and "JCT" in r.output
    m = json.loads((tmp_path / "b.json").read_text())["metrics"]
    assert m["completed"] == 6 and m["total_output_tokens"] == 18 and m["request_goodput"] > 0


def test_matrix_small(tmp_path):
    out = tmp_path / "mx"
    r = runner.invoke(app, ["bench", "matrix", "--server", "ref", "--models", "gpt2,bert-base-uncased",
                            "--datasets", "wikitext2,sst2", "-n", "3", "--output-len", "4", "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "matrix_summary.json").read_text())
    assert {(s["model"], s["dataset"]) for s in summary} == {(m, d) for m in ("gpt2", "bert-base-uncased")
                                                               for d in ("wikitext2", "sst2")}
    assert all(not s["errors"] and s["random_weights"] is True for s in summary)
    assert {s["endpoint"] for s in summary if s["model"] == "bert-base-uncased"} == {"embeddings"}
    md = (out / "matrix.md").read_text()
    assert "| gpt2 | wikitext2 | random |" in md
    assert (out / "matrix_jct_reduction.png").stat().st_size > 0


def test_bench_serve_against_caserve_serve(tmp_path):
    """The load generator parses caserve serve's own stream format and per-request timings."""
    from caserve.bench.compare import SERVE_CMD, Config, launched_server

    with launched_server(SERVE_CMD, model="caserve/tiny-gpt2", cfg=Config(1, 0), extra="--max-batch 1",
                         startup_timeout_s=120) as url:
        r = runner.invoke(app, ["bench", "serve", "--url", url, "-n", "4", "--rate", "inf", "--output-len", "6",
                                "--out", str(tmp_path / "c.json"), "--no-progress"])
        e = runner.invoke(app, ["bench", "serve", "--url", url, "-n", "2", "--rate", "inf", "--dataset", "sst2",
                                "--endpoint", "embeddings", "--out", str(tmp_path / "e.json"), "--no-progress"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "c.json").read_text())
    m = doc["metrics"]
    from caserve.bench.run import WorkloadSpec

    asked = [q.output_len for q in WorkloadSpec(**doc["meta"]["workload"]).build()[0]]
    assert m["completed"] == 4 and m["server_timings"] == 4
    assert m["total_output_tokens"] == sum(asked)  # usage.completion_tokens, with ignore_eos
    assert set(m["service_ms_by_kind"]) == {"native"} and m["jct_ms"]["mean"] >= m["queue_delay_ms"]["mean"]
    assert all(q["itl"] and q["ttft"] > 0 for q in doc["requests"]) and doc["meta"]["model"] == "caserve/tiny-gpt2"
    # embeddings from a causal LM: caserve serve refuses with 400; the generator records the failures,
    # and a run in which nothing succeeded exits with 1
    edoc = json.loads((tmp_path / "e.json").read_text())
    assert e.exit_code == 1 and "every request failed" in e.output and edoc["metrics"]["failed"] == 2
    assert all("HTTP 400" in q["error"] for q in edoc["requests"])


def test_bench_serve_fails_when_no_request_succeeds(tmp_path):
    """Nothing listens on the port: every request fails. The result file is still written, the summary
    says there are no samples (zeros would read as a very fast server) and the exit code is 1."""
    from serving_procs import free_port

    out = tmp_path / "dead.json"
    r = runner.invoke(app, ["bench", "serve", "--url", f"http://127.0.0.1:{free_port()}", "-n", "3", "--rate", "inf",
                            "--output-len", "2", "--out", str(out), "--no-progress"])
    assert r.exit_code == 1, r.output
    assert "every request failed" in r.output and "ClientConnectorError" in r.output  # the client's error, named
    assert "TTFT (ms): no samples" in r.output and "mean 0.0" not in r.output
    doc = json.loads(out.read_text())
    assert doc["metrics"]["completed"] == 0 and doc["metrics"]["failed"] == 3


def test_bench_input_files_that_do_not_exist_are_usage_errors(tmp_path):
    missing = str(tmp_path / "missing.json")
    trace = str(TEST_DATA / "azure_llm_trace_2023_conv.csv")
    for args in (["bench", "batching", "--sharegpt", missing, "--trace", trace],
                 ["bench", "batching", "--sharegpt", str(TEST_DATA / "sharegpt_v3_first_turn_500.json"), "--trace",
                  missing],
                 ["bench", "serve", "--url", "http://127.0.0.1:9", "--dataset-path", missing],
                 ["sim", "--bench-json", missing]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "does not exist" in r.output, (args, r.output)


def test_bench_batching_passes_the_worker_threads_to_both_modes(monkeypatch):
    """``--worker-threads`` reaches the spec that both servers are started from (and ``--engine-rounds``
    the spec of the interleaved engine runs); 0 threads and -1 engine rounds are usage errors."""
    import caserve.bench.batching as batching

    seen = []

    def fake_run(spec, out_dir=None, progress=False):
        seen.append(spec)
        raise SystemExit(0)

    monkeypatch.setattr(batching, "run_batching", fake_run)
    files = ["--sharegpt", str(TEST_DATA / "sharegpt_v3_first_turn_500.json"),
             "--trace", str(TEST_DATA / "azure_llm_trace_2023_conv.csv")]
    r = runner.invoke(app, ["bench", "batching", *files])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bench", "batching", *files, "--worker-threads", "2"])
    assert r.exit_code == 0, r.output
    assert [s.worker_threads for s in seen] == [1, 2]
    r = runner.invoke(app, ["bench", "batching", *files, "--worker-threads", "0"])
    assert r.exit_code == 2 and len(seen) == 2
    r = runner.invoke(app, ["bench", "batching", *files, "--engine-rounds", "3"])
    assert r.exit_code == 0, r.output
    assert [s.engine_rounds for s in seen] == [0, 0, 3]
    r = runner.invoke(app, ["bench", "batching", *files, "--engine-rounds", "-1"])
    assert r.exit_code == 2 and len(seen) == 3
