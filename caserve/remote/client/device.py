"""The ``caserve`` torch device: PrivateUse1 renamed, with Python kernels for the few entry points
that reach the backend itself rather than a :class:`RemoteTensor` (factories and host-to-device copies).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

from caserve.remote.client import session as S
from caserve.remote.client.dispatch import dispatch, fetch, run_op, upload
from caserve.remote.wire import protocol as P
from caserve.remote.client.tensor import RemoteTensor, new_tensor, set_op_handler

logger = logging.getLogger(__name__)

DEVICE_TYPE = "caserve"
_INSTALLED = False
_INSTALL_LOCK = threading.Lock()


class _DeviceModule:
    """``torch.caserve``: what torch asks of a device module (seeding, counts, synchronize)."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return max(1, len(S.SESSIONS))

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed(seed: int) -> None:
        _DeviceModule.manual_seed_all(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        """Called by ``torch.manual_seed``: every connected device's generator follows."""
        for session in S.live_sessions():
            with session.lock:
                session.emit(P.Seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF))

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """Wait until every op sent on ``device`` (all devices when None) has finished on the server."""
        sessions = [S.session_of(device)] if device is not None else S.live_sessions()
        for session in sessions:
            session.sync(P.Barrier())


def _session(device: Any) -> S.Session:
    return S.session_of(device if device is not None else torch.device(DEVICE_TYPE, 0))


def _empty_memory_format(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    dtype = dtype or torch.get_default_dtype()
    if memory_format in (None, torch.contiguous_format, torch.preserve_format):
        stride = torch._prims_common.make_contiguous_strides_for(size) if len(size) else ()
    else:
        stride = torch.empty(size, dtype=dtype, device="meta", memory_format=memory_format).stride()
    return new_tensor(_session(device), dtype, tuple(size), tuple(stride), 0, lazy=True)


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    dtype = dtype or torch.get_default_dtype()
    return new_tensor(_session(device), dtype, tuple(size), tuple(stride), 0, lazy=True)


def _copy_from(src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    if isinstance(dst, RemoteTensor) and not isinstance(src, RemoteTensor):
        return upload(dst, src)
    if isinstance(src, RemoteTensor) and not isinstance(dst, RemoteTensor):
        return dst.copy_(fetch(src))
    return run_op(torch.ops.aten.copy_.default, (dst, src), {})


# Factories planned and sent as one op (the composite path would send an allocation plus an out= op).
_FACTORIES = ("arange", "arange.start", "arange.start_step", "full", "zeros", "ones", "scalar_tensor")


def _factory_kernel(name: str):
    op = getattr(torch.ops.aten, name.split(".")[0])
    op = getattr(op, name.split(".")[1] if "." in name else "default")

    def kernel(*args, **kwargs):
        if kwargs.get("pin_memory"):
            raise RuntimeError("pin_memory applies to CPU tensors, not the caserve device")
        return run_op(op, args, {k: v for k, v in kwargs.items() if v is not None})

    return kernel


def _backend_fallback(op, *args, **kwargs):
    """Any other op that reaches the backend without a caserve tensor argument: a factory such as
    ``tril_indices``. It runs on the CPU and its result is uploaded."""
    device = kwargs.get("device")
    if device is None or torch.device(device).type != DEVICE_TYPE:
        raise NotImplementedError(f"{op} is not supported on the caserve device")
    out = op(*args, **{**kwargs, "device": torch.device("cpu")})
    return out.to(device)


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                  enable_gqa=False):
    """Attention on a caserve device is one op, so the server runs its own best kernel (flash
    attention on a GPU) instead of the math decomposition the client's meta kernels would pick."""
    if type(query) is RemoteTensor:
        kwargs = {"scale": scale} if scale is not None else {}
        if enable_gqa:
            kwargs["enable_gqa"] = True
        return run_op(torch.ops.aten.scaled_dot_product_attention.default,
                      (query, key, value, attn_mask, dropout_p, is_causal), kwargs)
    return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 enable_gqa=enable_gqa)


def install() -> None:
    """Register the ``caserve`` device type with torch (idempotent)."""
    global _INSTALLED
    with _INSTALL_LOCK:
        if _INSTALLED:
            return
        set_op_handler(dispatch)
        _setup_privateuseone_for_python_backend(DEVICE_TYPE, backend_module=_DeviceModule)
        lib = torch.library.Library("aten", "IMPL")
        lib.impl("empty.memory_format", _empty_memory_format, "PrivateUse1")
        lib.impl("empty_strided", _empty_strided, "PrivateUse1")
        lib.impl("_copy_from", _copy_from, "PrivateUse1")
        for name in _FACTORIES:
            lib.impl(name, _factory_kernel(name), "PrivateUse1")
        fallback = torch.library.Library("_", "IMPL")
        fallback.fallback(_backend_fallback, "PrivateUse1")
        _LIBS.extend([lib, fallback])
        torch.nn.functional.scaled_dot_product_attention = _scaled_dot_product_attention
        _INSTALLED = True


_LIBS: list[torch.library.Library] = []
