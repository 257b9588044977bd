"""Hostile HTTP/1.1 clients on raw sockets, and a steady normal client beside them, to show what a listener's
limits do under attack. Loopback only; every connection and every loop is bounded in count and in time.

What a public listener must survive, each as a *sender* (what the client writes; it never reads):

* :func:`partial_body`  headers complete, ``Content-Length`` larger than what is sent, then silence
  (2,000 of these filled the gateway's in-flight limit when it counted a request from its first byte);
* :func:`slowloris`     header bytes one per ``interval_s``, never finishing the headers;
* :func:`endless_chunked` a chunked body that sends a byte every ``interval_s`` and never ends;
* :func:`non_reader`    (a runner of its own) pipelines requests and never reads the answers;
* :func:`raw`           any bytes at once: :data:`MALFORMED` holds garbage request lines, bad Content-Lengths,
  Content-Length with chunked, 100,000 headers and one 8 MB header.

:func:`connection` runs one sender on one connection and records when the server answered, what status it sent
and when it closed the connection (EOF or reset), or that it was still open at the connection's own limit.
:func:`hold` keeps ``n`` such connections open at once (reopening each one the server closes, until a given
time: an attacker reconnects), and :func:`steady` is the normal client: ``rate`` requests a second on schedule
(open loop: latency counts from the due time) over a few keep-alive connections, each recorded with its
status. ``python -m loadtests.hostile URL`` runs the flood (unfinished bodies + slowloris + a steady client)
against a listener and prints one JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
KEEP_ANSWER_BYTES = 4096  # of an answer, what is kept (status line, headers, the start of the body)
OPEN_BATCH = 200  # connections opened together: the kernel's SYN backlog (tcp_max_syn_backlog) is ~2,048

Sender = Callable[[asyncio.StreamWriter], Awaitable[None]]


class Clock:
    """Seconds since the harness started: every time in an :class:`Outcome` is on this clock."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class Outcome:
    """One hostile connection. Times in seconds on the harness's :class:`Clock`."""

    kind: str
    opened_s: float
    answered_s: float | None = None
    """When the first bytes of an answer arrived."""
    closed_s: float | None = None
    """When the server closed the connection (EOF or reset); None: still open at the connection's limit."""
    status: int | None = None
    body: bytes = b""
    """The start of the answer's body (after the headers)."""
    reset: bool = False
    """The server's close was a reset (RST), not an orderly EOF."""
    error: str | None = None
    """The connection could not be opened."""

    @property
    def lifetime_s(self) -> float | None:
        return None if self.closed_s is None else self.closed_s - self.opened_s

    @property
    def answer_s(self) -> float | None:
        return None if self.answered_s is None else self.answered_s - self.opened_s


# ---------------------------------------------------------------------------------------------------------- senders


