"""Real processes on loopback for the serving tests: routers, workers, GPU servers.

Every process is started by a fixture (or a test) and stopped by it, also on failure. Commands are
``python -m caserve.cli ...`` with the repository root on PYTHONPATH; logs go to files under the
test's temporary directory and their tail is shown when a wait times out.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from caserve.serving.messages import WORKER_TOKEN_HEADER

REPO = Path(__file__).resolve().parents[1]
TINY = "caserve/tiny-gpt2"


def self_signed_cert(directory: Path, name: str = "cert", cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) and its key, ``directory/name.pem`` and ``name-key.pem``;
    for ``cn`` 127.0.0.1 it also names that address, so clients that check the host accept it."""
    crt, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    san = ["-addext", f"subjectAltName=IP:{cn}"] if cn == "127.0.0.1" else []
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={cn}",
                    *san, "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """One ``caserve`` process with its log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name, self.args = name, args
        self.log = log_dir / f"{name}.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "Proc":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "caserve.cli", *self.args], cwd=REPO, env=child_env(),
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Cluster:
    """A router (``caserve serve``) plus workers; ``stop()`` ends all of them. Routers and workers
    started by :meth:`router` and :meth:`worker` share one worker token, kept in a 0600 file."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_token = secrets.token_urlsafe(24)
        self.token_file = log_dir / "worker-token"
        self.token_file.touch(mode=0o600)
        self.token_file.write_text(self.worker_token)
        self.admin = {WORKER_TOKEN_HEADER: self.worker_token}  # headers: worker routes, /health details

    def start(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, args, self.log_dir).start()
        self.procs.append(proc)
        return proc

    def router(self, *extra: str, name: str = "router") -> Proc:
        """Only the router: ``caserve serve`` with no workers of its own unless ``extra`` asks."""
        return self.start(name, ["serve", "--port", str(self.port), "--native-workers", "0",
                                 "--assisted-workers", "0", "--cpu-workers", "0",
                                 "--worker-token-file", str(self.token_file), *extra])

    def worker(self, worker_id: str, *extra: str, kind: str = "cpu", model: str = TINY) -> Proc:
        return self.start(worker_id, ["worker", "--router", self.url, "--kind", kind, "--model", model,
                                      "--worker-id", worker_id, "--threads", "1",
                                      "--worker-token-file", str(self.token_file), *extra])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", headers=self.admin, timeout=5).json()

    def workers(self, model: str = TINY) -> list[dict[str, Any]]:
        try:
            return self.health()["models"].get(model, {}).get("workers", [])
        except (httpx.HTTPError, ValueError):
            return []

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.1)
        logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def wait_workers(self, ids: set[str], model: str = TINY, timeout: float = 240.0) -> None:
        self.wait_for(f"workers {sorted(ids)} on {model}",
                      lambda: ids <= {w["id"] for w in self.workers(model) if w["channel_open"]}, timeout)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over series whose labels include ``labels``."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", headers=self.admin, timeout=5).text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            series = head[len(name):]
            if series and not series.startswith("{"):
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total


def openai_client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
