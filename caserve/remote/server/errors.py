"""Errors of one tenant's request on the GPU server: reported to that tenant only, never fatal to others."""

from __future__ import annotations


class TenantError(Exception):
    """An op or request of one tenant failed; reported to that tenant only. ``code`` travels in its reply."""

    def __init__(self, message: str, code: str = "op_failed") -> None:
        super().__init__(message)
        self.code = code


class QuotaError(TenantError):
    """The tenant's memory quota would be exceeded."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "quota_exceeded")
