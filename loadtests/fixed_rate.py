"""An open-loop load generator: requests sent on a fixed schedule, whatever the answers do.

wrk drives a closed loop: a connection sends again only after its answer came back, so a server that slows
down is sent less, and the latency wrk reports looks better than what a client would see ("coordinated
omission"). Here request ``i`` is due ``i / rate`` seconds after the start, and its latency is measured from that
due time, so waiting for a free connection or behind a slow answer counts, as it does for real clients (what
wrk2 does; wrk2 is not packaged for Debian). The requests are spread over a bounded connection pool.

The generator is Python (asyncio + aiohttp, uvloop when installed) on the same shared cores as the servers it
measures, so it reports its own delay — how late each request left compared with its due time ("send lag") —
and its own CPU over the measured window, beside the CPU of any processes named with ``--cpu-of``. A reader can
then tell when the generator, not the server, was the limit.

Run it as a process so that its caller can account its CPU apart from its own:

    python -m loadtests.fixed_rate http://127.0.0.1:8080/v2/models/digits/infer --rate 800 --duration 10 \\
        --warmup 2 --body-file body.json --header 'Cache-Control: no-cache, no-store' --out result.json

``--body-lines FILE`` sends several bodies in turn (one per line; request ``i`` carries line ``i mod n``).

It writes one JSON document (:func:`summarize`). Latency percentiles are nearest-rank over every answered
request of the measured window (non-2xx answers included, and counted); requests that got no answer are counted
by error type.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from serving.process import process_cpu_s, self_cpu_s

LOOPBACK_PREFIX = "http://127.0.0.1:"
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
START_LEAD_S = 0.05  # the first request is due this long after the loop is ready, not while it is still busy
DEFAULT_CONNECTIONS = 64
DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Schedule:
    """Request ``i`` is due at ``i / rate_per_s``; the first ``warmup_count`` are sent but not measured."""

    rate_per_s: float
    duration_s: float
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"rate must be a positive number, got {self.rate_per_s}")
        if not self.duration_s > 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if not self.warmup_s >= 0:
            raise ValueError(f"warm-up must not be negative, got {self.warmup_s}")

    @property
    def warmup_count(self) -> int:
        """Requests due before ``warmup_s``: those with ``i / rate < warmup_s``."""
        return math.ceil(self.rate_per_s * self.warmup_s - 1e-9)

    @property
    def measured_count(self) -> int:
        return max(1, round(self.rate_per_s * self.duration_s))

    @property
    def total(self) -> int:
        return self.warmup_count + self.measured_count

    def offset_s(self, i: int) -> float:
        """When request ``i`` is due, in seconds after the start."""
        return i / self.rate_per_s

    def due(self, elapsed_s: float) -> int:
        """How many requests are due ``elapsed_s`` after the start (request 0 is due at 0), at most ``total``."""
        if elapsed_s < 0:
            return 0
        return min(self.total, math.floor(elapsed_s * self.rate_per_s + 1e-9) + 1)


class Sample(NamedTuple):
    """One request. Times in seconds; ``status`` 0 means no answer came back (``error`` says why)."""

    lag_s: float  # how late the generator started it, after its due time
    latency_s: float  # due time -> answer read: what an open-loop client sees
    service_s: float  # started -> answer read
    status: int
    error: str | None
    server_timing: dict[str, float] | None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence: the smallest value with at least q% at or below it."""
    if not sorted_values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values) - 1e-9))
    return sorted_values[rank - 1]


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99/p99.9, mean and max of durations given in seconds, in milliseconds."""
    ordered = sorted(v * 1000.0 for v in values_s)
    doc: dict[str, float | None] = {f"p{q:g}": percentile(ordered, q) for q in PERCENTILES}
    doc["mean"] = sum(ordered) / len(ordered) if ordered else None
    doc["max"] = ordered[-1] if ordered else None
    return doc


def parse_server_timing(value: str) -> dict[str, float]:
    """``upstream;dur=1.20, gateway;dur=0.35`` -> ``{"upstream": 1.2, "gateway": 0.35}`` (ms, as sent).

    Metrics without a ``dur`` parameter, or with one that is not a number, are left out.
    """
    timings: dict[str, float] = {}
    for metric in value.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        if not name:
            continue
        for param in params:
            key, sep, raw = param.partition("=")
            if sep and key.strip().lower() == "dur":
                try:
                    timings[name] = float(raw.strip().strip('"'))
                except ValueError:
                    pass
                break
    return timings


def summarize(schedule: Schedule, samples: Sequence[Sample | None], window_s: float,
              cpu_s: Mapping[str, float | None]) -> dict[str, Any]:
    """The report of one run: its measured window only (the warm-up requests are sent, not counted)."""
    measured = samples[schedule.warmup_count:]
    done = [s for s in measured if s is not None]
    answered = [s for s in done if s.status != 0]
    errors = Counter(s.error or "unknown" for s in done if s.status == 0)
    timings: dict[str, list[float]] = {}
    for s in answered:
        for name, dur_ms in (s.server_timing or {}).items():
            timings.setdefault(name, []).append(dur_ms / 1000.0)
    return {
        "rate_per_s": schedule.rate_per_s,
        "duration_s": schedule.duration_s,
        "warmup_s": schedule.warmup_s,
        "warmup_requests": schedule.warmup_count,
        "requests": schedule.measured_count,
        "answered": len(answered),
        "ok": sum(1 for s in answered if 200 <= s.status < 300),
        "non_2xx": sum(1 for s in answered if not 200 <= s.status < 300),
        "errors": dict(sorted(errors.items())),
        "unfinished": len(measured) - len(done),
        "window_s": window_s,
        "answered_per_s": len(answered) / window_s if window_s > 0 else 0.0,
        "latency_ms": distribution_ms([s.latency_s for s in answered]),
        "service_ms": distribution_ms([s.service_s for s in answered]),
        "send_lag_ms": distribution_ms([s.lag_s for s in done]),
        "server_timing_ms": {name: {**distribution_ms(values), "count": len(values)}
                             for name, values in sorted(timings.items())},
        "cpu_s": dict(cpu_s),
        "cores": {name: (None if v is None or window_s <= 0 else v / window_s) for name, v in cpu_s.items()},
    }


def _cpu_snapshot(cpu_of: Mapping[str, int]) -> dict[str, float | None]:
    snapshot: dict[str, float | None] = {"generator": self_cpu_s()}
    snapshot.update({name: process_cpu_s(pid) for name, pid in cpu_of.items()})
    return snapshot


def _cpu_delta(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for name, b in before.items():
        a = after.get(name)
        result[name] = None if a is None or b is None else a - b
    return result


async def drive(url: str, body: bytes | Sequence[bytes], headers: Mapping[str, str], schedule: Schedule, *,
                connections: int = DEFAULT_CONNECTIONS, timeout_s: float = DEFAULT_TIMEOUT_S,
                cpu_of: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Send ``schedule.total`` POSTs of ``body`` to ``url`` on schedule; return :func:`summarize`'s report.

    Given several bodies, request ``i`` carries ``body[i % len(body)]``."""
    import aiohttp

    if not url.startswith(LOOPBACK_PREFIX):
        raise ValueError(f"the load generator targets 127.0.0.1 only, not {url}")
    bodies = [body] if isinstance(body, bytes) else list(body)
    if not bodies:
        raise ValueError("no body to send")
    watched = dict(cpu_of or {})
    samples: list[Sample | None] = [None] * schedule.total
    clock = time.perf_counter
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                    auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
                                    cookie_jar=aiohttp.DummyCookieJar())
    async with session:
        t0 = clock() + START_LEAD_S

        async def one(i: int) -> None:
            due = t0 + schedule.offset_s(i)
            started = clock()
            status, error, timing = 0, None, None
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                    header = resp.headers.get("server-timing")
                    timing = parse_server_timing(header) if header else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            finished = clock()
            samples[i] = Sample(started - due, finished - due, finished - started, status, error, timing)

        tasks: set[asyncio.Task[None]] = set()
        window_start: tuple[float, dict[str, float | None]] | None = None
        loop = asyncio.get_running_loop()
        sent = 0
        # Bounded: every pass either starts the requests now due or sleeps until the next one is due.
        while sent < schedule.total:
            due = schedule.due(clock() - t0)
            while sent < due:
                if sent == schedule.warmup_count:  # the measured window opens with its first request
                    window_start = (t0 + schedule.offset_s(sent), _cpu_snapshot(watched))
                task = loop.create_task(one(sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if sent < schedule.total:
                await asyncio.sleep(max(0.0, t0 + schedule.offset_s(sent) - clock()))
        if tasks:
            await asyncio.gather(*tasks)  # each one ends within timeout_s
        window_end = clock(), _cpu_snapshot(watched)
    assert window_start is not None  # measured_count >= 1, so the window always opens
    window_s = window_end[0] - window_start[0]
    return summarize(schedule, samples, window_s, _cpu_delta(window_start[1], window_end[1]))


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _named_pid(text: str) -> tuple[str, int]:
    name, sep, pid = text.partition("=")
    if not sep or not name or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PID, got {text!r}")
    return name, int(pid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fixed_rate", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="http://127.0.0.1:PORT/... (loopback only)")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds sent at the same rate first, not measured")
    bodies = parser.add_mutually_exclusive_group(required=True)
    bodies.add_argument("--body-file", type=Path, help="the request body, sent as is")
    bodies.add_argument("--body-lines", type=Path, help="several bodies, one per line, sent in turn")
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--header", type=_header, action="append", default=[], metavar="'NAME: VALUE'")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS, help="most open at once")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    parser.add_argument("--cpu-of", type=_named_pid, action="append", default=[], metavar="NAME=PID",
                        help="also report this process's CPU over the measured window")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        schedule = Schedule(args.rate, args.duration, args.warmup)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.connections < 1:
        print("error: --connections must be at least 1", file=sys.stderr)
        return 2
    if not args.url.startswith(LOOPBACK_PREFIX):
        print(f"error: the load generator targets 127.0.0.1 only, not {args.url}", file=sys.stderr)
        return 2
    headers = {"Content-Type": args.content_type, **dict(args.header)}
    if args.body_file is not None:
        body: bytes | list[bytes] = args.body_file.read_bytes()
    else:
        body = [line for line in args.body_lines.read_bytes().splitlines() if line.strip()]
        if not body:
            print(f"error: {args.body_lines} holds no body", file=sys.stderr)
            return 2
    coro = drive(args.url, body, headers, schedule, connections=args.connections,
                 timeout_s=args.timeout, cpu_of=dict(args.cpu_of))
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(coro)
    else:
        report = uvloop.run(coro)
    report.update(url=args.url, connections=args.connections, timeout_s=args.timeout, headers=headers)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
