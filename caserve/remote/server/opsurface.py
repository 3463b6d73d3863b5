"""Which ATen ops a tenant may run on the GPU server: a closed allow-list, and a deny list that holds always.

The allow-list (``allowed_ops.txt`` next to this module) holds the overloads caserve's own client emits
for the zoo's architectures and the serving engine; ``python -m caserve.remote.record_ops`` runs
them and rewrites it, so growing it is one command and a review of the diff. A server started with
``--allow-any-op`` (a trusted, single-user deployment) accepts any other ATen op too; the deny list
(side effects outside the tenant's own tensors: printing, asserts that poison a CUDA context, files,
raw pointers, streams, resizing behind the memory accounting) holds in both modes.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from caserve.remote.server.errors import TenantError

logger = logging.getLogger(__name__)

ALLOWED_OPS_FILE = Path(__file__).with_name("allowed_ops.txt")

DENIED_OPS = frozenset(
    {"from_file", "_from_file", "set_", "record_stream", "_pin_memory", "pin_memory", "_cudnn_init_dropout_state",
     "_fused_adam_", "_fused_adamw_", "_use_cudnn_ctc_loss", "save", "_local_scalar_dense", "item",
     "_reshape_alias", "lift_fresh", "_make_dep_token", "sym_constrain_range", "sym_constrain_range_for_size"}
)
# Name fragments of ops that are never allowed: resizing grows storage behind the tenant's memory
# accounting; printing and asserts act outside the tenant (the server's log, the shared CUDA context);
# the others reach raw pointers, streams or the allocator.
DENIED_FRAGMENTS = ("resize", "data_ptr", "_cuda", "stream", "_nested_from_buffer", "_make_per_", "print",
                    "_assert", "_debug", "_sync", "_storage", "_set_")


def is_denied(op_name: str) -> bool:
    """``op_name``: the middle part of ``aten.NAME.OVERLOAD``."""
    return op_name in DENIED_OPS or any(f in op_name for f in DENIED_FRAGMENTS)


@functools.lru_cache(maxsize=1)
def allowed_ops() -> frozenset[str]:
    """The checked-in allow-list: one ``aten.NAME.OVERLOAD`` a line, ``#`` comments."""
    lines = ALLOWED_OPS_FILE.read_text().splitlines()
    names = frozenset(line.split("#", 1)[0].strip() for line in lines) - {""}
    bad = sorted(n for n in names if is_denied(n.split(".")[1] if n.count(".") == 2 else n))
    if bad:  # a reviewer let a denied op in: refuse to start rather than serve it
        raise RuntimeError(f"{ALLOWED_OPS_FILE} lists denied ops: {bad}")
    return names


class OpSurface:
    """Resolves op names for a server: ``allow_any`` admits every ATen op outside the deny list.

    ``seen``, when given, collects every name resolved (``record_ops`` builds the allow-list from it).
    """

    def __init__(self, allow_any: bool = False, seen: set[str] | None = None) -> None:
        self.allow_any = allow_any
        self.allowed = frozenset() if allow_any else allowed_ops()
        self.seen = seen
        self._cache: dict[str, torch._ops.OpOverload] = {}

    def resolve(self, name: str) -> torch._ops.OpOverload:
        """``"aten.add.Tensor"`` -> the OpOverload, or a TenantError naming why not."""
        op = self._cache.get(name)
        if op is not None:
            return op
        parts = name.split(".") if isinstance(name, str) else []
        if len(parts) != 3 or parts[0] != "aten" or not all(p.isidentifier() for p in parts):
            raise TenantError(f"op {name!r} is not an ATen op name (aten.NAME.OVERLOAD)", "unknown_op")
        if is_denied(parts[1]):
            raise TenantError(f"op {name} is not allowed on the GPU server (side effects outside the tenant)",
                              "denied_op")
        if not self.allow_any and name not in self.allowed:
            raise TenantError(f"op {name} is not on this GPU server's allow-list "
                              "(grow it with python -m caserve.remote.record_ops)", "denied_op")
        try:
            op = getattr(getattr(torch.ops.aten, parts[1]), parts[2])
        except (AttributeError, RuntimeError):
            raise TenantError(f"unknown op {name}", "unknown_op") from None
        if not isinstance(op, torch._ops.OpOverload):
            raise TenantError(f"unknown op {name}", "unknown_op")
        if self.seen is not None:
            self.seen.add(name)
        self._cache[name] = op
        return op
