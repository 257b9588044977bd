"""Failover without client-visible errors: a color that dies or hangs under load, a client deadline shorter
than the attempt timeout, both colors hung with a stale answer at hand. Real model servers and a real gateway
on loopback; faults by signals and by the TCP fault proxy. Bounds are behaviour bounds with wide margins."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.expect import describe, expect, expect_all
from tests.integration.faultproxy import FaultProxy
from tests.integration.test_gateway import BODY, INFER, NO_CACHE
from tests.procs import free_port, routing, start_gateway, start_model_server, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")

CONCURRENCY = 64


@pytest.fixture(scope="module")
def blue_url(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[str]:
    """Blue is never harmed here: one for the module (each gateway keeps its own breakers)."""
    proc, url = start_model_server(tmp_path_factory.mktemp("blue"), ["digits:1"])
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def healthy_green_url(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[str]:
    """A green that tests fault only through a proxy in front of it; the kill and the SIGSTOP start their own."""
    proc, url = start_model_server(tmp_path_factory.mktemp("green"), ["digits:2"])
    yield url
    proc.stop()


async def _load(data: str, fault_after: int, seconds_after: float, fault: Callable[[], object],
                answers_after: int = 0) -> tuple[list[tuple[int, str]], int, list[str]]:
    """``CONCURRENCY`` clients; ``fault()`` runs once ``fault_after`` answers have come (a count, not a time: on a
    busy machine a fixed delay may pass before the first answer), and the load goes on ``seconds_after`` more and
    until ``answers_after`` answers have come after the fault (bounded: 30 s for each part).
    (status, color) per answer, how many answers came before the fault, and every answer that was not a 200
    described in full (its body says which deadline, breaker or upstream refused)."""
    log: list[tuple[int, str]] = []
    unexpected: list[str] = []
    before: list[int] = []
    stop = time.monotonic() + 30.0  # until the fault, bounded; then as the docstring says
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    def going() -> bool:
        now = time.monotonic()
        if not before:
            return now < stop
        return now < stop or (len(log) - before[0] < answers_after and now < stop + 30.0)

    async with httpx.AsyncClient(base_url=data, timeout=20, limits=limits) as c:
        async def worker() -> None:
            while going():
                r = await c.post(INFER, content=BODY, headers=NO_CACHE)
                log.append((r.status_code, r.headers.get("x-bluegreen-color", "")))
                if r.status_code != 200:
                    unexpected.append(f"after {len(log)} answers: {describe(r)}")

        async def injector() -> None:
            nonlocal stop
            while len(log) < fault_after:
                assert time.monotonic() < stop, f"only {len(log)} answers in 30 s, waiting for {fault_after}"
                await asyncio.sleep(0.005)
            before.append(len(log))
            fault()
            stop = time.monotonic() + seconds_after

        await asyncio.gather(injector(), *(worker() for _ in range(CONCURRENCY)))
    return log, before[0], unexpected


@pytest.mark.exclusive
def test_sigkill_green_at_50_50_under_64_clients_costs_no_request(tmp_path: Path, blue_url: str) -> None:
    """Three runs: green is killed mid-load, then started again on its port. Requests in flight to it fail with a
    reset, which is green's own failure, so they move to blue outside the retry budget; new ones find green
    refusing connections. Between runs green's breaker (open 0.5 s) lets probes through and closes again."""
    green_port = free_port()
    green, green_url = start_model_server(tmp_path, ["digits:2"], port=green_port)
    gw, data, _ = start_gateway(tmp_path, routing([blue_url], [green_url], weights=(50, 50)),
                                {"BLUEGREEN_BREAKER__OPEN_S": "0.5"})
    try:
        with httpx.Client(base_url=data, timeout=10) as client:
            def green_answers() -> bool:
                return any(client.post(INFER, content=BODY, headers=NO_CACHE).headers["x-bluegreen-color"] == "green"
                           for _ in range(4))

            for run in range(3):  # the first on a fresh green; then twice on one restarted behind a reopened breaker
                if run:
                    green, _ = start_model_server(tmp_path, ["digits:2"], port=green_port)
                    wait_until(green_answers, 15, what="green serving again")
                kill = functools.partial(os.kill, green.pid, signal.SIGKILL)
                log, before, unexpected = asyncio.run(_load(data, 40, 0.6, kill))
                assert before > 20 and any(c == "green" for _, c in log[:before]), "green served before the kill"
                assert unexpected == [], (f"run {run}: {len(unexpected)} of {len(log)} requests failed while green "
                                          f"died (the fault came after {before}):\n" + "\n".join(unexpected[:5]))
                green.stop()
    finally:
        green.stop()
        assert gw.stop() == 0


