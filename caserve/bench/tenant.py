"""One tenant of ``bench server-scaling``: a process decoding with the serving engine on a caserve device.

It runs the engine exactly as an assisted worker does (static KV cache, graph mode, greedy steps sent
one ahead), and is driven over stdin/stdout, one line each way::

    parent                                tenant
                                          connect, load the model, warm up   -> {"ready": true, ...}
    go R        ------------------------> R decodes of --new-tokens tokens   -> {"tokens": ..., "wall_s": ...}
    quit        ------------------------> disconnect, exit

Replies are JSON lines; a failure is ``{"error": "..."}`` and the tenant exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _reply(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one server-scaling tenant (driven over stdin)")
    p.add_argument("--server", required=True, help="host:port of the GPU server (or of a relay)")
    p.add_argument("--model", required=True, help="bench model name (caserve.bench.remote_overhead.MODELS)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--transport", default="auto")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured decodes (captures, op plans)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # one process per tenant, one core's worth of client work each
    try:
        import caserve.remote as R
        from caserve.bench.remote_overhead import MODELS, assisted_engine, engine_decode
        from caserve.models import load_model
        
        dev = R.connect(a.server, transport=a.transport)
        loaded = load_model(MODELS[a.model], device=dev)
        R.graph_mode(loaded.model)
        engine = assisted_engine(loaded)  # as assisted workers run it
        prompt = torch.randint(0, min(loaded.model.config.vocab_size, 256), (8,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        for _ in range(a.warmup):
            engine_decode(engine, prompt, a.new_tokens)
        _reply({"ready": True, "label": loaded.label})
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            runs = int(cmd[1])
            s0 = R.stats(dev)
            start, cpu = time.time(), time.process_time()
            for _ in range(runs):
                engine_decode(engine, prompt, a.new_tokens)
            end, cpu = time.time(), time.process_time() - cpu
            s1 = R.stats(dev)
            _reply({"tokens": runs * a.new_tokens, "start": start, "end": end, "wall_s": end - start, "cpu_s": cpu,
                    "syncs": s1["syncs"] - s0["syncs"], "sync_wait_s": s1["sync_wait_s"] - s0["sync_wait_s"]})
        R.disconnect(dev)
    except Exception as exc:  # reported to the parent, which records the failure and goes on
        _reply({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
