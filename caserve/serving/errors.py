"""Typed serving errors, each mapped to exactly one HTTP status at the API edge.

Recoverable errors (the client can fix its request, or retry later) and fatal ones (a worker or the
GPU server is lost) are distinct types; :func:`error_body` renders any of them as an OpenAI-style
``{"error": {...}}`` body.
"""

from __future__ import annotations

from typing import Any, Optional


class ServingError(Exception):
    """Base class. ``status`` is the HTTP status, ``type``/``code`` appear in the error body."""

    status: int = 500
    type: str = "server_error"
    code: Optional[str] = None

    def __init__(self, message: str, *, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ServingError):
    """Malformed JSON, a parameter out of range, or a request the model's task cannot serve."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    """The prompt does not fit the model's context window."""

    code = "context_length_exceeded"


class ModelNotFound(ServingError):
    """No worker serves this model and it is not configured on the router."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(ServingError):
    """An unknown route or internal handle (e.g. a worker session the router does not know)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Unauthorized(ServingError):
    """No credential where one is required: the API key on public routes, the worker token on
    ``/internal/*``. OpenAI clients raise ``AuthenticationError`` on it."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServingError):
    """A credential was presented and is wrong (a worker token the router did not issue)."""

    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class Conflict(ServingError):
    """The request clashes with live state: a worker id held by a live session, a second channel."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(ServingError):
    """The request body is larger than the router accepts; refused before it is read or parsed."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(ServingError):
    """Admission control: the model's queue is full. Carries a Retry-After estimate in seconds."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RequestFailed(ServingError):
    """Fatal for one request: it was requeued too often, or its worker reported an internal error."""

    status = 503
    type = "server_error"
    code = "request_failed"


class RequestCancelled(ServingError):
    """The client went away; never rendered to anyone, used to unwind waiting coroutines."""

    status = 499
    type = "cancelled"


def error_body(exc: ServingError) -> dict[str, Any]:
    """OpenAI-style error body."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


# Worker-reported error kinds (``messages.Error.error_type``) -> the error raised to the client.
WORKER_ERROR_TYPES: dict[str, type[ServingError]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "bad_request": BadRequest,
    "internal": RequestFailed,
}
