"""Plain data shared by the client's session, graph mode and captured steps: a forward call's records
being held back (:class:`Region`), what a watched call did (:class:`CallLog`), and the reference form
of a region's records (:class:`RunRef` and the others) that both graph mode and capture match on.
Imports nothing of the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from caserve.remote.wire import protocol as P


class Region:
    """The records of one forward call being recorded."""

    __slots__ = ("base", "records", "payloads", "owners", "aborted")

    def __init__(self, base: int) -> None:
        self.base = base
        self.records: list[Any] = []
        self.payloads: list[memoryview] = []
        self.owners: list[Any] = []
        self.aborted: str | None = None


@dataclass
class CallLog:
    """What the session saw during one recorded call (filled in by :class:`~caserve.remote.client.session.Session`)."""

    base: int  # the first handle minted in the call
    epoch: int = 0  # the session's template epoch when the call began
    records: list[Any] = field(default_factory=list)
    freed: set[int] = field(default_factory=set)
    bad: str | None = None  # why the call cannot be captured, if the session saw a reason


# A region's records in reference form: each handle written as a reference (``r >= 0``: the r-th handle
# minted since the region began; ``r < 0``: external handle ``-r - 1``), everything hashable, so that a
# tuple of them is the region's signature. The four kinds have different numbers of fields, so records
# of different kinds never compare equal.


class RunRef(NamedTuple):
    """A :class:`~caserve.remote.wire.protocol.Run` (its scalars' values travel with each replay)."""

    tid: int
    slots: tuple[int, ...]
    outs: tuple[int, ...]

    def struct(self) -> P.Run:
        return P.Run(self.tid, list(self.slots), list(self.outs))


class AllocRef(NamedTuple):
    handle: int
    dtype: str
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def struct(self) -> P.Alloc:
        return P.Alloc(*self)


class UploadRef(NamedTuple):
    handle: int
    dtype: str
    size: tuple[int, ...]
    payload: int
    share: bool

    def struct(self) -> P.Upload:
        return P.Upload(*self)


class CopyInRef(NamedTuple):
    handle: int
    dtype: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    src_dtype: str
    src_size: tuple[int, ...]
    payload: int

    def struct(self) -> P.CopyIn:
        return P.CopyIn(*self)


RecordRef = RunRef | AllocRef | UploadRef | CopyInRef


def reference_form(region: Region) -> tuple[tuple, list[RecordRef], list[int], list]:
    """The region in reference form: its signature, its records, the external handles and the values of
    its scalar slots (the signature holds their templates, not their values)."""
    base = region.base
    ext: list[int] = []
    scalars: list = []
    index: dict[int, int] = {}

    def ref(h: int) -> int:
        if h >= base:
            return h - base
        i = index.get(h)
        if i is None:
            i = index[h] = len(ext)
            ext.append(h)
        return -i - 1

    recs: list[RecordRef] = []
    new = tuple.__new__  # a NamedTuple built from a tuple without its Python-level __new__ (runs per record)
    for r in region.records:
        t = type(r)
        if t is P.Run:
            recs.append(new(RunRef, (r.tid, tuple([ref(h) for h in r.slots]), tuple([h - base for h in r.outs]))))
            if r.scalars:
                scalars.extend(r.scalars)
        elif t is P.Alloc:
            recs.append(new(AllocRef, (ref(r.handle), r.dtype, r.size, r.stride)))
        elif t is P.Upload:
            recs.append(new(UploadRef, (ref(r.handle), r.dtype, r.size, r.payload, r.share)))
        else:  # CopyIn
            recs.append(new(CopyInRef, (ref(r.handle), r.dtype, r.size, r.stride, r.offset, r.src_dtype, r.src_size,
                                        r.payload)))
    return tuple(recs), recs, ext, scalars
