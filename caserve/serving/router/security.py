"""What the router checks before a request reaches any route: who is calling, and how big the body is.

:class:`RouterGuard` is plain ASGI middleware in front of the FastAPI app, so it decides from the
request line and headers alone, before a byte of the body is read or parsed:

==================== ============================================ =================================
route                credential                                   refused with
==================== ============================================ =================================
``/internal/*``      worker token in ``X-Caserve-Worker-Token``   401 missing, 403 wrong
``/health``          none; details only with the API key or the   (liveness only)
                     worker token when an API key is configured
``/metrics``         the API key or the worker token, when an     401
                     API key is configured
everything else      ``Authorization: Bearer <API key>``, when    401 (OpenAI ``invalid_api_key``)
                     an API key is configured
==================== ============================================ =================================

Secrets are compared with :func:`hmac.compare_digest`. Every refusal is logged with the peer's
address, never with what it sent. Bodies: a ``Content-Length`` over the route's limit is answered
413 at once (the server discards the unread body); a body without a length is read up to the limit
and refused as soon as it passes it. The one exception is a worker's event stream
(``/internal/workers/{id}/events`` sent chunked, after the token check): it lasts as long as the
worker's session, so the route reads it line by line and refuses any line over the limit.
"""

from __future__ import annotations

import enum
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from starlette.responses import JSONResponse

from caserve.serving.credentials import MIN_SECRET_CHARS
from caserve.serving.errors import BadRequest, Forbidden, PayloadTooLarge, ServingError, Unauthorized, error_body
from caserve.serving.messages import WORKER_TOKEN_HEADER

logger = logging.getLogger(__name__)


class RefusalLog:
    """Log lines about refused requests, at most ``burst`` at once and ``per_s`` a second after that (a
    token bucket), so that a flood of bad requests is not a flood of log lines; the next line that is
    written says how many were left out since the last one."""

    def __init__(self, log: logging.Logger, per_s: float = 5.0, burst: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.per_s, self.burst, self.clock = log, per_s, burst, clock
        self.tokens = float(burst)
        self.last = clock()
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` at WARNING if the budget allows; True when it was written."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.per_s)
        self.last = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return False
        self.tokens -= 1.0
        if self.suppressed:
            msg += " (%d similar refusals not logged before this one)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.log.warning(msg, *args)
        return True


refusals = RefusalLog(logger)  # one budget for every refusal this router process logs

DEFAULT_MAX_BODY_BYTES = 4 << 20  # a 128k-token prompt as text or as token ids fits several times over
WORKER_MAX_BODY_BYTES = 64 << 20  # worker events carry embeddings of whole batches
ACCESS_SCOPE_KEY = "caserve.access"
LINE_LIMIT_SCOPE_KEY = "caserve.line_limit"  # set on a worker's event stream: the most bytes of one line

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Access(enum.Enum):
    """What the caller proved, stored in the ASGI scope under :data:`ACCESS_SCOPE_KEY`."""

    ANONYMOUS = "anonymous"  # an API key is configured and the caller did not present it
    CLIENT = "client"  # presented the API key, or none is configured
    WORKER = "worker"  # presented the worker token: worker routes, and all details of /health


@dataclass(frozen=True)
class RouterSecurity:
    worker_token: str = field(repr=False)
    api_key: Optional[str] = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    worker_max_body_bytes: int = WORKER_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        for what, value in (("worker token", self.worker_token), ("API key", self.api_key)):
            if value is not None and len(value) < MIN_SECRET_CHARS:
                raise ValueError(f"the {what} must be at least {MIN_SECRET_CHARS} characters long")
        if self.max_body_bytes < 1 or self.worker_max_body_bytes < 1:
            raise ValueError("body limits must be positive")

    def is_worker(self, token: Optional[bytes]) -> bool:
        return token is not None and hmac.compare_digest(token, self.worker_token.encode())

    def access(self, headers: dict[bytes, bytes]) -> Access:
        """The public routes' view of a caller (the worker token counts as an administrator's key)."""
        if self.is_worker(headers.get(WORKER_TOKEN_HEADER.encode())):
            return Access.WORKER
        if self.api_key is None:
            return Access.CLIENT
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key.encode()):
            return Access.CLIENT
        return Access.ANONYMOUS


def access_of(scope: Scope) -> Access:
    """The caller's access as :class:`RouterGuard` established it (ANONYMOUS without the guard)."""
    return scope.get(ACCESS_SCOPE_KEY, Access.ANONYMOUS)


class RouterGuard:
    """ASGI middleware enforcing :class:`RouterSecurity` (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], security: RouterSecurity) -> None:
        self.app, self.security = app, security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])  # ASGI header names are lower-case bytes
        path: str = scope["path"]
        try:
            access, limit = self._admit(path, headers)
            length = self._declared_length(headers)
        except ServingError as exc:
            await self._refuse(scope, receive, send, exc, started)
            return
        scope[ACCESS_SCOPE_KEY] = access
        if length is not None:
            if length > limit:
                await self._refuse(scope, receive, send, _too_large(length, limit), started)
                return
        elif access is Access.WORKER and _is_event_stream(path):
            scope[LINE_LIMIT_SCOPE_KEY] = limit  # read line by line; the route refuses a longer line
        elif scope["method"] not in ("GET", "HEAD"):
            try:
                receive = await _buffered(receive, limit)
            except PayloadTooLarge as exc:
                await self._refuse(scope, receive, send, exc, started)
                return
        await self.app(scope, receive, send)

    def _admit(self, path: str, headers: dict[bytes, bytes]) -> tuple[Access, int]:
        if path.startswith("/internal/"):
            token = headers.get(WORKER_TOKEN_HEADER.encode())
            if token is None:
                raise Unauthorized(f"worker routes need the router's worker token in the {WORKER_TOKEN_HEADER} "
                                   f"header (caserve worker --worker-token-file)")
            if not self.security.is_worker(token):
                raise Forbidden("wrong worker token")
            return Access.WORKER, self.security.worker_max_body_bytes
        access = self.security.access(headers)
        if access is Access.ANONYMOUS and path != "/health":
            if b"authorization" in headers:
                raise Unauthorized("Incorrect API key provided.")
            raise Unauthorized("You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
        return access, self.security.max_body_bytes

    @staticmethod
    def _declared_length(headers: dict[bytes, bytes]) -> Optional[int]:
        raw = headers.get(b"content-length")
        if raw is None:
            return None
        try:
            length = int(raw)
        except ValueError:
            raise BadRequest("malformed Content-Length header") from None
        if length < 0:
            raise BadRequest("malformed Content-Length header")
        return length

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, exc: ServingError, started: float) -> None:
        client = scope.get("client") or ("?", 0)
        refusals.warning("refused %s %s from %s:%s with %d in %.2f ms: %s", scope["method"], scope["path"],
                         client[0], client[1], exc.status, (time.perf_counter() - started) * 1e3, exc.message)
        response = JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers())
        await response(scope, receive, send)


def _is_event_stream(path: str) -> bool:
    """``/internal/workers/{id}/events``: a worker's events, which it may send as one long chunked body."""
    parts = path.split("/")
    return len(parts) == 5 and parts[1:3] == ["internal", "workers"] and parts[4] == "events"


def _too_large(length: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body of {length} bytes is over this router's limit of {limit} bytes")


async def _buffered(receive: Receive, limit: int) -> Receive:
    """Read a body of unknown length (chunked) up to ``limit``; a receive that replays it, then goes on."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if size > limit:
            raise PayloadTooLarge(f"request body is over this router's limit of {limit} bytes")
        if not message.get("more_body", False):
            break

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay
