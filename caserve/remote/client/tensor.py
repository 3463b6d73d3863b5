"""Client-side tensors of a caserve device: a Python wrapper per tensor, a handle per storage.

A :class:`RemoteTensor` holds no data. Its size, stride and offset are real (computed locally by meta
kernels), its bytes live on the GPU server in the storage named by ``_st.handle``. Views share their
base's :class:`RemoteStorage`, so a view never crosses the wire.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from caserve.remote.wire import protocol as P
from caserve.remote.wire.codec import DTYPE_NAMES, extent

if TYPE_CHECKING:
    from caserve.remote.client.session import Session

LAZY, LIVE = 0, 1
EMPTY_ROOM = 1 << 48  # nominal storage bytes of an empty wrapper (it has no data either way)


class RemoteStorage:
    """One device allocation of a tenant. Freed on the server when the last tensor using it goes."""

    __slots__ = ("session", "handle", "dtype", "state", "shared", "alloc", "__weakref__")

    def __init__(self, session: Session, dtype: torch.dtype, alloc: tuple | None = None) -> None:
        self.session = session
        self.handle = h = session.next_handle  # Session.new_handle, inlined: this runs for every op
        session.next_handle = h + 1
        self.dtype = dtype
        # LAZY: created by empty(); allocated on the server only when first used (``alloc`` = size, stride),
        # so a tensor that is immediately overwritten by an upload costs no allocation.
        self.state = LAZY if alloc is not None else LIVE
        self.alloc = alloc
        self.shared = False  # a read-only weight shared with other tenants (copy-on-write)

    @classmethod
    def bound(cls, session: Session, handle: int, dtype: torch.dtype) -> "RemoteStorage":
        """A storage the server already bound to ``handle`` (outputs of a sync ``Execute``)."""
        st = cls.__new__(cls)
        st.session, st.handle, st.dtype, st.state, st.shared, st.alloc = session, handle, dtype, LIVE, False, None
        return st

    def __del__(self) -> None:
        if self.state == LIVE:
            self.session.free(self.handle)


class RemoteTensor(torch.Tensor):
    """A tensor on a ``caserve`` device. Every ATen op on it goes to :func:`caserve.remote.client.dispatch.dispatch`."""

    _st: RemoteStorage
    _cs: tuple  # (dtype, size, stride, offset): the signature used for dispatch caching

    @staticmethod
    def __new__(cls, st: RemoteStorage, dtype: torch.dtype, size: tuple, stride: tuple, offset: int,
                nbytes: int | None = None):
        if nbytes is None:
            nbytes = extent(size, stride, offset) * dtype.itemsize
        t = torch.Tensor._make_wrapper_subclass(
            cls, size, strides=stride, storage_offset=offset, dtype=dtype, device=st.session.device,
            # An empty tensor may be resized in place by an out= op (at::arange does this): leave it room.
            storage_size=nbytes or EMPTY_ROOM,
        )
        t._st = st
        t._cs = (dtype, size, stride, offset)
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _op_handler(func, args, kwargs or {})

    def tolist(self):
        return self.cpu().tolist()

    def numpy(self, *, force: bool = False):
        if not force:
            raise TypeError("can't convert caserve device tensor to numpy; use .cpu() first (or force=True)")
        return self.cpu().numpy()

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D105
        body = repr(self.detach().to("cpu"))
        return body[:-1] + f", device='{self.device}')" if body.endswith(")") else body


def ready(st: RemoteStorage) -> None:
    """Allocate a lazy storage on the server before its first use."""
    if st.state == LAZY:
        size, stride = st.alloc
        st.session.emit(P.Alloc(st.handle, DTYPE_NAMES[st.dtype], size, stride))
        st.state = LIVE


def _not_installed(func: Any, args: tuple, kwargs: dict) -> Any:
    raise RuntimeError(f"{func} reached a caserve tensor before caserve.remote.client.device.install()")


OpHandler = Callable[[Any, tuple, dict], Any]
_op_handler: OpHandler = _not_installed  # where every ATen op on a RemoteTensor goes: see set_op_handler


def set_op_handler(handler: OpHandler) -> None:
    """Route ATen ops on caserve tensors to ``handler(func, args, kwargs)``. The device installs
    :func:`caserve.remote.client.dispatch.dispatch` here, so that this module needs no import of it."""
    global _op_handler
    _op_handler = handler


_WRAP = torch.Tensor._make_wrapper_subclass


def wrap(st: RemoteStorage, cs: tuple, nbytes: int) -> RemoteTensor:
    """``RemoteTensor(st, *cs, nbytes)`` for a plan's output, whose ``cs`` tuple is built once per plan."""
    dtype, size, stride, offset = cs
    t = _WRAP(RemoteTensor, size, strides=stride, storage_offset=offset, dtype=dtype, device=st.session.device,
              storage_size=nbytes or EMPTY_ROOM)
    t._st = st
    t._cs = cs
    return t


def resize_empty(t: RemoteTensor, dtype: torch.dtype, size: tuple, stride: tuple, offset: int) -> None:
    """Give an empty tensor the geometry an out= op resized it to, on new lazy storage."""
    t._st = RemoteStorage(t._st.session, dtype, (size, stride))
    t._cs = (dtype, size, stride, offset)
    with torch._C._DisableTorchDispatch():
        torch.ops.aten.as_strided_.default(t, size, stride, offset)


def new_tensor(session: Session, dtype: torch.dtype, size: tuple, stride: tuple, offset: int = 0,
               lazy: bool = False) -> RemoteTensor:
    """A tensor on fresh storage; ``lazy`` storages are allocated on first use."""
    st = RemoteStorage(session, dtype, (size, stride) if lazy else None)
    return RemoteTensor(st, dtype, size, stride, offset)
