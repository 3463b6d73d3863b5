"""The worker's retry policy in-process (no model, no sockets): registration is retried with exponential
backoff while the router is unreachable or refuses, and loading is retried on device errors only."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from caserve.serving.messages import RegisterReply
from caserve.serving.worker.config import WorkerConfig
from caserve.serving.worker.worker import RouterLost, Worker


def make_worker() -> Worker:
    return Worker(WorkerConfig(router_url="http://127.0.0.1:1", kind="cpu", model="m", worker_id="w",
                               router_token="t" * 32))


def test_registration_backs_off_until_the_router_answers() -> None:
    worker, calls = make_worker(), []
    failures = [httpx.ConnectError("refused"), RouterLost("malformed reply"), httpx.ConnectError("refused")]

    async def register(client: httpx.AsyncClient) -> RegisterReply:
        calls.append(time.monotonic())
        if failures:
            raise failures.pop(0)
        return RegisterReply(session="s", heartbeat_s=1.0)

    worker._register = register  # type: ignore[method-assign]
    reply = asyncio.run(worker._register_with_backoff(None))  # type: ignore[arg-type]
    assert reply.session == "s" and len(calls) == 4
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.18 and gaps[1] >= 0.38 and gaps[2] >= 0.78  # 0.2 s, doubling


def test_loading_retries_device_errors_but_not_missing_packages() -> None:
    worker, attempts = make_worker(), []

    def load() -> str:
        attempts.append(1)
        if len(attempts) < 2:
            raise OSError("GPU server unreachable")
        return "engine"

    worker._load = load  # type: ignore[method-assign]
    assert asyncio.run(worker._load_with_backoff()) == "engine" and len(attempts) == 2

    def missing() -> str:
        raise ModuleNotFoundError("no module named caserve_native")

    worker._load = missing  # type: ignore[method-assign]
    with pytest.raises(ModuleNotFoundError):
        asyncio.run(worker._load_with_backoff())
