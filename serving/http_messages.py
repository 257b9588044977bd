"""What a handler of :class:`~serving.http_server.HttpServer` sees and returns, and what a listener tolerates.

Kept apart from the connection's state machine (:mod:`serving.http_connection`) so that handlers, the ASGI
adapter and the settings read a short module of plain types instead of the protocol code."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from serving.http_connection import Connection

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Limits:
    """What one listener tolerates from its clients. The defaults are those of a public-facing listener."""

    header_timeout_s: float = 10.0
    """The request line and every header must arrive within this time of the request's first byte."""
    body_gap_timeout_s: float = 15.0
    """Longest silence while a body is arriving."""
    body_timeout_s: float = 60.0
    """A whole body must arrive within this time of the end of the headers."""
    keepalive_timeout_s: float = 30.0
    """An idle keep-alive connection is closed after this long."""
    max_headers: int = 100
    """Most header lines in a request."""
    max_header_bytes: int = 64 * 1024
    """Most bytes of request line and headers together."""
    max_body_bytes: int = 16 * 1024 * 1024
    """A larger body gets 413: at once when its Content-Length says so, else when the stream passes it."""
    body_budget_bytes: int = 128 * 1024 * 1024
    """Request bytes buffered by all connections together (declared lengths count in full when the headers
    arrive); a body that would pass it gets 503 + Retry-After before it is read."""
    max_connections: int = 10_000
    """Open client connections; beyond it a new connection is closed at once."""
    sweep_s: float = 0.25
    """How often deadlines are checked."""


class Request:
    """A complete request. ``headers`` keeps the order received, names lower-cased."""

    __slots__ = ("_conn", "body", "client", "headers", "keep_alive", "method", "path", "query", "state")

    def __init__(self, conn: Connection, method: str, path: str, query: bytes, headers: Headers, body: bytes,
                 keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.client = conn.client
        self.state: dict[str, Any] = {}

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def local_address(self) -> tuple[str, int] | None:
        """The listening socket's address this request came in on (``None`` once the connection is gone)."""
        transport = self._conn.transport
        addr = transport.get_extra_info("sockname") if transport is not None else None
        return (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) and len(addr) >= 2 else None

    @property
    def disconnected(self) -> bool:
        return self._conn.transport is None or self._conn.transport.is_closing()

    async def wait_disconnected(self) -> None:
        conn = self._conn
        if conn.transport is None:
            return
        if conn.gone is None:
            conn.gone = asyncio.get_running_loop().create_future()
        await asyncio.shield(conn.gone)

    # ------------------------------------------------------------------ streaming

    def start_stream(self, status: int, headers: Headers) -> None:
        self._conn.write_head(status, headers, None, self.keep_alive)

    def write(self, chunk: bytes) -> None:
        if chunk:
            self._conn.write_raw(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    def end_stream(self) -> None:
        self._conn.write_raw(b"0\r\n\r\n")

    async def drain(self) -> None:
        """Wait until the client has read what was written (for long streams)."""
        await self._conn.drained()


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: Headers) -> None:
        self.status = status
        self.body = body
        self.headers = headers


STREAMED = Response(0, b"", [])
"""Returned by a handler that answered through :meth:`Request.start_stream`."""


class Answer(Protocol):
    """What a handler returns: :class:`Response`, or any object with these three attributes."""

    status: int
    body: bytes
    headers: Headers


Handler = Callable[[Request], Awaitable[Answer]]

_JSON = (b"content-type", b"application/json")
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def error_response(status: int, message: str, extra: Headers | None = None) -> Response:
    return Response(status, orjson.dumps({"error": message}), [_JSON, *(extra or ())])
