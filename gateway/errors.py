"""Errors the gateway answers with, each carrying its HTTP status; one renderer writes ``{"error": ...}``.

::

    ServingError (500)                    shared with the model server (serving/errors.py)
    ├── BadRequest (400)                  malformed body, input mismatch, invalid admin body
    ├── Unauthorized (401)                missing or wrong admin token
    ├── Forbidden (403)                   a token without the role an action needs
    ├── NotFound (404)                    unknown model, version, color or route
    ├── MethodNotAllowed (405)
    ├── Conflict (409)                    re-pointing a color that carries traffic without "force"
    ├── PreconditionFailed (412)          stale If-Match on an admin write
    ├── PreconditionRequired (428)        an admin write without If-Match
    ├── PayloadTooLarge (413)
    ├── TooManyRequests (429)             an address that failed authentication too often
    └── Unavailable (503)                 both colors down, load shed; carries Retry-After

The upstream client (``http_client.py``) raises only :class:`UpstreamFailure`, which the request path turns
into a retry on the other color or, at the end, an :class:`Unavailable`.
"""

from __future__ import annotations

from serving.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServingError,
    Unavailable,
    error_response,
    render,
)

__all__ = [
    "BadRequest", "Conflict", "Forbidden", "MethodNotAllowed", "NotFound", "PayloadTooLarge", "PreconditionFailed",
    "PreconditionRequired", "ServingError", "TooManyRequests", "Unauthorized", "Unavailable", "UpstreamFailure",
    "error_response", "render",
]


class Unauthorized(ServingError):
    status = 401

    def __init__(self, message: str, realm: str = "bluegreen-admin") -> None:
        super().__init__(message, headers={"www-authenticate": f'Bearer realm="{realm}"'})


class Forbidden(ServingError):
    status = 403


class PreconditionRequired(ServingError):
    status = 428


class Conflict(ServingError):
    status = 409


class PreconditionFailed(ServingError):
    status = 412


class TooManyRequests(ServingError):
    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"retry-after": str(max(1, retry_after_s))})


class UpstreamFailure(Exception):
    """One upstream attempt failed. ``sent`` says whether the backend may have seen the request: a connection
    that could not be opened (``sent=False``) is always safe to retry elsewhere. ``dead``: the backend itself
    failed the exchange (reset or closed the connection, answered garbage) — a sign of a dead or broken
    backend, not of overload, so its retry is not rationed. ``timed_out``: the attempt's deadline passed."""

    def __init__(self, reason: str, *, sent: bool, status: int | None = None, dead: bool = False,
                 timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.status = status
        self.dead = dead
        self.timed_out = timed_out
