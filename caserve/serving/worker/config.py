"""A worker's settings, checked when made. Light on purpose: the CLI builds and checks one (and refuses
a bad layout) before the worker loads torch and transformers."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Optional

from caserve.serving.messages import WORKER_KINDS

KINDS = WORKER_KINDS
BATCHING = ("continuous", "static")
MAX_LEN = 2048  # default cap on a slot's tokens (prompt + output): the cache is max_batch x this


@dataclass
class WorkerConfig:
    router_url: str
    kind: str
    model: str
    router_token: str = field(default="", repr=False)  # sent on every request to the router
    gpu_server: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)  # the GPU server's token (assisted)
    worker_id: Optional[str] = None
    max_batch: int = 8
    shrink: bool = False
    task: Optional[str] = None
    threads: Optional[int] = None
    step_delay_s: float = 0.0
    served_model_name: Optional[str] = None  # the id the router knows the model by (default: model)
    graph: bool = True  # assisted: decode steps replayed as captured graphs (caserve.remote.graph_mode)
    batching: str = "continuous"  # or "static": admit rows only when every slot is free (the baseline)
    max_len: int = MAX_LEN  # most tokens (prompt + output) one slot holds
    router_ca: Optional[str] = None  # CA file checking an https:// router (default: $CASERVE_ROUTER_CA, system)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}")
        if self.kind == "assisted" and not self.gpu_server:
            raise ValueError("an assisted worker needs --gpu-server host:port")
        if not self.router_token:
            raise ValueError("a worker needs the router's worker token: --worker-token-file F or "
                             "$CASERVE_WORKER_TOKEN")
        if self.router_ca is not None and not os.path.isfile(self.router_ca):
            raise ValueError(f"the router CA file {self.router_ca} is not a readable file")
        self.router_url = self.router_url.rstrip("/")
        self.worker_id = self.worker_id or f"{self.kind}-{socket.gethostname()}-{os.getpid()}"
