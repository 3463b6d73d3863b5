"""CPU-assisted workers with the remote GPU runtime: the default ``caserve serve`` layout (router, GPU
server, 1 native + 2 assisted workers), and a GPU server killed and restarted under load: assisted
workers reconnect with backoff, reload, register again, and no request is lost."""

from __future__ import annotations

import concurrent.futures as cf
import os
import secrets
import signal
import time
from pathlib import Path

import httpx
import pytest

from serving_procs import TINY, Cluster, free_port, openai_client

LONG = 600  # tokens: long enough for the GPU server to die while every worker is busy


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """``caserve serve`` with its defaults except the ports, a GPU-server token (checked by the server,
    presented by the assisted workers) and one request per batch, so that concurrent requests spread
    over all three workers."""
    c = Cluster(tmp_path_factory.mktemp("assisted"))
    token = c.log_dir / "token"
    token.write_text(secrets.token_hex(16))
    try:
        c.start("serve", ["serve", "--port", str(c.port), "--gpu-port", str(free_port()), "--max-batch", "1",
                          "--worker-threads", "1", "--token-file", str(token)])
        c.wait_workers({"native-0", "assisted-0", "assisted-1"}, timeout=120)
        yield c
    finally:
        c.stop()


def complete(url: str, max_tokens: int, prompt: str = "assist") -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=180, json={
        "model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


def test_default_layout_serves_on_native_and_assisted_workers(served: Cluster) -> None:
    c = served
    kinds = {w["id"]: w["kind"] for w in c.workers()}
    assert kinds == {"native-0": "native", "assisted-0": "assisted", "assisted-1": "assisted"}
    with cf.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: complete(c.url, 40), range(3)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    by_kind = {r.json()["timings"]["worker_kind"] for r in responses}
    assert "assisted" in by_kind
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1  # same weights, same greedy text
    # Greedy, so the streamed text can be compared with a whole answer (a sampled one may end at once).
    kw = dict(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    chunks = list(openai_client(c.url).chat.completions.create(**kw, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    whole = openai_client(c.url).chat.completions.create(**kw)
    assert streamed == whole.choices[0].message.content
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)


def test_gpu_server_restart_assisted_workers_come_back_and_nothing_is_lost(served: Cluster) -> None:
    c = served
    serve_pid = next(p for p in c.procs if p.name == "serve").pid
    (gpu_pid,) = [p for p in children(serve_pid) if " gpu-server " in cmdline(p)]
    registered = {w["id"]: w["registered_at"] for w in c.workers()}
    assisted_pids = sorted(p for p in children(serve_pid) if "--kind assisted" in cmdline(p))
    assert len(assisted_pids) == 2
    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(complete, c.url, LONG, f"p{i}") for i in range(3)]
        c.wait_for("three requests running", lambda: sum(len(w["running"]) for w in c.workers()) == 3)
        os.kill(gpu_pid, signal.SIGKILL)  # as a crash would; `caserve serve` starts it again
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == LONG for r in responses)
    assert max(r.json()["timings"]["attempts"] for r in responses) >= 2  # the assisted ones were requeued

    def reregistered() -> bool:
        now = {w["id"]: w["registered_at"] for w in c.workers() if w["channel_open"]}
        return all(now.get(w, registered[w]) > registered[w] for w in ("assisted-0", "assisted-1"))

    c.wait_for("assisted workers registered again", reregistered, timeout=120)
    # the same processes reconnected and reloaded (a crash and restart by `serve` would not count)
    assert sorted(p for p in children(serve_pid) if "--kind assisted" in cmdline(p)) == assisted_pids
    assert c.workers() and {w["kind"] for w in c.workers()} == {"native", "assisted"}
    deadline = time.monotonic() + 60
    kinds: set[str] = set()
    while "assisted" not in kinds and time.monotonic() < deadline:
        with cf.ThreadPoolExecutor(3) as pool:
            kinds |= {r.json()["timings"]["worker_kind"] for r in pool.map(lambda _: complete(c.url, 20), range(3))}
    assert "assisted" in kinds  # they serve again, on the restarted GPU server


def test_idle_assisted_workers_notice_a_gpu_server_restart_by_themselves(served: Cluster) -> None:
    c = served
    serve_pid = next(p for p in c.procs if p.name == "serve").pid
    c.wait_for("idle workers", lambda: len(c.workers()) == 3 and not any(w["running"] for w in c.workers()))
    registered = {w["id"]: w["registered_at"] for w in c.workers()}
    (gpu_pid,) = [p for p in children(serve_pid) if " gpu-server " in cmdline(p)]
    os.kill(gpu_pid, signal.SIGKILL)  # no request in flight: only the workers' probes can notice

    def reregistered() -> bool:
        now = {w["id"]: w["registered_at"] for w in c.workers() if w["channel_open"]}
        return all(now.get(w, registered[w]) > registered[w] for w in ("assisted-0", "assisted-1"))

    c.wait_for("assisted workers registered again", reregistered, timeout=120)
    assert {w["id"]: w["registered_at"] for w in c.workers()}["native-0"] == registered["native-0"]


def test_serve_prints_how_to_call_it_and_stops_its_children(served: Cluster) -> None:
    c = served
    serve = next(p for p in c.procs if p.name == "serve")
    printed = serve.log.read_text(errors="replace")
    assert f"caserve is serving {TINY} at {c.url}" in printed and f"curl {c.url}/v1/completions" in printed
    kids = children(serve.pid)
    assert len(kids) == 4  # GPU server, 1 native and 2 assisted workers
    serve.stop()  # SIGTERM, as a service manager would
    assert serve.proc is not None and serve.proc.returncode == 0
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]
