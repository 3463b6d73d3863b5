"""Typed errors of the remote runtime.

Recoverable errors leave the connection usable; fatal ones mean the device is gone and a new
:func:`caserve.remote.connect` is needed.
"""

from __future__ import annotations


class RemoteError(RuntimeError):
    """Base class of every error the remote runtime raises."""


class RemoteOpError(RemoteError):
    """An op failed on the GPU server (raised at the next sync point). Recoverable."""

    def __init__(self, op: str, message: str, code: str = "op_failed") -> None:
        super().__init__(f"remote op {op} failed on the GPU server: {message}")
        self.op = op
        self.server_message = message
        self.code = code


class QuotaExceeded(RemoteOpError):
    """The tenant's device-memory limit would be exceeded. Recoverable: free memory and retry."""


class ConnectionLost(RemoteError):
    """The GPU server closed the connection or stopped answering. Fatal for this device."""


class HandshakeError(RemoteError):
    """The server refused the connection (protocol version, authentication). Fatal."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"GPU server refused the connection ({code}): {message}")
        self.code = code
