"""A closed-loop load generator in this process: ``concurrency`` workers, each sending its next request as soon as
the last one is answered (what wrk does, in Python, so that a caller without wrk — ``bluegreen validate`` — can
measure latency and throughput and account the generator's CPU as its own).

Closed loop means a slower server is sent less: the latency percentiles are those of answered requests at that
concurrency, not what an open-loop client would see (:mod:`loadtests.fixed_rate` measures that). Only requests
sent after the warm-up and answered before the end count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from loadtests.fixed_rate import percentile
from serving.process import process_cpu_s, self_cpu_s

DEFAULT_TIMEOUT_S = 10.0


@dataclass
class ClosedLoopResult:
    """One closed-loop run: answers OK and errors by kind in the measured window, the OK answers' latencies
    (ascending), and the CPU this process (the generator) and the watched server used over the whole run."""

    concurrency: int
    duration_s: float
    ok: int
    errors: dict[str, int]
    latencies_ms: list[float] = field(repr=False)
    generator_cpu_s: float
    server_cpu_s: float | None

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s

    def p(self, q: float) -> float | None:
        """Nearest-rank percentile ``q`` of the OK answers' latency, ms; None when nothing was answered."""
        return percentile(self.latencies_ms, q)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it; plain asyncio only costs the generator more CPU
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _drive(url: str, bodies: Sequence[bytes], concurrency: int, warmup_s: float, duration_s: float,
                 timeout_s: float) -> tuple[int, dict[str, int], list[float]]:
    import aiohttp

    ok = 0
    errors: dict[str, int] = {}
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"content-type": "application/json"}
    clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
    begin = clock() + warmup_s
    end = begin + duration_s

    async def worker(offset: int) -> None:
        nonlocal ok
        i = offset
        while True:
            sent = clock()
            if sent >= end:
                return
            body = bodies[i % len(bodies)]
            i += concurrency
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                error = None if status == 200 else f"HTTP {status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            done = clock()
            if sent < begin or done > end:
                continue
            if error is None:
                ok += 1
                latencies.append((done - sent) * 1000.0)
            else:
                errors[error] = errors.get(error, 0) + 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    latencies.sort()
    return ok, errors, latencies


def run(url: str, bodies: Sequence[bytes], concurrency: int, duration_s: float, warmup_s: float, *,
        server_pid: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> ClosedLoopResult:
    """POST ``bodies`` (JSON, in turn) to ``url`` from ``concurrency`` workers for ``warmup_s + duration_s``;
    ``server_pid``: the server process whose CPU to read around the run (None: not read)."""
    if not bodies:
        raise ValueError("no body to send")
    if concurrency < 1 or not duration_s > 0:
        raise ValueError(f"concurrency must be >= 1 and duration > 0, got {concurrency} and {duration_s}")
    cpu0, server0 = self_cpu_s(), process_cpu_s(server_pid)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        ok, errors, latencies = runner.run(_drive(url, bodies, concurrency, warmup_s, duration_s, timeout_s))
    cpu1, server1 = self_cpu_s(), process_cpu_s(server_pid)
    server_cpu = server1 - server0 if server0 is not None and server1 is not None else None
    return ClosedLoopResult(concurrency, duration_s, ok, errors, latencies, cpu1 - cpu0, server_cpu)