def request_head(method: str, path: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _forever() -> None:
    await asyncio.Event().wait()  # cancelled by connection() when the server closes or the limit is reached


def partial_body(path: str = "/", declared: int = 5000, sent: int = 10) -> Sender:
    """Complete headers declaring ``declared`` body bytes, ``sent`` of them, then silence."""
    data = request_head("POST", path, [("Content-Type", "application/json"), ("Content-Length", str(declared))])
    data += b"0" * sent

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await _forever()

    return send


def slowloris(path: str = "/", interval_s: float = 1.0) -> Sender:
    """The request line and then header bytes, one per ``interval_s``, never ending the headers."""
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()

    async def send(writer: asyncio.StreamWriter) -> None:
        i = 0
        while True:  # ends when connection() cancels it
            if i < len(head):
                writer.write(head[i:i + 1])
            else:
                writer.write(b"X-Slow-%d: a\r\n" % i if i % 16 == 0 else b"a")
            await writer.drain()
            i += 1
            await asyncio.sleep(interval_s)

    return send


def endless_chunked(path: str = "/", interval_s: float = 0.5) -> Sender:
    """A chunked body with a one-byte chunk every ``interval_s`` (well under any gap timeout), never ending."""
    head = request_head("POST", path, [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")])

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        while True:  # ends when connection() cancels it
            writer.write(b"1\r\n \r\n")
            await writer.drain()
            await asyncio.sleep(interval_s)

    return send


def raw(data: bytes, piece: int = 256 * 1024) -> Sender:
    """``data`` as fast as the server reads it (in pieces, so a refusal midway stops the sending), then silence."""

    async def send(writer: asyncio.StreamWriter) -> None:
        for start in range(0, len(data), piece):
            writer.write(data[start:start + piece])
            await writer.drain()
        await _forever()

    return send


def malformed(path: str = "/") -> dict[str, bytes]:
    """Framing and size violations that a listener must refuse at once with a 4xx (not a timeout)."""
    post = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()
    return {
        "garbage request line": b"\x16\x03\x01 GARBAGE !!\r\n\r\n",
        "request line without version": b"GET\r\n\r\n",
        "negative content-length": post + b"Content-Length: -5\r\n\r\n{}",
        "non-numeric content-length": post + b"Content-Length: ten\r\n\r\n{}",
        "content-length and chunked": post + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"2\r\n{}\r\n0\r\n\r\n",
        "100,000 headers": post + b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
                           + b"Content-Length: 2\r\n\r\n{}",
        "one 8 MB header": post + b"X-Big: " + b"a" * (8 * 1024 * 1024) + b"\r\nContent-Length: 2\r\n\r\n{}",
    }


def over_limit_body(path: str, max_body_bytes: int) -> bytes:
    """A request whose declared body is one byte over ``max_body_bytes`` (only its head is ever needed)."""
    return request_head("POST", path, [("Content-Type", "application/json"),
                                        ("Content-Length", str(max_body_bytes + 1))]) + b"{"


# ----------------------------------------------------------------------------------------------- running senders


def _parse_answer(data: bytes) -> tuple[int | None, bytes]:
    if not data.startswith(b"HTTP/1."):
        return None, b""
    try:
        status = int(data[9:12])
    except ValueError:
        return None, b""
    head_end = data.find(b"\r\n\r\n")
    return status, data[head_end + 4:] if head_end >= 0 else b""


async def _guarded(sender: Sender, writer: asyncio.StreamWriter) -> None:
    try:
        await sender(writer)
    except (OSError, RuntimeError):  # the server closed while we wrote: connection() records the close
        pass


async def connection(host: str, port: int, kind: str, sender: Sender, clock: Clock, max_s: float, *,
                     loopback_only: bool = True) -> Outcome:
    """Open a connection, run ``sender`` on it, and read until the server closes it or ``max_s`` passes.

    ``loopback_only=False`` is for one polite request a caller was pointed at (``bluegreen validate --url``'s
    oversized body), never for a flood."""
    if loopback_only and host not in LOOPBACK_HOSTS:
        raise ValueError(f"the hostile harness only targets loopback, not {host!r}")
    opened = clock.now()
    out = Outcome(kind, opened)
    end = time.monotonic() + max_s
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), max_s)
    except (OSError, TimeoutError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    sending = asyncio.get_running_loop().create_task(_guarded(sender, writer))
    kept = b""
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            except OSError:  # reset: whatever was read before stays recorded
                out.closed_s = clock.now()
                out.reset = True
                break
            if not chunk:
                out.closed_s = clock.now()
                break
            if out.answered_s is None:
                out.answered_s = clock.now()
            if len(kept) < KEEP_ANSWER_BYTES:
                kept += chunk[:KEEP_ANSWER_BYTES - len(kept)]
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.transport.abort()  # nothing more to say; a FIN handshake would only cost time
    out.status, out.body = _parse_answer(kept)
    return out


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of a socket (Linux ``tcp_info.tcpi_state``; 1 is ESTABLISHED)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


async def non_reader(host: str, port: int, kind: str, request: bytes, clock: Clock, *, count: int = 60_000,
                     send_s: float = 1.0, max_s: float = 30.0) -> Outcome:
    """A client that pipelines ``count`` copies of ``request`` (for ``send_s`` at most) and never reads an
    answer, with a 4 KiB receive buffer so that the server's answers back up at once. Records when the server
    gave up on it (the connection left ESTABLISHED: a reset, or a close), without reading (Linux only)."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the hostile harness only targets loopback, not {host!r}")
    loop = asyncio.get_running_loop()
    out = Outcome(kind, clock.now())
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: sets the window
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), max_s)
        except (OSError, TimeoutError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            return out
        data = memoryview(request * count)
        sent, send_end = 0, time.monotonic() + send_s
        while sent < len(data) and time.monotonic() < send_end:
            try:
                sent += sock.send(data[sent:sent + 65536])
            except BlockingIOError:  # the server is not reading: that is the point
                await asyncio.sleep(0.01)
            except OSError:
                break
        end = time.monotonic() + max_s
        while time.monotonic() < end:  # bounded: poll the state, never read
            if _tcp_state(sock) != 1:
                out.closed_s = clock.now()
                out.reset = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
                break
            await asyncio.sleep(0.05)
        return out
    finally:
        sock.close()


async def hold(host: str, port: int, kind: str, make: Callable[[], Sender], n: int, clock: Clock, *,
               max_s: float, reopen_until_s: float | None = None, max_rounds: int = 100) -> list[Outcome]:
    """``n`` connections at once, each given ``max_s`` to be closed by the server. With ``reopen_until_s``
    (on the clock), each connection the server closes is opened again until then (at most ``max_rounds``
    times per slot), so that ``n`` stay open throughout; every connection is recorded."""
    outcomes: list[Outcome] = []

    async def slot() -> None:
        for _ in range(max_rounds):
            out = await connection(host, port, kind, make(), clock, max_s)
            outcomes.append(out)
            if reopen_until_s is None or out.closed_s is None or clock.now() >= reopen_until_s:
                return
            if out.error is not None:
                await asyncio.sleep(0.1)  # refused: do not spin

    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    for start in range(0, n, OPEN_BATCH):
        tasks += [loop.create_task(slot()) for _ in range(min(OPEN_BATCH, n - start))]
        await asyncio.sleep(0.02)  # let this batch connect before the next
    await asyncio.gather(*tasks)
    return outcomes


@dataclass
class Sample:
    """One normal request: due ``due_s`` on the clock; ``status`` 0 when no answer came (``error`` says why)."""

    due_s: float
    latency_s: float
    status: int
    error: str | None = None


async def steady(base_url: str, path: str, body: bytes, clock: Clock, *, rate: float, duration_s: float,
                 headers: Mapping[str, str] | None = None, connections: int = 8, timeout_s: float = 5.0,
                 start_s: float | None = None) -> list[Sample]:
    """A normal client: ``rate`` POSTs a second for ``duration_s`` on schedule over at most ``connections``
    keep-alive connections; latency counts from each request's due time (open loop)."""
    _check_loopback(base_url)
    total = max(1, round(rate * duration_s))
    begin = clock.now() if start_s is None else start_s
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        async def one(due: float) -> None:
            try:
                r = await client.post(path, content=body, headers=dict(headers or {}))
                samples.append(Sample(due, clock.now() - due, r.status_code))
            except httpx.HTTPError as exc:
                samples.append(Sample(due, clock.now() - due, 0, f"{type(exc).__name__}: {exc}"))

        tasks = []
        for i in range(total):
            due = begin + i / rate
            delay = due - clock.now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.get_running_loop().create_task(one(due)))
        await asyncio.gather(*tasks)
    return samples


# ----------------------------------------------------------------------------------------------------- summaries


def summarize_outcomes(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """Per kind: connections, how many the server closed (and how: status or reset), lifetimes."""
    by_kind: dict[str, list[Outcome]] = {}
    for out in outcomes:
        by_kind.setdefault(out.kind, []).append(out)
    doc: dict[str, dict[str, Any]] = {}
    for kind, outs in by_kind.items():
        lifetimes = sorted(o.lifetime_s for o in outs if o.lifetime_s is not None)
        doc[kind] = {
            "connections": len(outs),
            "closed": len(lifetimes),
            "still_open": sum(1 for o in outs if o.closed_s is None and o.error is None),
            "not_opened": sum(1 for o in outs if o.error is not None),
            "statuses": dict(Counter(str(o.status) for o in outs)),
            "resets": sum(1 for o in outs if o.reset),
            "lifetime_s": {"min": lifetimes[0], "p50": lifetimes[len(lifetimes) // 2],
                           "max": lifetimes[-1]} if lifetimes else None,
        }
    return doc


def summarize_samples(samples: Sequence[Sample]) -> dict[str, Any]:
    ok = sum(1 for s in samples if 200 <= s.status < 300)
    latencies = sorted(s.latency_s for s in samples)
    return {"requests": len(samples), "ok": ok, "success_ratio": ok / len(samples) if samples else None,
            "statuses": dict(Counter(str(s.status) for s in samples)),
            "errors": dict(Counter(s.error.split(":")[0] for s in samples if s.error)),
            "latency_ms": {"p50": latencies[len(latencies) // 2] * 1000,
                           "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
                           "max": latencies[-1] * 1000} if latencies else None}


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (thousands of sockets); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the hostile harness only targets loopback, not {host!r}")


async def flood(base_url: str, path: str, body: bytes, *, unfinished: int, slow: int, rate: float,
                duration_s: float, max_s: float, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``unfinished`` partial bodies and ``slow`` slowloris connections held open (reopened when closed) for
    ``duration_s`` while :func:`steady` sends ``rate`` requests a second; each hostile connection is given
    ``max_s`` to be closed by the server. Returns the outcomes, the samples and their summaries."""
    _check_loopback(base_url)
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    clock = Clock()
    until = duration_s + 0.5
    hostile = asyncio.gather(
        hold(host, port, "unfinished body", lambda: partial_body(path), unfinished, clock, max_s=max_s,
             reopen_until_s=until),
        hold(host, port, "slowloris", lambda: slowloris(path), slow, clock, max_s=max_s, reopen_until_s=until))
    await asyncio.sleep(0.5)  # the first wave is open before the normal client starts
    samples = await steady(base_url, path, body, clock, rate=rate, duration_s=duration_s, headers=headers)
    waves = await hostile
    outcomes = [o for wave in waves for o in wave]
    return {"outcomes": outcomes, "samples": samples,
            "summary": {"hostile": summarize_outcomes(outcomes), "normal": summarize_samples(samples)}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the listener's base URL (loopback), e.g. http://127.0.0.1:8080")
    p.add_argument("--path", default="/v2/models/digits/infer")
    p.add_argument("--body-file", help="the normal client's request body (default: a digits request)")
    p.add_argument("--header", action="append", default=[], help="'Name: value' for the normal client")
    p.add_argument("--unfinished", type=int, default=2000)
    p.add_argument("--slowloris", type=int, default=500)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-s", type=float, default=30.0, help="how long a hostile connection may stay open")
    args = p.parse_args(argv)
    if args.body_file:
        with open(args.body_file, "rb") as f:
            body = f.read()
    else:
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "data": [float(i % 16) for i in range(64)]}]}).encode()
    headers = dict(h.split(":", 1) for h in args.header)
    raise_fd_limit()
    result = asyncio.run(flood(args.url, args.path, body, unfinished=args.unfinished, slow=args.slowloris,
                               rate=args.rate, duration_s=args.duration, max_s=args.max_s,
                               headers={k.strip(): v.strip() for k, v in headers.items()}))
    json.dump(result["summary"], sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
