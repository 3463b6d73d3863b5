"""Cluster mode end to end on a local Ray instance (no GPU): two fake GPUs and custom resources stand
in for GPU nodes and CPU-only nodes; the GPU servers fall back to the CPU.

One deployment serves the whole module (starting Ray and loading the workers is the slow part): the
fixture starts Ray and ``deploy.up``, and always takes both down again. The tests run in file order:
placement, the CLI's status, autoscaling up and down under a burst, a killed worker actor.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import ray

from caserve.cluster import deploy
from caserve.cluster.config import parse_config
from caserve.cluster.errors import NotRunning, StartupTimeout
from caserve.models import DEFAULT_MODEL
from serving_procs import free_port

REPO = Path(__file__).resolve().parents[1]
NAME = "ctest"


def free_port_pair() -> int:
    """A port p with p + 1 free too (GPU server i listens on base_port + i)."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return predicate()


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def complete(url: str, max_tokens: int, prompt: str = "Hello") -> dict[str, Any]:
    resp = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("cluster-logs")
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath, "CASERVE_CLUSTER_LOG_DIR": str(logs), "OMP_NUM_THREADS": "1"}
    cfg = parse_config({
        "name": NAME, "network": {"mode": "loopback"}, "gpu_servers": 2, "native_workers_per_gpu_server": 1,
        "router": {"port": free_port(), "max_batch": 1, "num_cpus": 0},
        "gpu_server": {"base_port": free_port_pair(), "device": "cpu", "num_cpus": 0},
        "resources": {"gpu_node": "fake_gpu_node", "cpu_node": "fake_cpu_node", "native_num_cpus": 1,
                      "gpu_node_labels": {"caserve-gpu": "yes"}, "cpu_node_labels": {"caserve-cpu": "yes"}},
        "assisted": {"min": 1, "max": 2, "target_queue_delay_s": 0.3, "scale_up_cooldown_s": 1.0,
                     "scale_down_after_s": 2.0, "cpus_per_worker": 1, "drain_timeout_s": 60},
        "control_interval_s": 0.5, "ready_timeout_s": 150, "worker_step_delay_s": 0.05,
    })
    # One host plays both roles: 2 "GPUs", the GPU-node resource and label; 2 CPU-node slots and its label.
    ray.init(num_cpus=8, num_gpus=2, resources={"fake_gpu_node": 2, "fake_cpu_node": 2},
             labels={"caserve-gpu": "yes", "caserve-cpu": "yes"}, include_dashboard=False,
             namespace="cluster-tests", runtime_env={"env_vars": env}, log_to_driver=False)  # caserve names its own
    try:
        status = deploy.up(cfg)
        yield cfg, status, logs
    except BaseException:
        for log in sorted(logs.rglob("*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text()[-3000:]}\n")
        raise
    finally:
        try:
            deploy.down(NAME)
        except NotRunning:
            pass
        finally:
            ray.shutdown()


def test_placement_gpu_servers_native_beside_them_assisted_on_cpu_nodes(cluster) -> None:
    cfg, status, _ = cluster
    servers = sorted(status["gpu_servers"], key=lambda g: g["index"])
    assert [g["state"] for g in servers] == ["running", "running"]
    assert sorted(g["gpu_ids"][0] for g in servers) == ["0", "1"]  # one Ray GPU each, distinct
    assert [g["device"] for g in servers] == ["cpu", "cpu"]  # no CUDA here: the CPU fallback
    native = {w["name"]: w for w in status["workers"]["native"]}
    assert sorted(native) == ["native-0-0", "native-1-0"] and all(w["registered"] for w in native.values())
    for g in servers:
        w = native[f"native-{g['index']}-0"]
        assert w["node_id"] == g["node_id"]  # node affinity to its GPU server
        with open(f"/proc/{w['child_pid']}/environ", "rb") as f:  # pinned to that server's GPU
            environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert environ[b"CUDA_VISIBLE_DEVICES"].decode() == g["gpu_ids"][0]
    assisted = status["workers"]["assisted"]
    assert [w["name"] for w in assisted] == ["assisted-0"] and assisted[0]["registered"]
    # Both servers were empty: the tie goes to server 0, whose tenant is now that worker.
    assert assisted[0]["gpu_server"] == servers[0]["address"] and servers[0]["assisted_workers"] == ["assisted-0"]
    assert servers[0]["tenants"] == 1 and servers[1]["tenants"] == 0 and servers[0]["stored_bytes"] > 0
    free = ray.available_resources()
    assert free.get("GPU", 0) == 0 and free.get("fake_cpu_node") == 1  # 1 of 2 CPU-node slots taken
    reply = complete(status["router"]["url"], max_tokens=3)
    assert reply["usage"]["completion_tokens"] == 3


def test_the_worker_token_reaches_router_and_workers_by_environment_only(cluster) -> None:
    """The router's worker routes refuse strangers; its children and the workers' children hold the token
    `cluster up` generated in their environment, never on their command line."""
    _, status, _ = cluster
    url = status["router"]["url"]
    assert httpx.post(f"{url}/internal/workers/register", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{url}/internal/workers/assisted-0/drain", timeout=10,
                      headers={"x-caserve-worker-token": "w" * 32}).status_code == 403
    pids = [status["router"]["child_pid"]] + [w["child_pid"] for kind in ("native", "assisted")
                                              for w in status["workers"][kind]]
    tokens = set()
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        token = environ[b"CASERVE_WORKER_TOKEN"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert token not in f.read()
        tokens.add(token)
    assert len(tokens) == 1 and len(tokens.pop()) >= 32  # one token, shared by all of them


def test_impossible_placement_is_a_typed_error_and_leaves_nothing_behind(cluster) -> None:
    cfg, _, _ = cluster
    greedy = cfg.model_copy(update={"name": "greedy", "gpu_servers": 1, "ready_timeout_s": 4.0})  # both GPUs taken
    free_before = ray.available_resources().get("CPU")
    with pytest.raises(StartupTimeout, match="gpu-0 was not placed"):
        deploy.up(greedy)
    with pytest.raises(NotRunning):
        deploy.status("greedy")
    assert wait_until(lambda: ray.available_resources().get("CPU") == free_before, timeout_s=20)
    assert deploy.status(NAME)["router"]["state"] == "running"  # the other cluster is untouched


def test_cli_status_from_another_driver(cluster) -> None:
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-m", "caserve.cli", "cluster", "status", "--address", address,
                          "--name", NAME, "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert len(report["gpu_servers"]) == 2 and report["queue"]["target_delay_s"] == 0.3
    assert {w["name"] for w in report["workers"]["native"]} == {"native-0-0", "native-1-0"}
    missing = subprocess.run([sys.executable, "-m", "caserve.cli", "cluster", "status", "--address", address,
                              "--name", "nosuch"], capture_output=True, text=True, timeout=120, env=env)
    assert missing.returncode == 1 and "no caserve cluster 'nosuch'" in missing.stderr


def test_autoscale_up_under_a_burst_then_drain_down_without_requeues(cluster) -> None:
    cfg, status, _ = cluster
    url = status["router"]["url"]
    done_before = metric(url, "caserve_requests_total", outcome="done")
    requeues_before = metric(url, "caserve_requeues_total")
    n = 16  # 16 x 60 steps x 0.05 s on 3 workers: a backlog that outlasts loading a new worker
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(complete, url, 60, f"burst {i}") for i in range(n)]

        def two_registered() -> Any:
            now = deploy.status(NAME)
            return now if len([w for w in now["workers"]["assisted"] if w["registered"]]) == 2 else None

        after_up = wait_until(two_registered, timeout_s=90)
        replies = [f.result(timeout=180) for f in futures]
    assert after_up, deploy.format_status(deploy.status(NAME))
    new = [w for w in after_up["workers"]["assisted"] if w["name"] != "assisted-0"]
    assert len(new) == 1
    # Server 0 already had assisted-0 as its tenant, server 1 none: the new worker goes to server 1.
    server1 = next(g for g in after_up["gpu_servers"] if g["index"] == 1)
    assert new[0]["gpu_server"] == server1["address"] and server1["tenants"] == 1
    assert any("up: queue delay" in e for e in after_up["events"])
    assert all(r["usage"]["completion_tokens"] == 60 for r in replies)
    assert metric(url, "caserve_requests_total", outcome="done") - done_before == n
    # The burst is over: after the quiet period one worker is drained and stopped, down to min.
    shrunk = wait_until(lambda: len(deploy.status(NAME)["workers"]["assisted"]) == 1, timeout_s=60)
    assert shrunk, deploy.format_status(deploy.status(NAME))
    final = deploy.status(NAME)
    assert any("drained and stopped" in e for e in final["events"])
    assert metric(url, "caserve_requeues_total") == requeues_before  # drained, not killed: nothing requeued
    assert wait_until(lambda: ray.available_resources().get("fake_cpu_node") == 1, timeout_s=20)


def test_controller_recreates_an_actor_killed_for_good(cluster) -> None:
    cfg, status, _ = cluster
    before = next(g for g in deploy.status(NAME)["gpu_servers"] if g["index"] == 1)
    ray.kill(ray.get_actor(f"{NAME}-gpu-1", namespace=deploy.NAMESPACE), no_restart=True)  # Ray will not restart it

    def recreated() -> Any:
        g = next(g for g in deploy.status(NAME)["gpu_servers"] if g["index"] == 1)
        return g if g["state"] == "running" and g["recreated"] == 1 else None

    after = wait_until(recreated, timeout_s=60)
    assert after, deploy.format_status(deploy.status(NAME))
    assert after["address"] == before["address"] and after["pid"] != before["pid"]  # same port, new process
    assert any("gpu-1 is dead; creating it again" in e for e in deploy.status(NAME)["events"])


def test_killed_worker_actor_is_restarted_and_its_request_answered_once(cluster) -> None:
    cfg, status, _ = cluster
    url = status["router"]["url"]
    done_before = metric(url, "caserve_requests_total", outcome="done")
    requeues_before = metric(url, "caserve_requeues_total")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(complete, url, 60, "kill me")

        def running_worker() -> Any:
            health = httpx.get(f"{url}/health", timeout=10).json()
            busy = [w for w in health["models"][DEFAULT_MODEL]["workers"] if w["running"]]
            return busy[0]["id"] if busy and health["models"][DEFAULT_MODEL].get("queue") == 0 else None

        victim = wait_until(running_worker, timeout_s=30, interval_s=0.1)
        assert victim, "the request was never dispatched"
        before = next(w for ws in deploy.status(NAME)["workers"].values() for w in ws if w["name"] == victim)
        time.sleep(0.5)  # some tokens are generated before the kill
        ray.kill(ray.get_actor(f"{NAME}-{victim}", namespace=deploy.NAMESPACE), no_restart=False)
        reply = future.result(timeout=120)
    assert reply["usage"]["completion_tokens"] == 60  # continued, not restarted nor duplicated
    assert reply["timings"]["attempts"] == 2
    assert metric(url, "caserve_requests_total", outcome="done") - done_before == 1  # answered exactly once
    assert metric(url, "caserve_requeues_total") - requeues_before == 1
    # Ray restarted the actor (same worker id) and its new process registered again; the old one is gone.
    def recovered() -> Any:
        w = next((w for ws in deploy.status(NAME)["workers"].values() for w in ws if w["name"] == victim), None)
        return w if w and w["registered"] and w["reconstructed"] and w["child_pid"] != before["child_pid"] else None

    again = wait_until(recovered, timeout_s=90)
    assert again, deploy.format_status(deploy.status(NAME))
    assert not Path(f"/proc/{before['child_pid']}").exists()
    assert complete(url, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_gpu_server_actor_killed_is_restarted_and_its_tenants_come_back(cluster) -> None:
    cfg, status, _ = cluster
    url = status["router"]["url"]
    # The server the remaining assisted worker uses (which one survived the scale-down may vary).
    before = wait_until(lambda: next((g for g in deploy.status(NAME)["gpu_servers"]
                                      if g["assisted_workers"] and g["tenants"] >= 1), None), timeout_s=60)
    assert before, deploy.format_status(deploy.status(NAME))
    index = before["index"]
    ray.kill(ray.get_actor(f"{NAME}-gpu-{index}", namespace=deploy.NAMESPACE), no_restart=False)

    def back() -> Any:
        now = deploy.status(NAME)
        g = next(g for g in now["gpu_servers"] if g["index"] == index)
        users = [w for w in now["workers"]["assisted"] if w["gpu_server"] == g["address"]]
        ok = (g["state"] == "running" and g["pid"] != before["pid"] and g["tenants"] == len(users) >= 1
              and all(w["registered"] for w in users))
        return now if ok else None

    # Ray restarts the actor on the same port; its assisted workers notice, reconnect, reload, register.
    assert wait_until(back, timeout_s=90), deploy.format_status(deploy.status(NAME))
    assert complete(url, max_tokens=4)["usage"]["completion_tokens"] == 4


def test_restarted_controller_adopts_the_running_deployment(cluster) -> None:
    cfg, status, _ = cluster
    url = status["router"]["url"]

    def processes(report: dict[str, Any]) -> dict[str, Any]:
        out = {"router": report["router"]["child_pid"]}
        out.update({g["name"]: g["pid"] for g in report["gpu_servers"]})
        out.update({w["name"]: w["child_pid"] for ws in report["workers"].values() for w in ws})
        return out

    before = wait_until(lambda: (lambda s: s if all(w["registered"] for ws in s["workers"].values() for w in ws)
                                 else None)(deploy.status(NAME)), timeout_s=60)
    assert before, deploy.format_status(deploy.status(NAME))
    ray.kill(ray.get_actor(deploy.controller_name(NAME), namespace=deploy.NAMESPACE), no_restart=False)

    def adopted() -> Any:
        try:
            now = deploy.status(NAME)
        except ray.exceptions.RayError:  # still restarting
            return None
        done = any("controller restarted: adopted 2 GPU server(s), a router" in e for e in now["events"])
        return now if done and all(w["registered"] for ws in now["workers"].values() for w in ws) else None

    after = wait_until(adopted, timeout_s=60)
    assert after, "the restarted controller did not adopt the deployment"
    assert processes(after) == processes(before)  # nothing was restarted: serving went on
    assert complete(url, max_tokens=3)["usage"]["completion_tokens"] == 3
