"""serving/http_server.py on loopback with raw sockets: framing, limits, deadlines, pipelining order, refusals.

The gateway and the model server both listen with this server; tests/integration/test_hostile.py drives it
through the real gateway under many hostile connections. These are the single-connection rules."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from serving.http_server import HttpServer, Limits, Request, Response

JSON = [(b"content-type", b"application/json")]
LIMITS = Limits(header_timeout_s=0.5, body_gap_timeout_s=0.5, body_timeout_s=2.0, keepalive_timeout_s=0.5,
                max_body_bytes=1000, max_headers=20, max_header_bytes=2048, sweep_s=0.05)


async def handler(req: Request) -> Response:
    if req.path == "/slow":
        await asyncio.sleep(0.2)
    return Response(200, orjson.dumps({"path": req.path, "body": len(req.body)}), list(JSON))


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    s = HttpServer(handler, "127.0.0.1", 0, limits=LIMITS)
    await s.start()
    task = asyncio.create_task(s.serve())
    yield s
    s.handle_exit()
    await asyncio.wait_for(task, 5)


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 2.0) -> None:
    """Poll ``predicate`` on this event loop (the server runs on it too) until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.005)


async def exchange(server: HttpServer, data: bytes, wait_s: float = 3.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes (or ``wait_s``); what came back and when the close came."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        pass
    finally:
        writer.close()
    return out, time.monotonic() - t0


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     400),
    (b"\x16\x03\x01 not http\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n", 413),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"a" * 2000 + b"\r\n0\r\n\r\n", 413),
    (b"GET /x HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(30)) + b"\r\n", 431),
    (b"GET /x HTTP/1.1\r\nX-a: " + b"a" * 5000 + b"\r\n\r\n", 431),
])
async def test_bad_framing_and_limits_get_a_json_error_and_a_close(server: HttpServer, request_bytes: bytes,
                                                                   status: int) -> None:
    out, took = await exchange(server, request_bytes)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert b"connection: close" in head and set(orjson.loads(body)) == {"error"}
    assert took < 1.0  # answered and closed at once, not at a deadline


@pytest.mark.parametrize("request_bytes", [
    b"GET /x HTTP/1.1\r\nHost: a\r\n",  # headers never finish
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\n0123456789",  # over-stated length
    b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",  # chunks that never end
])
async def test_a_request_that_stalls_gets_408_at_its_deadline(server: HttpServer, request_bytes: bytes) -> None:
    out, took = await exchange(server, request_bytes)
    assert out.startswith(b"HTTP/1.1 408 "), out[:200]
    assert 0.4 <= took < 0.5 + 1.0


async def test_pipelined_requests_are_answered_in_order_and_a_refusal_comes_last(server: HttpServer) -> None:
    """A refused request behind running ones is answered after them, never in their place."""
    out, _ = await exchange(server, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n"
                                    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\nabc")
    statuses = re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", out)
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 413 Request Entity Too Large"], out
    assert out.index(b'"/slow"') < out.index(b'"/b"') < out.index(b"exceeds the limit")


async def test_keep_alive_expect_continue_http10_and_upgrade(server: HttpServer) -> None:
    out, _ = await exchange(server, b"POST /a HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
                                    b"abcGET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert b'"body":3' in out and b'"/b"' in out and out.count(b"connection: close") == 1
    out, _ = await exchange(server, b"GET /old HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in out
    out, _ = await exchange(server, b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in out  # served as HTTP/1.1, then closed


async def test_an_idle_keep_alive_connection_is_closed_and_nothing_leaks(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    t0 = time.monotonic()
    async with asyncio.timeout(3):
        while await reader.read(65536):
            pass
    assert 0.4 <= time.monotonic() - t0 < 1.5  # the keep-alive timeout, within a sweep or two
    writer.close()
    await until(lambda: not server.connections, "the closed connection to be forgotten")
    assert server.buffered == 0 and server.active == 0


async def test_the_body_budget_refuses_before_reading() -> None:
    s = HttpServer(handler, "127.0.0.1", 0, limits=Limits(max_body_bytes=1000, body_budget_bytes=1500))
    await s.start()
    task = asyncio.create_task(s.serve())
    try:
        _, held = await asyncio.open_connection("127.0.0.1", s.port)
        held.write(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nab")  # reserves 1000
        await until(lambda: s.buffered == 1000, "the held request's 1000 declared bytes to be reserved")
        out, _ = await exchange(s, b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 600\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in out
        held.close()
        await until(lambda: s.buffered == 0, "the reservation to be released with the connection")
    finally:
        s.handle_exit()
        await asyncio.wait_for(task, 5)
