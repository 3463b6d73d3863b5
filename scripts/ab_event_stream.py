"""CPU per line of the worker's event stream: the stream written by caserve's h11 writer
(caserve.serving.worker.event_stream) against the same stream as an httpx streaming POST (what the
worker used before), alternating in one process, against one sink server in another process.

A producer puts one line every ``GAP_MS`` (as the engine hands a step's events over) on a queue; the
body generator takes them. The figure is this process's CPU time per line (time.process_time); a third
mode takes the lines without writing them (the producer's own cost), which the ratio leaves out.

Usage: PYTHONPATH=. python scripts/ab_event_stream.py [trials] [lines]
Environment: LINE (bytes per line, 600: a step of 16 token events), GAP_MS (1)."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

import httpx

from caserve.bench.compare import free_port
from caserve.bench.loadgen import wait_healthy
from caserve.serving.worker.event_stream import post_lines

SINK = """
import asyncio, sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


async def lines(count: int, size: int, gap_s: float):
    queue: asyncio.Queue = asyncio.Queue()

    async def produce() -> None:
        for _ in range(count):
            await asyncio.sleep(gap_s)
            queue.put_nowait(b"x" * (size - 1) + b"\n")
        queue.put_nowait(None)

    producer = asyncio.create_task(produce())
    while (line := await queue.get()) is not None:
        yield line
    await producer


async def with_httpx(url: str, count: int, size: int, gap_s: float) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        resp = await client.post(url, content=lines(count, size, gap_s))
        assert resp.status_code == 200


async def producer_only(url: str, count: int, size: int, gap_s: float) -> None:
    async for _ in lines(count, size, gap_s):
        pass


async def with_h11(url: str, count: int, size: int, gap_s: float) -> None:
    status, _ = await post_lines(url, {}, lines(count, size, gap_s))
    assert status == 200


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    size, gap_s = int(os.environ.get("LINE", 600)), float(os.environ.get("GAP_MS", 1)) / 1e3
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)])
    url = f"http://127.0.0.1:{port}/events"
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s=30, proc=sink)  # the sink answers every path
        modes = (("producer only", producer_only), ("httpx", with_httpx), ("h11", with_h11))
        results: dict[str, list[float]] = {name: [] for name, _ in modes}
        for trial in range(trials):
            for name, fn in modes:
                c0 = time.process_time()
                asyncio.run(fn(url, count, size, gap_s))
                results[name].append((time.process_time() - c0) / count * 1e6)
            print(f"trial {trial + 1}: " + ", ".join(f"{name} {results[name][-1]:.1f}" for name, _ in modes)
                  + " us CPU per line", flush=True)
        base = results["producer only"]
        ratios = [(h - b) / (x - b) for h, x, b in zip(results["h11"], results["httpx"], base)]
        print("medians: " + ", ".join(f"{name} {statistics.median(results[name]):.1f}" for name, _ in modes)
              + " us per line; the writers' own cost (less the producer's), h11/httpx per trial: "
              + ", ".join(f"{r:.2f}" for r in ratios))
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    main()
