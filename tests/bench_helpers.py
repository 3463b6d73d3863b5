"""Helpers and fixtures shared by the bench tests (imported explicitly, to leave conftest.py to others)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"  # small excerpts of every dataset format (see its README.md)


class ThreadServer:
    """A uvicorn server on a free loopback port in a daemon thread; ``stop()`` ends it."""

    def __init__(self, app):
        self.config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve_app():
    """Start apps in-process; every one is stopped at teardown."""
    started: list[ThreadServer] = []

    def start(app) -> str:
        s = ThreadServer(app)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()
        pool = getattr(s.config.app.state, "pool", None)
        if pool is not None:
            pool.close()
