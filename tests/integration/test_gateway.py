"""The gateway as a real process in front of real model servers on loopback, with faults injected by
killing processes and by a TCP fault proxy. Deadlines here are behaviour bounds with wide margins."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from tests.integration.faultproxy import FaultProxy
from tests.procs import admin_headers, free_port, routing, start_gateway, start_model_server, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")

ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
       0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]})
INFER = "/v2/models/digits/infer"
# These tests exercise routing and failure handling: every request must reach a backend, not the cache.
NO_CACHE = {"cache-control": "no-cache, no-store"}


@dataclass
class Servers:
    blue: str
    green: str


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("servers")
    blue, blue_url = start_model_server(tmp, ["digits:1"])
    green, green_url = start_model_server(tmp, ["digits:2"])
    yield Servers(blue_url, green_url)
    blue.stop()
    green.stop()


def set_weights(admin: str, blue: int, green: int) -> None:
    r = httpx.put(f"{admin}/admin/v1/models/digits/split", json={"blue": blue, "green": green}, headers=admin_headers())
    assert r.status_code == 200, r.text


def breaker_states(admin: str, color: str) -> list[str]:
    doc = httpx.get(f"{admin}/admin/v1/models", headers=admin_headers()).json()
    model = next(m for m in doc["models"] if m["name"] == "digits")
    return [b["breaker"] for b in model["colors"][color]["backends"]]


def color_stats(admin: str, color: str) -> dict:  # type: ignore[type-arg]
    r = httpx.get(f"{admin}/admin/v1/models/digits/stats", headers=admin_headers())
    return r.json()["colors"][color]  # type: ignore[no-any-return]


async def fire(url: str, n: int, concurrency: int, headers: dict[str, str] | None = None,
               keys: list[str] | None = None) -> list[httpx.Response]:
    """``n`` predictions with ``concurrency`` workers; every response is kept in order."""
    results: list[httpx.Response | None] = [None] * n
    counter = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=20, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def worker() -> None:
            for i in counter:
                h = {**NO_CACHE, **(headers or {})}
                if keys is not None:
                    h["x-bluegreen-key"] = keys[i]
                results[i] = await c.post(INFER, content=BODY, headers=h)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


# ------------------------------------------------------------------------------------------ split and sticky keys


def test_weighted_split_and_sticky_keys(servers: Servers, tmp_path: Path) -> None:
    proc, data, admin = start_gateway(tmp_path, routing([servers.blue], [servers.green]))
    proc2 = None
    try:
        set_weights(admin, 80, 20)
        responses = asyncio.run(fire(data, 2000, 16))
        assert all(r.status_code == 200 for r in responses)
        green = sum(r.headers["x-bluegreen-color"] == "green" for r in responses)
        assert abs(green / len(responses) - 0.20) <= 0.03, green
        # Each color answered with its own version.
        for r in responses[:50]:
            expected = "1" if r.headers["x-bluegreen-color"] == "blue" else "2"
            assert r.headers["x-bluegreen-model-version"] == expected == r.json()["model_version"]

        keys = [f"user-{i}" for i in range(300)]
        first = [r.headers["x-bluegreen-color"] for r in asyncio.run(fire(data, 300, 8, keys=keys))]
        again = [r.headers["x-bluegreen-color"] for r in asyncio.run(fire(data, 300, 8, keys=keys))]
        assert first == again
        assert 0 < first.count("green") < 300

        set_weights(admin, 50, 50)
        raised = [r.headers["x-bluegreen-color"] for r in asyncio.run(fire(data, 300, 8, keys=keys))]
        assert all(b == "green" for a, b in zip(first, raised, strict=True) if a == "green"), \
            "raising green's weight moved a key from green to blue"
        assert raised.count("green") > first.count("green")

        # A second gateway process maps every key to the same color at the same weights.
        proc2, data2, admin2 = start_gateway(tmp_path, routing([servers.blue], [servers.green]), name="gateway2")
        set_weights(admin2, 50, 50)
        other = [r.headers["x-bluegreen-color"] for r in asyncio.run(fire(data2, 300, 8, keys=keys))]
        assert other == raised
    finally:
        assert proc.stop() == 0
        if proc2 is not None:
            proc2.stop()


# ------------------------------------------------------------------------------------------ failures


def test_sigkill_green_under_load(servers: Servers, tmp_path: Path) -> None:
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    proc, data, admin = start_gateway(tmp_path, routing([servers.blue], [green_url], weights=(50, 50)),
                                      {"BLUEGREEN_BREAKER__OPEN_S": "60"})
    try:
        log: list[tuple[float, int, str]] = []
        killed_at: list[float] = []

        async def load() -> None:
            stop = time.monotonic() + 4.0
            async with httpx.AsyncClient(base_url=data, timeout=20) as c:
                async def worker() -> None:
                    while time.monotonic() < stop:
                        r = await c.post(INFER, content=BODY, headers=NO_CACHE)
                        log.append((time.monotonic(), r.status_code, r.headers.get("x-bluegreen-color", "")))

                async def killer() -> None:
                    await asyncio.sleep(1.0)
                    os.kill(green.pid, signal.SIGKILL)
                    killed_at.append(time.monotonic())

                await asyncio.gather(killer(), *(worker() for _ in range(16)))

        asyncio.run(load())
        assert len(log) > 100
        assert [s for _, s, _ in log if s != 200] == [], "a client saw an error while green died"
        assert any(c == "green" for t, _, c in log if t < killed_at[0]), "green served before it was killed"
        late = [c for t, _, c in log if t > killed_at[0] + 2.0]
        assert late and set(late) == {"blue"}, "traffic still reached green 2 s after it died"
        assert breaker_states(admin, "green") == ["open"]
        assert color_stats(admin, "green")["errors"] > 0
    finally:
        green.stop()
        assert proc.stop() == 0


def test_half_open_lets_only_the_configured_probes_through(servers: Servers, tmp_path: Path) -> None:
    green, green_url = start_model_server(tmp_path, ["digits:2"], extra=["--fault-latency-ms", "2000"])
    proxy = FaultProxy(int(green_url.rsplit(":", 1)[1]))
    env = {"BLUEGREEN_BREAKER__OPEN_S": "1", "BLUEGREEN_BREAKER__HALF_OPEN_PROBES": "3",
           "BLUEGREEN_BREAKER__SLOW_CALL_DURATION_S": "10",  # the 2 s probes are slow but not failures here
           "BLUEGREEN_UPSTREAM__ATTEMPT_TIMEOUT_S": "5", "BLUEGREEN_UPSTREAM__DEADLINE_S": "8"}
    proc, data, admin = start_gateway(tmp_path, routing([servers.blue], [proxy.url], weights=(50, 50)), env)
    try:
        proxy.set_mode("reset")
        for _ in range(10):  # bounded: 20 green failures open it (minimum_calls)
            assert all(r.status_code == 200 for r in asyncio.run(fire(data, 20, 4)))
            if breaker_states(admin, "green") == ["open"]:
                break
        assert breaker_states(admin, "green") == ["open"]
        proxy.set_mode("pass")
        wait_until(lambda: breaker_states(admin, "green") == ["half_open"], 5, what="half-open")
        proxy.reset_counters()
        responses = asyncio.run(fire(data, 200, 200))
        assert [r.status_code for r in responses] == [200] * 200
        assert 1 <= proxy.max_in_flight <= 3, proxy.max_in_flight
        probes_answered = sum(r.headers["x-bluegreen-color"] == "green" for r in responses)
        assert probes_answered <= 3

        def closed_under_traffic() -> bool:  # a breaker changes state on calls: keep a trickle going
            asyncio.run(fire(data, 2, 2))
            return breaker_states(admin, "green") == ["closed"]

        wait_until(closed_under_traffic, 10, what="breaker to close")
    finally:
        assert proc.stop() == 0
        proxy.close()
        green.stop()


def test_interleaved_30_percent_errors_open_the_breaker(servers: Servers, tmp_path: Path) -> None:
    green, green_url = start_model_server(tmp_path, ["digits:2"], extra=["--fault-error-rate", "0.3"])
    proc, data, admin = start_gateway(tmp_path, routing([servers.blue], [green_url], weights=(50, 50)),
                                      {"BLUEGREEN_BREAKER__OPEN_S": "60"})
    try:
        responses = asyncio.run(fire(data, 200, 1))
        assert all(r.status_code == 200 for r in responses)  # every green 500 was retried on blue
        assert breaker_states(admin, "green") == ["open"]
        stats = color_stats(admin, "green")
        assert stats["count"] <= 50, "the breaker took more than one window (50 calls) to open"
        assert stats["errors"] >= 6
    finally:
        green.stop()
        assert proc.stop() == 0


def test_hanging_green_hits_the_deadline_while_blue_keeps_serving(servers: Servers, tmp_path: Path) -> None:
    proxy = FaultProxy(int(servers.green.rsplit(":", 1)[1]))
    env = {"BLUEGREEN_UPSTREAM__ATTEMPT_TIMEOUT_S": "0.5", "BLUEGREEN_BREAKER__OPEN_S": "60"}
    proc, data, admin = start_gateway(tmp_path, routing([servers.blue], [proxy.url], weights=(50, 50)), env)
    try:
        assert asyncio.run(fire(data, 4, 1))[0].status_code == 200
        proxy.set_mode("hang")

        async def scenario() -> tuple[list[tuple[float, httpx.Response]], list[float]]:
            async with httpx.AsyncClient(base_url=data, timeout=20) as c:
                async def timed(headers: dict[str, str]) -> tuple[float, httpx.Response]:
                    t0 = time.monotonic()
                    r = await c.post(INFER, content=BODY, headers={**NO_CACHE, **headers})
                    return time.monotonic() - t0, r

                split = [timed({}) for _ in range(10)]
                pinned = [timed({"x-bluegreen-color": "blue"}) for _ in range(20)]
                done = await asyncio.gather(*split, *pinned)
            return list(done[:10]), [t for t, _ in done[10:]]

        split, blue_times = asyncio.run(scenario())
        assert all(r.status_code == 200 for _, r in split)
        failed_over = [(t, r) for t, r in split if r.headers.get("x-bluegreen-degraded")]
        assert failed_over, "some requests were routed to the hanging green"
        for t, r in failed_over:
            assert r.headers["x-bluegreen-color"] == "blue"
            assert 0.45 <= t < 3.0  # the 0.5 s attempt deadline, then blue
        assert max(blue_times) < 0.4, "blue requests waited behind the hanging green"
        assert color_stats(admin, "green")["errors"] >= len(failed_over)
    finally:
        assert proc.stop() == 0
        proxy.close()


def test_both_colors_down_answer_503_fast_and_the_gateway_stays_ready(tmp_path: Path) -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    proc, data, _ = start_gateway(tmp_path, routing([dead[0]], [dead[1]], weights=(50, 50)))
    try:
        with httpx.Client(base_url=data) as c:
            for _ in range(30):
                t0 = time.monotonic()
                r = c.post(INFER, content=BODY, headers=NO_CACHE)
                elapsed = time.monotonic() - t0
                assert r.status_code == 503
                assert int(r.headers["retry-after"]) >= 1
                assert "no color" in r.json()["error"]
                assert r.headers["x-bluegreen-degraded"] == "unavailable"
                assert elapsed < 0.1, elapsed
            assert c.get("/v2/health/ready").status_code == 200
            assert c.get("/v2/models/digits/ready").status_code == 503
    finally:
        assert proc.stop() == 0


# ------------------------------------------------------------------------------------------ hostile input


def test_hostile_bodies_are_refused_and_never_reach_a_backend(servers: Servers, tmp_path: Path) -> None:
    proxy = FaultProxy(int(servers.blue.rsplit(":", 1)[1]))
    proc, data, _ = start_gateway(tmp_path, routing([proxy.url], [proxy.url]),
                                  {"BLUEGREEN_MAX_BODY_BYTES": str(256 * 1024)})
    try:
        with httpx.Client(base_url=data, timeout=10) as c:
            wait_until(lambda: c.get("/v2/models/digits").status_code == 200, 10, what="signature learned")
            assert c.post(INFER, content=BODY).status_code == 200
            proxy.reset_counters()

            def good(**changes: object) -> bytes:
                return orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                 "data": ROW, **changes}]})

            def chunks() -> Iterator[bytes]:
                for _ in range(10):
                    yield b"1" * 65536

            cases: list[tuple[bytes | Iterator[bytes], int]] = [
                (b"[" + b"0," * 200_000 + b"0]", 413),         # declared length over the limit
                (chunks(), 413),                               # chunked, no length, over the limit
                (b"{not json", 400),
                (b"[" * 100_000 + b"]" * 100_000, 400),        # deep nesting
                (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [NaN]}]}', 400),
                (good(name="pixels"), 400),
                (good(datatype="FP64"), 400),
                (good(shape=[1, 63]), 400),
                (good(shape=[2, 64]), 400),
                (good(shape=[64]), 400),
                (orjson.dumps({"inputs": "nope"}), 400),
            ]
            for body, status in cases:
                t0 = time.monotonic()
                r = c.post(INFER, content=body)
                assert r.status_code == status, (r.status_code, r.text[:200])
                assert "error" in r.json()
                assert time.monotonic() - t0 < 1.0
            assert c.post("/v2/models/nope/infer", content=BODY).status_code == 404
            assert proxy.forwarded == 0, "a hostile body reached the backend"
            assert c.post(INFER, content=BODY).status_code == 200
    finally:
        assert proc.stop() == 0
        proxy.close()


# ------------------------------------------------------------------------------------------ lifecycle


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    slow, slow_url = start_model_server(tmp_path, ["digits:1"], extra=["--fault-latency-ms", "700"])
    proc, data, _ = start_gateway(tmp_path, routing([slow_url], [slow_url]))
    try:
        async def scenario() -> list[int]:
            async with httpx.AsyncClient(base_url=data, timeout=20) as c:
                calls = [asyncio.ensure_future(c.post(INFER, content=BODY, headers=NO_CACHE)) for _ in range(20)]
                await asyncio.sleep(0.3)  # all 20 are now inside the model server's 700 ms
                proc.signal(signal.SIGTERM)
                return [r.status_code for r in await asyncio.gather(*calls)]

        assert asyncio.run(scenario()) == [200] * 20
        assert proc.wait(15) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{data}{INFER}", content=BODY)
    finally:
        proc.stop()
        slow.stop()
