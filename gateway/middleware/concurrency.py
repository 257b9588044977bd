"""Load shedding: past ``limit`` requests in flight, new ones get 503 + Retry-After at once instead of queueing
behind the others (a queue only turns overload into timeouts). Health probes are never shed."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import error_response


class ConcurrencyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int, exempt_prefixes: tuple[str, ...] = ("/v2/health",)) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self.app = app
        self.limit = limit
        self.exempt_prefixes = exempt_prefixes
        self.in_flight = 0
        self.shed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.shed += 1
            response = error_response(503, f"gateway overloaded: {self.limit} requests in flight",
                                      {"retry-after": "1", "x-bluegreen-degraded": "load-shed"})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
