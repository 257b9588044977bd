"""gateway/http_client.py against misbehaving upstreams: raw asyncio servers on 127.0.0.1, scripted per connection.

Every case runs on both event loops the client meets (asyncio's, which the tests and tools use, and uvloop's,
which the gateway runs on: their transports differ in when they report a close). Every case ends with
:func:`finish`, which checks that the pool holds no connection in use and no waiter, closes it, and waits
until the server has seen every socket closed: no connection leaks on either side.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import uvloop

from gateway.errors import UpstreamFailure
from gateway.http_client import ClientLimits, Endpoint, HttpClient, UpstreamResponse
from tests.procs import free_port, routing, start_gateway, start_model_server

HEAD = b"POST /v2/models/digits/infer HTTP/1.1\r\ncontent-type: application/json\r\n"
BODY = b'{"inputs": []}'
CASE_LIMIT_S = 10.0  # a hung case fails here, not at pytest's global timeout

Script = Callable[["Peer"], Awaitable[None]]


def ok(body: bytes = b'{"ok":true}', headers: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"%s 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        version, len(body), headers, body)


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


# ------------------------------------------------------------------------------------------ the scripted server


class Peer:
    """The server side of one accepted connection."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests: list[bytes] = []
        self.extra = b""  # whatever the client sent after the script ended
        self.closed_by_client = False  # EOF or reset from the client (not our own close)
        self.done = asyncio.Event()  # the connection is gone, whichever side ended it
        self._closed_here = False
        self.error: BaseException | None = None

    async def request(self) -> bytes | None:
        """One whole request (head and Content-Length body); None when the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))
            data = head + await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client = True
            return None
        self.requests.append(data)
        return data

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def dribble(self, data: bytes, pause_s: float) -> None:
        """A byte at a time, ``pause_s`` apart (the client's deadline is what ends it)."""
        for i in range(len(data)):
            self.writer.write(data[i:i + 1])
            await self.writer.drain()
            await asyncio.sleep(pause_s)

    async def close(self) -> None:
        """FIN, after what was written."""
        self._closed_here = True
        self.writer.close()
        await self.writer.wait_closed()

    def reset(self) -> None:
        """RST: SO_LINGER with a zero timeout makes close() drop the connection."""
        self._closed_here = True
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def wait_closed_by_client(self, timeout_s: float = 2.0) -> None:
        await asyncio.wait_for(self.done.wait(), timeout_s)
        assert self.closed_by_client, f"connection {self.index}: closed by the server, not the client ({self.error!r})"

    async def _drain_to_eof(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.extra += data
        except ConnectionError:
            pass
        self.closed_by_client = True


async def serve_forever(peer: Peer) -> None:
    while await peer.request() is not None:
        peer.send(ok())


class Server:
    """``scripts[i]`` plays connection ``i``; connections beyond the list get ``default``. After its script the
    connection stays open, read to its end, so that the test sees whether the client closed it."""

    def __init__(self, *scripts: Script, default: Script = serve_forever) -> None:
        self.scripts = scripts
        self.default = default
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.open_now = 0
        self.most_open = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self.peers:
            if not peer.done.is_set():
                peer.writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self._server.wait_closed()
        if exc[0] is None:
            assert not self.errors, self.errors

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        peer = Peer(len(self.peers), reader, writer)
        self.peers.append(peer)
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        script = self.scripts[peer.index] if peer.index < len(self.scripts) else self.default
        try:
            await script(peer)
            if not peer._closed_here:
                await peer._drain_to_eof()
        except ConnectionError:
            peer.closed_by_client = True
        except Exception as exc:
            if not peer._closed_here and writer.transport.is_closing():
                peer.closed_by_client = True  # uvloop raises RuntimeError on a write to a socket the client reset
            else:
                peer.error = exc
                self.errors.append(exc)  # kept for the test to report: asyncio would only log it
        finally:
            if not peer._closed_here:
                writer.transport.abort()
            self.open_now -= 1
            peer.done.set()

    async def all_closed(self, timeout_s: float = 2.0) -> None:
        await asyncio.wait_for(asyncio.gather(*(p.done.wait() for p in self.peers)), timeout_s)


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def go(case: Callable[[], Awaitable[None]]) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(case(), CASE_LIMIT_S)

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(bounded())

    return go


def endpoint(server: Server | str, **limits: float) -> Endpoint:
    url = server if isinstance(server, str) else server.url
    return Endpoint(url, ClientLimits(**limits), asyncio.get_running_loop())  # type: ignore[arg-type]


async def post(ep: Endpoint, timeout_s: float = 2.0) -> UpstreamResponse:
    return await ep.request(HEAD, BODY, timeout_s)


async def failure(ep: Endpoint, timeout_s: float = 2.0) -> UpstreamFailure:
    with pytest.raises(UpstreamFailure) as info:
        await post(ep, timeout_s)
    return info.value


async def until(predicate: Callable[[], object], timeout_s: float = 2.0, what: str = "condition") -> None:
    """Wait on a condition the event loop makes true (bounded; short sleeps)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def finish(ep: Endpoint, server: Server | None = None) -> None:
    """No request left holding a connection or waiting for one; closing the pool closes every socket."""
    stats = ep.stats()
    assert stats["in_use"] == 0 and stats["waiting"] == 0, stats
    assert stats["open"] == stats["idle"] == len(ep._live), (stats, len(ep._live))
    ep.close()
    assert ep.stats()["open"] == 0 and not ep._live and not ep.idle, ep.stats()
    if server is not None:
        await server.all_closed()
    await asyncio.sleep(0)  # the transports' connection_lost callbacks


# ------------------------------------------------------------------------------------------ well-formed answers


def test_content_length_answers_reuse_one_connection(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def binary(peer: Peer) -> None:
            while await peer.request() is not None:
                peer.send(ok(b'{"x":1}\x00\x01', b"inference-header-content-length: 7\r\n"))

        async with Server(binary) as server:
            ep = endpoint(server)
            for _ in range(3):
                resp = await post(ep)
                assert (resp.status, resp.body, resp.content_type, resp.header_length) == (
                    200, b'{"x":1}\x00\x01', "application/json", "7")
            assert len(server.peers) == 1 and len(server.peers[0].requests) == 3
            port = server.url.rsplit(":", 1)[1].encode()
            assert server.peers[0].requests[0] == HEAD + b"host: 127.0.0.1:%s\r\ncontent-length: %d\r\n\r\n%s" % (
                port, len(BODY), BODY)
            assert ep.stats() == {"open": 1, "idle": 1, "in_use": 0, "waiting": 0, "reconnects": 0}
            await finish(ep, server)

    run(case)


def test_chunked_answers_in_pieces(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def pieces(peer: Peer) -> None:
            while await peer.request() is not None:
                data = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                        b"content-type: application/octet-stream\r\n\r\n" + chunked(b"abc", b"d" * 5000, b"e"))
                for i in range(0, len(data), 700):  # split across headers, chunk sizes and chunk data
                    peer.send(data[i:i + 700])
                    await peer.writer.drain()
                    await asyncio.sleep(0.001)

        async with Server(pieces) as server:
            ep = endpoint(server)
            for _ in range(2):
                resp = await post(ep)
                assert resp.status == 200 and resp.body == b"abc" + b"d" * 5000 + b"e"
                assert resp.content_type == "application/octet-stream"
            assert len(server.peers) == 1  # a chunked answer keeps the connection
            await finish(ep, server)

    run(case)


def test_small_headers_with_a_large_body_in_one_read_are_not_too_large(run: Callable[..., None]) -> None:
    """The header limit counts header bytes, not the body bytes that came in the same read."""
    async def case() -> None:
        big = b"x" * 60_000

        async def one_write(peer: Peer) -> None:
            while await peer.request() is not None:
                peer.send(ok(big))

        async with Server(one_write) as server:
            ep = endpoint(server, max_header_bytes=1024)
            assert (await post(ep)).body == big
            await finish(ep, server)

    run(case)


def test_body_until_close(run: Callable[..., None]) -> None:
    """Neither Content-Length nor chunked: the body ends with the connection, which is then never reused."""
    async def case() -> None:
        async def until_eof(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello ")
            await peer.writer.drain()
            await asyncio.sleep(0.01)
            peer.send(b"world")
            await peer.close()

        async def headers_only(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\n\r\n")
            await peer.close()

        async with Server(until_eof, headers_only) as server:
            ep = endpoint(server)
            resp = await post(ep)
            assert (resp.status, resp.body, resp.content_type) == (200, b"hello world", "text/plain")
            resp = await post(ep)  # closed right after the headers: an empty body, complete
            assert (resp.status, resp.body) == (200, b"")
            assert len(server.peers) == 2 and ep.stats()["open"] == 0
            await finish(ep, server)

    run(case)


def test_a_reset_ends_a_body_until_close_as_a_failure(run: Callable[..., None]) -> None:
    """A reset is not the end of a body: the answer is cut short, not complete."""
    async def case() -> None:
        async def reset(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\n\r\npartial")
            await peer.writer.drain()
            await asyncio.sleep(0.02)
            peer.reset()

        async with Server(reset) as server:
            ep = endpoint(server)
            exc = await failure(ep)
            assert exc.sent
            await finish(ep, server)

    run(case)


@pytest.mark.parametrize("answer", [
    ok(version=b"HTTP/1.0"),
    ok(headers=b"connection: close\r\n"),
], ids=["http10", "connection-close"])
def test_answers_that_end_the_connection_are_not_reused(run: Callable[..., None], answer: bytes) -> None:
    async def case() -> None:
        async def once(peer: Peer) -> None:  # answers, then leaves the connection open: the client must close it
            await peer.request()
            peer.send(answer)

        async with Server(once, once) as server:
            ep = endpoint(server)
            assert (await post(ep)).body == b'{"ok":true}'
            await server.peers[0].wait_closed_by_client()
            assert ep.stats()["open"] == 0
            assert (await post(ep)).body == b'{"ok":true}'
            assert len(server.peers) == 2 and server.peers[0].extra == b""  # the second request went elsewhere
            await server.peers[1].wait_closed_by_client()
            await finish(ep, server)

    run(case)


# ------------------------------------------------------------------------------------------ answers cut short


@pytest.mark.parametrize("sent_first", [
    b"",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n0123456789",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
], ids=["before-status-line", "after-status-line", "after-headers", "mid-body", "mid-chunk"])
def test_a_connection_closed_mid_answer_fails_as_sent(run: Callable[..., None], sent_first: bytes) -> None:
    async def case() -> None:
        async def cut(peer: Peer) -> None:
            await peer.request()
            peer.send(sent_first)
            await peer.close()

        async with Server(cut) as server:
            ep = endpoint(server)
            exc = await failure(ep)
            assert exc.sent, exc.reason
            assert "closed" in exc.reason, exc.reason
            # a fresh connection is not sent again: the server may have seen the request
            assert len(server.peers) == 1 and ep.stats()["reconnects"] == 0
            await finish(ep, server)

    run(case)


@pytest.mark.parametrize("answer", [
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: banana\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS handshake
], ids=["ssh", "bad-status", "bad-length", "bad-chunk", "tls"])
def test_garbage_instead_of_http(run: Callable[..., None], answer: bytes) -> None:
    async def case() -> None:
        async def garbage(peer: Peer) -> None:
            await peer.request()
            peer.send(answer)

        async with Server(garbage) as server:
            ep = endpoint(server)
            exc = await failure(ep)
            assert exc.sent and exc.reason.startswith("malformed response"), exc.reason
            await server.peers[0].wait_closed_by_client()  # the client hangs up at once, not at the deadline
            assert (await post(ep)).status == 200  # and the next request goes on a new connection
            assert len(server.peers) == 2
            await finish(ep, server)

    run(case)


def test_an_interim_1xx_answer_is_refused(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def interim(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 100 Continue\r\n\r\n" + ok())

        async with Server(interim) as server:
            ep = endpoint(server)
            exc = await failure(ep)
            assert exc.sent and "interim" in exc.reason
            await server.peers[0].wait_closed_by_client()
            await finish(ep, server)

    run(case)


# ------------------------------------------------------------------------------------------ limits and deadlines


@pytest.mark.exclusive
@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_slow_answer_fails_at_the_deadline(run: Callable[..., None], where: str) -> None:
    async def case() -> None:
        async def slow(peer: Peer) -> None:
            await peer.request()
            if where == "headers":
                await peer.dribble(b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"a" * 1000, 0.01)
            else:
                peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                await peer.dribble(b"b" * 1000, 0.01)

        async with Server(slow) as server:
            ep = endpoint(server)
            t0 = time.monotonic()
            exc = await failure(ep, timeout_s=0.3)
            elapsed = time.monotonic() - t0
            assert (exc.reason, exc.sent) == ("deadline exceeded", True)
            assert 0.28 <= elapsed < 0.3 + 0.5, elapsed
            await server.peers[0].wait_closed_by_client()
            await finish(ep, server)

    run(case)


@pytest.mark.parametrize("dribbled", [False, True], ids=["one-write", "dribbled"])
def test_an_oversized_header_block(run: Callable[..., None], dribbled: bool) -> None:
    async def case() -> None:
        block = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 100) for i in range(40))

        async def big_headers(peer: Peer) -> None:
            await peer.request()
            if dribbled:  # never ends: the limit, not the deadline, must end it
                for i in range(0, 100_000, 512):
                    peer.send(b"x-more-%d: %s\r\n" % (i, b"b" * 500) if i else block)
                    await peer.writer.drain()
                    await asyncio.sleep(0.001)
            else:
                peer.send(block + b"content-length: 0\r\n\r\n")

        async with Server(big_headers) as server:
            ep = endpoint(server, max_header_bytes=2048)
            t0 = time.monotonic()
            exc = await failure(ep, timeout_s=5.0)
            assert (exc.reason, exc.sent) == ("response headers too large", True)
            assert time.monotonic() - t0 < 2.0
            await server.peers[0].wait_closed_by_client()
            await finish(ep, server)

    run(case)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
def test_an_oversized_body(run: Callable[..., None], framing: str) -> None:
    async def case() -> None:
        body = b"z" * 5000

        async def big_body(peer: Peer) -> None:
            await peer.request()
            if framing == "content-length":
                peer.send(ok(body))
            elif framing == "chunked":
                peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(body[:3000], body[3000:]))
            else:
                peer.send(b"HTTP/1.1 200 OK\r\n\r\n" + body)
                await peer.close()

        async with Server(big_body) as server:
            ep = endpoint(server, max_body_bytes=4096)
            exc = await failure(ep)
            assert (exc.reason, exc.sent) == ("response body too large", True)
            await server.all_closed()
            await finish(ep, server)

    run(case)


# ------------------------------------------------------------------------------------------ connecting


@pytest.mark.exclusive
def test_a_refused_connection_is_not_sent(run: Callable[..., None]) -> None:
    async def case() -> None:
        ep = endpoint(f"http://127.0.0.1:{free_port()}")
        t0 = time.monotonic()
        exc = await failure(ep)
        assert not exc.sent and exc.reason.startswith("connect failed"), exc.reason
        assert time.monotonic() - t0 < 0.5
        await finish(ep)

    run(case)


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A 127.0.0.1 listener that never accepts, its backlog filled: a further SYN is dropped, so connect hangs."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):  # bounded: Linux queues backlog + 1 connections, a few more are half open
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            fillers.append(s)
            s.connect_ex(("127.0.0.1", port))
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.settimeout(0.05)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                break
            finally:
                probe.close()
        else:
            pytest.fail("could not fill the listen backlog of a loopback socket")
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest.mark.exclusive
@pytest.mark.parametrize("limit", ["connect-timeout", "deadline"])
def test_a_connect_that_hangs_is_not_sent(run: Callable[..., None], full_backlog: int, limit: str) -> None:
    async def case() -> None:
        ep = endpoint(f"http://127.0.0.1:{full_backlog}", connect_timeout_s=0.2)
        timeout_s = 2.0 if limit == "connect-timeout" else 0.1
        t0 = time.monotonic()
        exc = await failure(ep, timeout_s)
        elapsed = time.monotonic() - t0
        assert not exc.sent and exc.reason == "connect failed: timeout", exc.reason
        bound = min(timeout_s, 0.2)
        assert bound - 0.02 <= elapsed < bound + 0.5, elapsed
        await finish(ep)

    run(case)


# ------------------------------------------------------------------------------------------ the pool


def test_an_idle_connection_closed_by_the_server(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def answer_then_fin(peer: Peer) -> None:
            await peer.request()
            peer.send(ok())
            await peer.writer.drain()
            await peer.close()

        async with Server(answer_then_fin) as server:
            ep = endpoint(server)
            assert (await post(ep)).status == 200
            await server.peers[0].done.wait()
            await until(lambda: ep.stats()["open"] == 0, what="the client to see the FIN")
            assert (await post(ep)).status == 200
            assert len(server.peers) == 2 and ep.stats()["reconnects"] == 0
            await finish(ep, server)

    run(case)


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_pooled_connection_closed_as_the_request_is_written_is_sent_again(run: Callable[..., None],
                                                                           how: str) -> None:
    """The server reads the request on a kept connection and hangs up without a byte: exactly what the client
    sees when the server's FIN crosses the request on the wire. It cannot have seen it: sent again, once."""
    async def case() -> None:
        async def answer_then_drop(peer: Peer) -> None:
            await peer.request()
            peer.send(ok())
            await peer.request()
            if how == "fin":
                await peer.close()
            else:
                peer.reset()

        async with Server(answer_then_drop) as server:
            ep = endpoint(server)
            assert (await post(ep)).status == 200
            assert (await post(ep)).status == 200
            assert ep.stats()["reconnects"] == 1
            assert [len(p.requests) for p in server.peers] == [2, 1]
            await finish(ep, server)

    run(case)


def test_every_stale_pooled_connection_still_gets_the_request_through(run: Callable[..., None]) -> None:
    """A restarted server leaves every kept connection dead: the resend goes on a new connection, not on the
    next dead one from the pool."""
    async def case() -> None:
        async def answer_then_drop(peer: Peer) -> None:
            await peer.request()
            await asyncio.sleep(0.05)  # both requests in flight at once: two connections
            peer.send(ok())
            await peer.request()
            await peer.close()

        async with Server(answer_then_drop, answer_then_drop) as server:
            ep = endpoint(server)
            await asyncio.gather(post(ep), post(ep))
            assert ep.stats()["idle"] == 2
            assert (await post(ep)).status == 200
            assert ep.stats()["reconnects"] == 1
            await finish(ep, server)

    run(case)


def test_a_resend_that_fails_too_is_not_sent_a_third_time(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def answer_then_drop(peer: Peer) -> None:
            await peer.request()
            peer.send(ok())
            await peer.request()
            await peer.close()

        async def drop(peer: Peer) -> None:
            await peer.request()
            await peer.close()

        async with Server(answer_then_drop, drop, drop) as server:
            ep = endpoint(server)
            assert (await post(ep)).status == 200
            exc = await failure(ep)
            assert exc.sent
            assert len(server.peers) == 2 and ep.stats()["reconnects"] == 1
            await finish(ep, server)

    run(case)


@pytest.mark.parametrize("trailer", [
    b"",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEV",
    b"H",
], ids=["later", "whole-answer-same-write", "partial-answer-same-write", "one-byte-same-write"])
def test_bytes_from_the_server_while_idle_drop_the_connection(run: Callable[..., None], trailer: bytes) -> None:
    async def case() -> None:
        async def chatty(peer: Peer) -> None:
            await peer.request()
            if trailer:
                peer.send(ok() + trailer)  # one write: the extra bytes come in the same read as the answer
            else:
                peer.send(ok())
                await until(lambda: ep.stats()["idle"] == 1, what="the connection to be idle")
                peer.send(ok(b'"unasked"'))
            while await peer.request() is not None:  # if the connection were reused, its answer would be right
                peer.send(ok(b'"reused"'))

        async with Server(chatty) as server:
            ep = endpoint(server)
            assert (await post(ep)).body == b'{"ok":true}'
            await server.peers[0].wait_closed_by_client()
            assert (await post(ep)).body == b'{"ok":true}'
            assert len(server.peers) == 2 and len(server.peers[0].requests) == 1
            await finish(ep, server)

    run(case)


def test_the_pool_limit_bounds_connections(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def slow(peer: Peer) -> None:
            while await peer.request() is not None:
                await asyncio.sleep(0.03)
                peer.send(ok())

        async with Server(default=slow) as server:
            ep = endpoint(server, pool_size=2)
            tasks = [asyncio.create_task(post(ep)) for _ in range(5)]
            await until(lambda: ep.stats()["waiting"] == 3, what="three waiters")
            assert ep.stats()["open"] == 2
            assert [r.status for r in await asyncio.gather(*tasks)] == [200] * 5
            assert len(server.peers) == 2 and server.most_open == 2
            await finish(ep, server)

    run(case)


@pytest.mark.exclusive
def test_a_waiter_without_a_connection_by_its_deadline_is_not_sent(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def slow(peer: Peer) -> None:
            while await peer.request() is not None:
                await asyncio.sleep(0.4)
                peer.send(ok())

        async with Server(default=slow) as server:
            ep = endpoint(server, pool_size=1)
            first = asyncio.create_task(post(ep))
            await until(lambda: ep.stats()["in_use"] == 1, what="the first request to hold the connection")
            t0 = time.monotonic()
            exc = await failure(ep, timeout_s=0.1)
            assert not exc.sent and "no pooled connection" in exc.reason, exc.reason
            assert 0.08 <= time.monotonic() - t0 < 0.1 + 0.5
            assert ep.stats()["waiting"] == 0
            assert (await first).status == 200
            assert len(server.peers) == 1
            await finish(ep, server)

    run(case)


def test_a_waiter_cancelled_as_a_connection_is_handed_to_it_gives_it_back(run: Callable[..., None]) -> None:
    async def case() -> None:
        gate = asyncio.Event()

        async def held(peer: Peer) -> None:  # the first answer waits for the test to say so
            await peer.request()
            await gate.wait()
            peer.send(ok())
            await serve_forever(peer)

        async with Server(held) as server:
            ep = endpoint(server, pool_size=1)
            second: asyncio.Task[UpstreamResponse] | None = None

            async def first_then_cancel() -> UpstreamResponse:
                resp = await post(ep)
                # The connection was just handed to the waiter, which has not run yet: cancel it now.
                assert second is not None and not second.done()
                second.cancel()
                return resp

            first = asyncio.create_task(first_then_cancel())
            await until(lambda: ep.stats()["in_use"] == 1, what="the first request to hold the connection")
            second = asyncio.create_task(post(ep))
            await until(lambda: ep.stats()["waiting"] == 1, what="the second request to wait")
            gate.set()
            assert (await first).status == 200
            with pytest.raises(asyncio.CancelledError):
                await second
            assert (await post(ep)).status == 200  # the connection came back to the pool
            assert len(server.peers) == 1
            await finish(ep, server)

    run(case)


def test_a_request_cancelled_by_its_caller_closes_its_connection(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def never(peer: Peer) -> None:  # reads the request, never answers (then waits for the close)
            await peer.request()

        async with Server(never) as server:
            ep = endpoint(server)
            task = asyncio.create_task(post(ep))
            await until(lambda: server.peers and server.peers[0].requests, what="the request to arrive")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert ep.stats()["open"] == 0
            await server.peers[0].wait_closed_by_client()
            assert (await post(ep)).status == 200
            assert len(server.peers) == 2
            await finish(ep, server)

    run(case)


@pytest.mark.exclusive
def test_closing_the_pool_fails_requests_in_flight(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def never(peer: Peer) -> None:  # reads the request, never answers (then waits for the close)
            await peer.request()

        async with Server(never) as server:
            ep = endpoint(server)
            task = asyncio.create_task(post(ep, timeout_s=5.0))
            await until(lambda: server.peers and server.peers[0].requests, what="the request to arrive")
            ep.close()
            t0 = time.monotonic()
            with pytest.raises(UpstreamFailure) as info:
                await task
            assert info.value.sent and time.monotonic() - t0 < 0.5
            await server.peers[0].wait_closed_by_client()
            await finish(ep, server)

    run(case)


def test_idle_connections_expire_in_the_sweep(run: Callable[..., None]) -> None:
    async def case() -> None:
        async with Server() as server:
            client = HttpClient(ClientLimits(keepalive_s=0.2))
            client.start()
            try:
                ep = client.endpoint(server.url)
                assert (await post(ep)).status == 200
                t0 = time.monotonic()
                await server.peers[0].wait_closed_by_client(timeout_s=3.0)
                assert 0.15 <= time.monotonic() - t0 < 1.5  # keepalive_s, rounded up to the next sweep
                assert ep.stats()["open"] == 0
                await finish(ep, server)
            finally:
                await client.close()

    run(case)


def test_expiry_closes_the_least_recently_used_first(run: Callable[..., None]) -> None:
    async def case() -> None:
        async def slowish(peer: Peer) -> None:
            while await peer.request() is not None:
                await asyncio.sleep(0.02)
                peer.send(ok())

        async with Server(default=slowish) as server:
            ep = endpoint(server, keepalive_s=10.0)
            await asyncio.gather(post(ep), post(ep))
            assert ep.stats()["idle"] == 2
            older, newer = ep.idle
            ep.expire_idle(newer.idle_since + 10.0 - 1e-6 if older.idle_since < newer.idle_since else 0.0)
            assert ep.idle == [newer] and ep.stats()["open"] == 1
            await finish(ep, server)

    run(case)


# ------------------------------------------------------------------------------------------ end to end


class GarbageServer:
    """A thread that answers every connection with bytes that are not HTTP (the gateway is another process)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(1.0)
                try:
                    if conn.recv(65536):
                        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                    conn.recv(1)  # wait for the client to hang up
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


ROW = [0, 0, 5, 13, 9, 1, 0, 0] * 8
INFER = "/v2/models/digits/infer"
NO_CACHE = {"cache-control": "no-cache, no-store"}  # every request must reach a backend
INFER_BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]})


@pytest.mark.usefixtures("model_repo")
def test_gateway_fails_over_from_a_garbage_upstream(tmp_path: Path) -> None:
    garbage = GarbageServer()
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    procs = [green]
    try:
        proc, data, _ = start_gateway(tmp_path, routing([garbage.url], [green_url], weights=(100, 0)))
        procs.append(proc)
        with httpx.Client(base_url=data, timeout=10) as c:
            for _ in range(3):
                r = c.post(INFER, content=INFER_BODY, headers=NO_CACHE)
                assert r.status_code == 200, r.text
                assert r.headers["x-bluegreen-color"] == "green"
                assert r.headers["x-bluegreen-degraded"] == "failover"
        assert garbage.connections >= 1
        proc2, data2, _ = start_gateway(tmp_path, routing([garbage.url], [garbage.url]), name="gateway2")
        procs.append(proc2)
        with httpx.Client(base_url=data2, timeout=10) as c:
            r = c.post(INFER, content=INFER_BODY, headers=NO_CACHE)
            assert r.status_code in (502, 503, 504), r.text
            assert "malformed response" in r.json()["error"]
    finally:
        for p in reversed(procs):
            p.stop()
        garbage.close()
