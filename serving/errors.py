"""Errors that reach a client, each carrying its HTTP status.

::

    ServingError (500)                 base: rendered as {"error": message}
    ├── BadRequest (400)               malformed body, wrong input name/datatype/shape/size
    ├── NotFound (404)                 unknown model, version or route
    ├── MethodNotAllowed (405)
    ├── PayloadTooLarge (413)          body over the configured limit (checked while streaming)
    ├── InferenceFailed (500)          the runtime raised, or an injected fault
    └── Unavailable (503)              not ready, queue full; carries Retry-After

Lower libraries' exceptions (orjson, numpy, onnxruntime) are translated into these at the boundary that
calls them; the REST layer has one handler that renders any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response


class ServingError(Exception):
    status = 500

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ServingError):
    status = 400


class NotFound(ServingError):
    status = 404


class MethodNotAllowed(ServingError):
    status = 405


class PayloadTooLarge(ServingError):
    status = 413


class InferenceFailed(ServingError):
    status = 500


class Unavailable(ServingError):
    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after_s)})


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, headers=dict(headers or {}),
                    media_type="application/json")


def render(exc: ServingError) -> Response:
    return error_response(exc.status, exc.message, exc.headers)


def exception_handlers() -> dict[Any, Any]:
    """Starlette handlers rendering every error as ``{"error": ...}``: ours, and Starlette's own 404/405."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    async def serving_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return render(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route for {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(exc.status_code, message, exc.headers)

    return {ServingError: serving_error, HTTPException: http_error}