def test_sigstop_green_under_64_clients_costs_no_request(tmp_path: Path, blue_url: str) -> None:
    """Green hangs (SIGSTOP): every request in flight to it times out together. The first few retries are
    rationed by the budget; by then green's breaker has opened, and the rest move to blue as green's failure."""
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    gw, data, _ = start_gateway(tmp_path, routing([blue_url], [green_url], weights=(50, 50)),
                                {"BLUEGREEN_BREAKER__OPEN_S": "60", "BLUEGREEN_UPSTREAM__ATTEMPT_TIMEOUT_S": "0.5"})
    try:
        log, before, unexpected = asyncio.run(_load(data, 100, 2.0, lambda: os.kill(green.pid, signal.SIGSTOP),
                                                     answers_after=2 * CONCURRENCY + 100))
        assert before > 50
        assert unexpected == [], (f"{len(unexpected)} of {len(log)} requests failed while green hung (the fault "
                                  f"came after {before}):\n" + "\n".join(unexpected[:5]))
        assert {c for _, c in log[before + 2 * CONCURRENCY:]} == {"blue"}
    finally:
        os.kill(green.pid, signal.SIGCONT)
        assert gw.stop() == 0
        green.stop()


@pytest.mark.exclusive
def test_a_client_deadline_shorter_than_the_attempt_timeout_still_fails_over(tmp_path: Path, blue_url: str,
                                                                            healthy_green_url: str) -> None:
    """x-bluegreen-timeout-ms 800 with a 1 s attempt timeout: the hanging color gets half the time, the other
    color the rest — a failover, not a 503."""
    proxy = FaultProxy(int(healthy_green_url.rsplit(":", 1)[1]))
    gw, data, _ = start_gateway(tmp_path, routing([blue_url], [proxy.url], weights=(50, 50)),
                                {"BLUEGREEN_BREAKER__OPEN_S": "60", "BLUEGREEN_UPSTREAM__ATTEMPT_TIMEOUT_S": "1.0"})
    try:
        proxy.set_mode("hang")
        with httpx.Client(base_url=data, timeout=10) as c:
            timed = []
            for _ in range(6):
                t0 = time.monotonic()
                r = c.post(INFER, content=BODY, headers={**NO_CACHE, "x-bluegreen-timeout-ms": "800"})
                timed.append((time.monotonic() - t0, r))
        expect_all((r for _, r in timed), 200, "a client deadline shorter than the attempt timeout")
        failed_over = [(t, r) for t, r in timed if r.headers.get("x-bluegreen-degraded") == "failover"]
        assert failed_over, "no request was routed to the hanging green"
        for t, r in failed_over:
            assert r.headers["x-bluegreen-color"] == "blue", describe(r)
            assert 0.35 <= t < 0.8 + 0.5, f"took {t:.3f} s"  # half of the 800 ms on green, then blue within the rest
    finally:
        assert gw.stop() == 0
        proxy.close()


@pytest.mark.exclusive
def test_both_colors_hung_serve_the_stale_answer_after_the_first_attempt(tmp_path: Path, blue_url: str,
                                                                         healthy_green_url: str) -> None:
    """With a stale entry at hand, the first attempt's timeout ends the forwarding: the stale answer comes after
    one attempt timeout (0.5 s here), not after the whole 2 s deadline."""
    proxies = [FaultProxy(int(u.rsplit(":", 1)[1])) for u in (blue_url, healthy_green_url)]
    env = {"BLUEGREEN_UPSTREAM__ATTEMPT_TIMEOUT_S": "0.5", "BLUEGREEN_UPSTREAM__DEADLINE_S": "2.0",
           "BLUEGREEN_CACHE__TTL_S": "0.2", "BLUEGREEN_BREAKER__OPEN_S": "60"}
    gw, data, _ = start_gateway(tmp_path, routing([proxies[0].url], [proxies[1].url], weights=(50, 50)), env)
    try:
        with httpx.Client(base_url=data, timeout=10) as c:
            expect(c.post(INFER, content=BODY))  # cached, fresh for 0.2 s, then stale
            time.sleep(0.3)  # the 0.2 s TTL's own clock: a request to see whether it expired would refresh it
            for p in proxies:
                p.set_mode("hang")
            t0 = time.monotonic()
            r = c.post(INFER, content=BODY)
            took = time.monotonic() - t0
        expect(r, 200, "both colors hung")
        assert r.headers["x-bluegreen-cache"] == "stale", describe(r)
        assert r.headers["x-bluegreen-degraded"] == "stale-cache", describe(r)
        assert took < 0.5 + 0.1 + 0.2, f"the stale answer took {took:.3f} s"  # 100 ms, plus slack for the machine
    finally:
        assert gw.stop() == 0
        for p in proxies:
            p.close()
