"""A supervised ``caserve`` subprocess: the unit every Ray actor of the cluster wraps.

One thread per process spawns the child, waits for it and respawns it (after a pause) when it exits
without being asked to. The child is spawned by that thread with ``PR_SET_PDEATHSIG`` (Linux), so it
gets SIGTERM when the thread's process dies, however it dies (``ray.kill`` is a SIGKILL): a dead actor
never leaves an orphaned router or worker behind. Logs go to a file in the actor's log directory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from caserve.cluster.errors import ProcessFailed

logger = logging.getLogger(__name__)

RESTART_PAUSE_S = 1.0


def caserve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "caserve.cli", *args]


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SupervisedProcess:
    """Run ``argv`` until :meth:`stop`; restart it when it exits on its own."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.restarts = 0
        self.last_exit: Optional[int] = None
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._stopping = threading.Event()
        self._spawned = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name=f"supervise-{name}", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "SupervisedProcess":
        self._thread.start()
        if not self._spawned.wait(timeout_s):
            raise ProcessFailed(f"{self.name}: could not spawn {self.argv[:4]} within {timeout_s:.0f}s")
        return self

    @property
    def pid(self) -> Optional[int]:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def running(self) -> bool:
        return self.pid is not None

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            logger.info("%s started (pid %d), log %s", self.name, self._proc.pid, self.log_path)
            self._spawned.set()
            code = self._proc.wait()
            self.last_exit = code
            if self._stopping.is_set():
                break
            self.restarts += 1
            logger.warning("%s exited with %s; restart %d in %.0fs", self.name, code, self.restarts, RESTART_PAUSE_S)
            self._stopping.wait(RESTART_PAUSE_S)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; no restart afterwards."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM for %.0fs; killing it", self.name, timeout_s)
                proc.kill()
                proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        logger.info("%s stopped", self.name)


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The actor's environment (Ray's runtime_env included) plus ``extra``, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env

