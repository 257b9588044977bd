"""A lean HTTP/1.1 server on asyncio protocols and httptools' parser, with the limits a public listener needs.

Why not uvicorn: measured on this class of machine (CPU time per proxied request, one run), a bare httptools
server + pooled client cost 33 µs where uvicorn + a raw ASGI app + the same client cost 80 µs — ASGI's
message dicts, the per-request cycle object and its ``receive``/``send`` closures are most of a proxy hop.
uvicorn's httptools protocol also has no header or body read timeout and no header-size limit, so a client
that sends headers one byte a second, or a body that never ends, holds a connection (and an in-flight slot)
for ever. This server reads a whole request — headers and body, each under a deadline and a size limit —
before the handler sees it, so a request costs the handler nothing until it is complete.

A connection goes through these phases::

    idle      keep-alive, nothing received yet    deadline: keepalive_timeout_s → closed silently
    headers   request line and headers arriving   deadline: header_timeout_s from the first byte → 408
    body      body arriving                       deadline: body_gap_timeout_s between chunks and
                                                  body_timeout_s in all → 408
    busy      the handler runs, reading paused    no read deadline (the handler has its own)
    closing   the last answer is being flushed    deadline: body_gap_timeout_s → aborted

A client that stops reading what is written would otherwise hold its connection for ever: while an answer
cannot be written out (the transport's buffer is over its high-water mark) nothing more is read or run on that
connection, and if the client takes nothing for ``body_gap_timeout_s`` the connection is closed; a close whose
last bytes the client has not taken within that time becomes an abort. (Not "no progress for that long": the
kernel's send buffer grows while the client does not read, which looks like progress for many seconds.)

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
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import unquote

import httptools
import orjson

log = logging.getLogger(__name__)

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

    def __init__(self, conn: _Connection, method: str, path: str, query: bytes, headers: Headers, body: bytes,
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


class _Refusal(Exception):
    """The request cannot be served: answer ``response`` and close the connection."""

    def __init__(self, response: Response) -> None:
        self.response = response


_LINGER_S = 2.0  # how long a refused connection reads and drops what its client still sends
_LINGER_BYTES = 64 * 1024 * 1024  # and how much at most

# Connection phases (see the module docstring).
_IDLE, _HEADERS, _BODY, _BUSY = 0, 1, 2, 3


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.phase = _IDLE
        self.deadline = 0.0
        self.body_deadline = 0.0
        # The request being read.
        self._url = b""
        self._headers: Headers = []
        self._header_bytes = 0
        self._raw_header_bytes = 0  # received while the headers were incomplete (the parser buffers them)
        self._body: list[bytes] = []
        self._body_len = 0
        self._reserved = 0  # bytes charged to the server's body budget for this request
        self._expect_continue = False
        self._upgrade = False
        # Complete requests waiting their turn, and the one running.
        self._queue: deque[Request] = deque()
        self._running = False
        self._closing = False
        self._deferred: Response | None = None  # a refusal to answer once earlier pipelined requests are answered
        self._lingering = False  # refused: the answer and a FIN are out, the rest of the request is dropped
        self._lingered = 0
        self._reading = True
        self._writable = True
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.gone: asyncio.Future[None] | None = None  # made on demand; done when the connection is lost

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's
        server = self.server
        if len(server.connections) >= self.limits.max_connections:
            server.refused_connections += 1
            self.transport.abort()
            self.transport = None
            return
        server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        # A new connection must start its request as promptly as a request must send its headers.
        self.phase = _IDLE
        self.deadline = time.monotonic() + self.limits.header_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._release_budget()
        self.transport = None
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    def data_received(self, data: bytes) -> None:
        if self._deferred is not None:  # a refusal waits behind earlier answers: nothing more is read
            return
        if self._closing:
            self._lingered += len(data)
            if self._lingered > _LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        if self.phase == _IDLE:
            self.phase = _HEADERS
            self.deadline = time.monotonic() + self.limits.header_timeout_s
        if self.phase == _HEADERS:
            self._raw_header_bytes += len(data)
        if self._running:  # the client sends more while a request runs: read no further than this for now
            self._pause()
        try:
            self.parser.feed_data(data)
        except _Refusal as refusal:
            self._refuse(refusal.response)
            return
        except httptools.HttpParserUpgrade:
            # An Upgrade (h2c, websocket) we do not speak: the request is served as plain HTTP/1.1, and the
            # connection closes after it, since the parser reads nothing after an upgrade.
            self._upgrade = True
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # an exception raised in our callback arrives wrapped
            if isinstance(cause, _Refusal):
                self._refuse(cause.response)
            else:
                self._refuse(error_response(400, f"malformed HTTP request: {_reason(exc)}"))
            return
        if self.phase == _HEADERS and self._raw_header_bytes > self.limits.max_header_bytes:
            # Headers still incomplete and already over the limit (what was received, not what was parsed).
            self._refuse(error_response(431, f"request headers exceed {self.limits.max_header_bytes} bytes"))
            return
        if self._queue and not self._running:
            self._next()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self._writable = False
        self._pause()

    def resume_writing(self) -> None:
        self._writable = True
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()
        if self._running or self._closing:
            return
        # The stall's deadline (see _run) gives way to the phase's own again, counted from now.
        limits = self.limits
        now = time.monotonic()
        if self.phase == _IDLE:
            self.deadline = now + limits.keepalive_timeout_s
        elif self.phase == _HEADERS:
            self.deadline = now + limits.header_timeout_s
        elif self.phase == _BODY:
            self.deadline = min(now + limits.body_gap_timeout_s, self.body_deadline)
        if self._queue:
            self._next()
        else:
            self._resume()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.phase != _HEADERS:  # a keep-alive or pipelined request: its header deadline starts now
            self.phase = _HEADERS
            self.deadline = time.monotonic() + self.limits.header_timeout_s
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_len = 0
        self._expect_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if len(self._headers) >= self.limits.max_headers:
            raise _Refusal(error_response(431, f"more than {self.limits.max_headers} request headers"))
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        limits = self.limits
        if self._header_bytes > limits.max_header_bytes:
            raise _Refusal(error_response(431, f"request headers exceed {limits.max_header_bytes} bytes"))
        declared = -1
        for name, value in self._headers:
            if name == b"content-length":
                declared = int(value)  # the parser has already refused anything but digits
                break
        if declared > limits.max_body_bytes:
            raise _Refusal(error_response(
                413, f"request body of {declared} bytes exceeds the limit of {limits.max_body_bytes} bytes"))
        if declared > 0:
            self._charge(declared)
        now = time.monotonic()
        self._raw_header_bytes = 0
        self.phase = _BODY
        self.body_deadline = now + limits.body_timeout_s
        self.deadline = min(now + limits.body_gap_timeout_s, self.body_deadline)
        if self._expect_continue and declared != 0 and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_len += len(body)
        if self._body_len > self._reserved:  # a chunked body: charged as it arrives
            if self._body_len > self.limits.max_body_bytes:
                raise _Refusal(error_response(
                    413, f"request body exceeds the limit of {self.limits.max_body_bytes} bytes"))
            self._charge(self._body_len - self._reserved)
        self.deadline = min(time.monotonic() + self.limits.body_gap_timeout_s, self.body_deadline)

    def on_message_complete(self) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        url = self._url
        raw_path, _, query = url.partition(b"?")
        path = raw_path.decode("utf-8", "replace")
        if "%" in path:
            path = unquote(path)
        keep_alive = self.parser.should_keep_alive() and not self._upgrade and not self.parser.should_upgrade()
        request = Request(self, self.parser.get_method().decode("ascii", "replace"), path, query, self._headers,
                          body, keep_alive)
        self.phase = _BUSY
        self._queue.append(request)
        if len(self._queue) > 1 or self._running:
            self._pause()  # pipelined: one at a time (a lone request needs no pause, its client waits)

    # ------------------------------------------------------------------ running requests

    def _next(self) -> None:
        request = self._queue.popleft()
        self._running = True
        self.server.active += 1
        task = asyncio.get_running_loop().create_task(self._run(request))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _run(self, request: Request) -> None:
        try:
            response: Answer
            try:
                response = await self.server.handler(request)
            except Exception:
                log.exception("unhandled error answering %s %s", request.method, request.path)
                response = error_response(500, "internal error")
            if response is not STREAMED and self.transport is not None:
                keep_alive = request.keep_alive and not self.server.stopping
                self.write_head(response.status, response.headers, response.body, keep_alive,
                                head=request.method == "HEAD")
                if not keep_alive:
                    self._close_after_write()
            elif not request.keep_alive:
                self._close_after_write()
        finally:
            self.server.active -= 1
            self._running = False
            self._release_budget()
        if self.transport is None or self._closing:
            return
        if self._queue and self._writable:
            self._next()
        elif self._deferred is not None and not self._queue:
            refusal, self._deferred = self._deferred, None
            self.server.refused_requests -= 1  # counted when it was deferred
            self._refuse(refusal)
        elif self.server.stopping:
            self._close_after_write()
        else:
            if self.phase == _BUSY and not self._queue:  # no pipelined request has begun meanwhile
                self.phase = _IDLE
                self.deadline = time.monotonic() + self.limits.keepalive_timeout_s
            if self._writable:
                self._resume()
            else:  # the client is not taking what was written: nothing more runs until it does (resume_writing)
                self.deadline = time.monotonic() + self.limits.body_gap_timeout_s

    def write_head(self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes | None,
                   keep_alive: bool, head: bool = False) -> None:
        parts = [status_line(status)]
        for name, value in headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        if body is None:
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            parts.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if body and not head:
            parts.append(body)
        if self.transport is not None:
            self.transport.write(b"".join(parts))

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drained(self) -> None:
        if self._writable or self.transport is None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    # ------------------------------------------------------------------ flow control and closing

    def _pause(self) -> None:
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self._reading and self.transport is not None and (self._lingering or not self._closing):
            self._reading = True
            self.transport.resume_reading()

    def _charge(self, n: int) -> None:
        server = self.server
        if server.buffered + n > self.limits.body_budget_bytes:
            server.budget_refusals += 1
            raise _Refusal(error_response(503, "the gateway is buffering too many request bytes; retry shortly",
                                          [(b"retry-after", b"1")]))
        server.buffered += n
        self._reserved += n

    def _release_budget(self) -> None:
        if self._reserved:
            self.server.buffered -= self._reserved
            self._reserved = 0

    def _refuse(self, response: Response) -> None:
        """Answer a request that cannot be served and close: nothing after it on this connection is parsed.

        The close lingers (as nginx's ``lingering_close``): the answer and a FIN go out, and what the client
        still sends (the rest of a refused body) is read and dropped for up to ``_LINGER_S``. Closing at once
        with unread bytes would make the kernel reset the connection, and the client could lose the answer."""
        self.server.refused_requests += 1
        if self._running or self._queue:
            # Earlier requests of this connection are answered first, in order; then this refusal (see _run).
            if self._deferred is None:
                self._deferred = response
            self._pause()
            if not self._running:
                self._next()
            return
        self._release_budget()
        transport = self.transport
        if transport is None or self._closing:
            self._close_after_write()
            return
        self.write_head(response.status, response.headers, response.body, keep_alive=False)
        self._closing = True
        self._queue.clear()
        if not transport.can_write_eof():
            self._close_after_write()
            return
        transport.write_eof()
        self._lingering = True
        self.deadline = time.monotonic() + _LINGER_S
        self._resume()

    def _close_after_write(self) -> None:
        self._closing = True
        self._queue.clear()
        if self.transport is not None:
            self.transport.close()  # flushes what was written, then closes (see expire for a client that won't read)
            self.deadline = time.monotonic() + self.limits.body_gap_timeout_s

    def expire(self, now: float) -> None:
        """Called by the sweep: enforce the phase's deadline."""
        if now < self.deadline:
            return
        if self._closing:
            transport = self.transport
            if transport is None:
                return
            if self._lingering:  # the refused request's rest has had its time: close, flushing the answer
                self._lingering = False
                self._close_after_write()
                return
            self.server.timeouts["send"] += 1  # the client has not taken the rest in time: give up on it
            transport.abort()
            return
        if self._running:
            return
        if not self._writable:  # answers the client has not taken for body_gap_timeout_s (see _run)
            self.server.timeouts["send"] += 1
            self._close_after_write()
        elif self.phase == _BUSY:
            return
        elif self.phase == _IDLE:
            self.server.timeouts["keepalive"] += 1
            self._close_after_write()
        elif self.phase == _HEADERS:
            self.server.timeouts["headers"] += 1
            self._refuse(error_response(408, f"request headers not received within "
                                             f"{self.limits.header_timeout_s:g} s"))
        else:
            self.server.timeouts["body"] += 1
            self._refuse(error_response(408, "request body not received in time (no data for "
                                             f"{self.limits.body_gap_timeout_s:g} s, or not all within "
                                             f"{self.limits.body_timeout_s:g} s)"))

    def shutdown(self) -> None:
        """Graceful stop: close now if nothing is running; otherwise after the current answer."""
        if not self._running and not self._queue:
            self._close_after_write()


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:120]


