"""Shared fixtures: GPU servers in subprocesses on loopback, tiny models."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving_procs import child_env, free_port, self_signed_cert

ROOT = Path(__file__).resolve().parents[1]
# Datasets named without a path (bench CLIs, load_workload) come from the excerpts kept with the tests,
# never from ../shared beside the checkout; subprocesses inherit this.
os.environ["CASERVE_DATA_DIR"] = str(ROOT / "tests" / "data")


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as paths."""
    crt, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    return str(crt), str(key)


class GPUServerProcess:
    """``caserve gpu-server`` in a subprocess; stopped by the fixture that made it."""

    def __init__(self, tmp: Path, token: str | None = None, limit: str = "0", unix: bool = True) -> None:
        self.port = free_port()
        self.token = token
        self.admin_token = secrets.token_hex(16)  # for tests that read server-wide Stats
        admin = tmp / f"admin-token-{self.port}"
        admin.write_text(self.admin_token)
        device = os.environ.get("CASERVE_TEST_GPU_DEVICE", "cpu")  # the gpu-suite runs these tests on cuda
        args = [sys.executable, "-m", "caserve.cli", "gpu-server", "--port", str(self.port), "--device", device,
                "--tenant-memory-limit", limit, "--admin-token-file", str(admin)]
        if token:
            tf = tmp / f"token-{self.port}"
            tf.write_text(token)
            args += ["--token-file", str(tf)]
        if not unix:
            args += ["--no-unix-socket"]
        self.log = open(tmp / f"gpu-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=child_env())
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"gpu-server did not start: {line!r} {self.log.read()[-2000:]}")
        self.address = f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def gpu_server(tmp_path_factory):
    """A token-protected GPU server shared by the tests of a session."""
    token = secrets.token_hex(16)
    server = GPUServerProcess(tmp_path_factory.mktemp("gpu"), token=token)
    yield server
    server.stop()


@pytest.fixture
def make_gpu_server(tmp_path):
    servers: list[GPUServerProcess] = []

    def make(**kwargs) -> GPUServerProcess:
        servers.append(GPUServerProcess(tmp_path, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
