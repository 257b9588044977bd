"""The per-connection state machine of :class:`~serving.http_server.HttpServer`: httptools' parser callbacks,
deadlines by phase, flow control, pipelining order, refusals with a lingering close.

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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote

import httptools

from serving.http_messages import STREAMED, Answer, Headers, Request, Response, error_response, status_line

if TYPE_CHECKING:
    from serving.http_server import HttpServer

log = logging.getLogger("serving.http_server")  # the name operators know (and filter on) from before the split


class _Refusal(Exception):
    """The request cannot be served: answer ``response`` and close the connection."""

    def __init__(self, response: Response) -> None:
        self.response = response


_LINGER_S = 2.0  # how long a refused connection reads and drops what its client still sends
_LINGER_BYTES = 64 * 1024 * 1024  # and how much at most

# Connection phases (see the module docstring).
_IDLE, _HEADERS, _BODY, _BUSY = 0, 1, 2, 3


class Connection(asyncio.Protocol):
    """One client connection of ``server``: reads requests whole under the limits, runs them one at a time in
    order through ``server.handler``, writes the answers, and enforces the phase's deadline when swept."""

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