class HttpServer:
    """One listener: ``await serve()`` until :meth:`handle_exit` (or ``should_exit``); then it stops accepting,
    lets running requests finish for up to ``graceful_s`` and closes every connection."""

    def __init__(self, handler: Handler, host: str, port: int, *, limits: Limits | None = None,
                 graceful_s: float = 30.0, backlog: int = 4096, name: str = "http") -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self.graceful_s = graceful_s
        self.backlog = backlog
        self.name = name
        self.connections: set[_Connection] = set()
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
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port,
                                                backlog=self.backlog, reuse_address=True)
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


class AsgiHandler:
    """Serve an ASGI application (HTTP scopes only, no lifespan) on :class:`HttpServer`: for listeners where
    a framework's routing is worth its cost (the admin API), with the same limits as the data listener.
    A response with a ``content-length`` is sent in one write; one without is streamed chunked."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, scheme: str = "http") -> None:
        self.app = app
        self.scheme = scheme

    async def __call__(self, request: Request) -> Response:
        conn = request._conn
        server_addr = conn.transport.get_extra_info("sockname") if conn.transport is not None else None
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": self.scheme, "path": request.path,
            "raw_path": request.path.encode(), "query_string": request.query, "root_path": "",
            "headers": request.headers, "client": request.client,
            "server": tuple(server_addr[:2]) if isinstance(server_addr, tuple) else None, "state": request.state,
        }
        body_sent = False
        status = 500
        headers: Headers = []
        chunks: list[bytes] = []
        streaming = started = done = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await request.wait_disconnected()  # nothing more will come: wait for the client to go
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers, streaming, started, done
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                raw = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
                streaming = not any(k == b"content-length" for k, _ in raw)
                headers = [(k, v) for k, v in raw if k not in (b"content-length", b"transfer-encoding", b"connection")]
            elif kind == "http.response.body" and not done:
                chunk = bytes(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if not streaming:
                    chunks.append(chunk)
                    return
                if not started:
                    request.start_stream(status, headers)
                    started = True
                request.write(chunk)
                if more:
                    await request.drain()
                else:
                    request.end_stream()
                    done = True

        await self.app(scope, receive, send)
        if streaming and started:
            if not done:
                request.end_stream()
            return STREAMED
        return Response(status, b"".join(chunks), headers)
