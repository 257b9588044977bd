"""A lean HTTP/1.1 server on asyncio protocols and httptools' parser, with the limits a public listener needs.

Why not uvicorn: measured on this class of machine (CPU time per proxied request, one run), a bare httptools
server + pooled client cost 33 µs where uvicorn + a raw ASGI app + the same client cost 80 µs — ASGI's
message dicts, the per-request cycle object and its ``receive``/``send`` closures are most of a proxy hop.
uvicorn's httptools protocol also has no header or body read timeout and no header-size limit, so a client
that sends headers one byte a second, or a body that never ends, holds a connection (and an in-flight slot)
for ever. This server reads a whole request — headers and body, each under a deadline and a size limit —
before the handler sees it, so a request costs the handler nothing until it is complete.

Each connection goes through phases (idle, headers, body, busy, closing), each with its own deadline; the state
machine, its deadlines and its flow control are in :mod:`serving.http_connection`. The types a handler sees and
the :class:`Limits` are in :mod:`serving.http_messages`; :class:`AsgiHandler` (:mod:`serving.http_asgi`) serves
an ASGI application on this server. All of them are importable from here.

Violations answer with ``{"error": ...}`` and close: malformed framing (garbage request line, a negative or
non-numeric Content-Length, Content-Length together with chunked) 400; a declared or streamed body over
``max_body_bytes`` 413; more than ``max_headers`` headers or ``max_header_bytes`` of them 431; a body that
would take buffered request bytes of all connections together past ``body_budget_bytes`` 503 with
``Retry-After`` (before it is read). Beyond ``max_connections`` a new connection is closed at once.
Deadlines are checked by one sweep every ``sweep_s`` rather than a timer per request: a deadline costs the
request path one clock read, and is enforced within ``sweep_s`` of its time.

Requests on one connection are answered in order, one at a time (pipelined requests wait their turn: reading
pauses when more arrives while one runs, and while the client does not read what was written). A handler returns a
:class:`Response`, or streams through :meth:`Request.start_stream` / :meth:`Request.write` /
:meth:`Request.end_stream` (chunked) and returns :data:`STREAMED`.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from typing import Any

from serving.http_asgi import AsgiHandler
from serving.http_connection import Connection
from serving.http_messages import (
    STREAMED,
    Answer,
    Handler,
    Headers,
    Limits,
    Request,
    Response,
    error_response,
    status_line,
)

__all__ = ["STREAMED", "Answer", "AsgiHandler", "Handler", "Headers", "HttpServer", "Limits", "Request", "Response",
           "error_response", "status_line"]


class HttpServer:
    """One listener: ``await serve()`` until :meth:`handle_exit` (or ``should_exit``); then it stops accepting,
    lets running requests finish for up to ``graceful_s`` and closes every connection."""

    def __init__(self, handler: Handler, host: str, port: int, *, limits: Limits | None = None,
                 graceful_s: float = 30.0, backlog: int = 4096, name: str = "http",
                 ssl: ssl_module.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl
        """TLS (``serving.tls.server_context``); the handshake must finish within the header timeout, so a
        client that opens a connection and stalls the handshake is dropped like one that stalls its headers."""
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self.graceful_s = graceful_s
        self.backlog = backlog
        self.name = name
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self.buffered = 0
        self.stopping = False
        self._should_exit = False
        self.started = False
        self.refused_connections = 0
        self.refused_requests = 0
        self.budget_refusals = 0
        self.timeouts = {"keepalive": 0, "headers": 0, "body": 0, "send": 0}
        self._server: asyncio.AbstractServer | None = None
        self._exit: asyncio.Event | None = None

    def stats(self) -> dict[str, Any]:
        return {"connections": len(self.connections), "active": self.active, "buffered_bytes": self.buffered,
                "refused_connections": self.refused_connections, "refused_requests": self.refused_requests,
                "budget_refusals": self.budget_refusals, "timeouts": dict(self.timeouts)}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        self._server = await loop.create_server(lambda: Connection(self), self.host, self.port,
                                                backlog=self.backlog, reuse_address=True, ssl=self.ssl,
                                                ssl_handshake_timeout=self.limits.header_timeout_s
                                                if self.ssl is not None else None)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        self.started = True

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._exit is not None:
            self._exit.set()

    def handle_exit(self, sig: int | None = None, frame: object = None) -> None:
        self.should_exit = True

    async def serve(self) -> None:
        if self._server is None:
            await self.start()
        assert self._exit is not None
        sweep = asyncio.get_running_loop().create_task(self._sweep())
        try:
            if self.should_exit:
                self._exit.set()
            await self._exit.wait()
        finally:
            sweep.cancel()
            await self.shutdown()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_s)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.expire(now)

    async def shutdown(self) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.graceful_s)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
