"""The gpu-suite's CPU dry run (``--device cpu --quick``) end to end, and the pieces it is made of: the
delay relay, server-scaling's saturation rule, the GPU server's thread default, the CLI's refusals."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caserve.bench.relay import RelayProcess, echo_server, measure_rtt
from caserve.bench.server_scaling import Round, saturation
from caserve.cli import app, server_threads

REPO = Path(__file__).resolve().parents[1]
SUITE_FILES = {"suite.json", "summary.md", "cuda_tests.log", "remote_overhead.png", "server_scaling.png",
               "onebox_jct_cdf.png", "onebox_queue_delay.png"}


def test_relay_adds_its_delay_and_keeps_order():
    sock, echo = echo_server()
    try:
        direct = measure_rtt(echo, n=50)
        with RelayProcess(echo, 2000) as relayed:  # 2 ms each way: far above the machine's noise
            rtt = measure_rtt(relayed, n=10)
            assert rtt >= 4000 and rtt > direct + 3500
            # 1 MiB of random bytes, sent in uneven pieces while the reply streams back: same bytes, same order.
            payload = random.Random(0).randbytes(1 << 20)
            host, port = relayed.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as s:
                got = bytearray()

                def read() -> None:
                    while len(got) < len(payload) and (chunk := s.recv(1 << 16)):
                        got.extend(chunk)

                reader = threading.Thread(target=read)
                reader.start()
                i = 0
                while i < len(payload):
                    step = random.Random(i).randint(1, 50_000)
                    s.sendall(payload[i:i + step])
                    i += step
                reader.join(30)
            assert bytes(got) == payload
    finally:
        sock.close()


def test_relay_refuses_a_negative_delay():
    out = subprocess.run([sys.executable, "-m", "caserve.bench.relay", "--target", "127.0.0.1:1", "--delay-us", "-5"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 2 and "--delay-us" in out.stderr


def _round(n: int, rate: float) -> Round:
    return Round(n, 100, 1.0, rate, 0.001, 1.0, 0.5, 1.0, 0.2)


def test_saturation_is_the_first_count_near_the_best_rate():
    assert saturation([]) is None
    assert saturation([_round(1, 100), _round(2, 190), _round(4, 300), _round(8, 310), _round(16, 305)]) == 4
    assert saturation([_round(1, 100), _round(2, 95)]) == 1  # a second tenant only shares the rate out


def test_gpu_server_threads_default_to_one_on_a_cpu_device():
    assert server_threads("cpu", 0, cuda=True) == 1
    assert server_threads("auto", 0, cuda=False) == 1
    assert server_threads("auto", 0, cuda=True) == 0 and server_threads("cuda:0", 0, cuda=True) == 0
    assert server_threads("cpu", 3, cuda=False) == 3  # an explicit count is honoured


@pytest.mark.parametrize("args, message", [
    (["bench", "server-scaling", "--tenants", "0,2"], "tenant counts"),
    (["bench", "server-scaling", "--model", "nope"], "choose from"),
    (["bench", "server-scaling", "--delay-us", "25", "--transport", "unix"], "TCP"),
    (["bench", "remote-overhead", "--delays", "fast"], "not a delay"),
    (["bench", "remote-overhead", "--delays", "-3"], "outside"),
    (["bench", "gpu-suite", "--out", "x", "--device", "tpu"], "cuda or cpu"),
])
def test_cli_refuses_bad_parameters(args, message):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and message in res.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_suite_on_cuda_needs_cuda(tmp_path):
    res = CliRunner().invoke(app, ["bench", "gpu-suite", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--device cpu --quick" in res.output


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "caserve.cli", "bench", "gpu-suite", "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=1400, cwd=REPO)
    return out, proc


@pytest.mark.timeout(1500)
def test_quick_suite_writes_a_complete_report(quick_suite):
    out, proc = quick_suite
    files = {p.name for p in out.iterdir()}
    assert files <= SUITE_FILES and len(files) <= 7, files  # the device tool returns at most 8 files
    doc = json.loads((out / "suite.json").read_text())
    assert doc["schema"] == "caserve-gpu-suite/1" and doc["complete"] and doc["device"] == "cpu"
    steps = doc["steps"]
    assert set(steps) >= {"environment", "cuda_tests", "remote_overhead:tiny-gpt2", "server_scaling", "onebox"}
    for name in ("environment", "remote_overhead:tiny-gpt2", "server_scaling", "onebox"):
        assert steps[name]["status"] == "ok", (name, steps[name], proc.stderr[-3000:])
    cuda_file = (REPO / "tests/test_gpu_cuda.py").is_file()
    assert steps["cuda_tests"]["status"] == ("ok" if cuda_file else "skipped")
    assert proc.returncode == (0 if cuda_file else 1)  # a step that is not ok makes the command fail
    assert files == SUITE_FILES
    for png in SUITE_FILES - {"suite.json", "summary.md", "cuda_tests.log"}:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import torch

    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["cores"] == os.cpu_count() and env["cuda_available"] is False
    assert env["commit"] and len(env["commit"].split()[0]) == 40

    ro = {r["mode"]: r for r in doc["remote_overhead"]}
    assert set(ro) == {"eager", "graph", "engine"}
    for r in ro.values():
        assert r["native_ms_per_token"] > 0 and r["remote_ms_per_token"] > 0 and r["server_cpu_s_per_token"] > 0
        assert r["syncs_per_token"] > 0 and r["new_tokens"] == 8
    assert ro["engine"]["records_per_token"] < ro["eager"]["records_per_token"] / 4

    ss = doc["server_scaling"]
    assert [r["tenants"] for r in ss["rounds"]] == [1, 2] and ss["saturates_at"] in (1, 2)
    for r in ss["rounds"]:
        assert r["tokens"] == r["tenants"] * 2 * 8  # 2 runs of 8 tokens per tenant
        assert r["server_cpu_s_per_step"] > 0 and r["tokens_per_s"] > 0 and r["round_trips_per_token"] >= 1

    ob = doc["onebox"]
    assert [r["assisted"] for r in ob["rows"]] == [0, 1] and ob["shared_cores"] == (os.cpu_count() < 5)
    assert ob["rate_rps"] == pytest.approx(1.5 * ob["native_capacity_rps"])
    for row, run in zip(ob["rows"], ob["runs"]):
        assert row["completed"] + row["failed"] == 12 and row["completed"] >= 10
        assert 0 <= row["mean_queue_delay_s"] <= row["p99_queue_delay_s"] <= row["p99_jct_s"]
        assert run["meta"]["workers"] == {"native": 1, "assisted": row["assisted"]}
        assert run["meta"]["rate"] == ob["rate_rps"]  # the same arrivals for every K
        assert "requests" not in run  # suite.json stays lean

    md = (out / "summary.md").read_text()
    for text in ("| server_scaling | ok |", "| K assisted |", "saturates at",
                 "| caserve/tiny-gpt2 (random weights) | engine |"):
        assert text in md, text
