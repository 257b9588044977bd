"""The prediction cache with real processes: model servers, gateways and a private redis-server on loopback."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import redis

from tests.integration.expect import describe, expect, expect_all
from tests.integration.faultproxy import FaultProxy
from tests.procs import admin_headers, routing, start_gateway, start_model_server, start_redis, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")
INFER = "/v2/models/digits/infer"


def body(seed: int, request_id: str | None = None) -> bytes:
    row = np.random.default_rng(seed).integers(0, 17, size=64).astype(float).tolist()
    doc: dict[str, object] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row}]}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def cache_stats(admin: str) -> dict:  # type: ignore[type-arg]
    return expect(httpx.get(f"{admin}/admin/v1/cache", headers=admin_headers())).json()  # type: ignore[no-any-return]


def inference_count(server: str, version: str) -> int:
    doc = expect(httpx.get(f"{server}/v2/models/digits/versions/{version}/stats")).json()
    return int(doc["model_stats"][0]["inference_count"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[str]:
    proc, url = start_model_server(tmp_path_factory.mktemp("cache-server"), ["digits:1", "digits:2", "digits:3"])
    yield url
    proc.stop()


def test_l1_hit_then_l2_hit_in_a_second_gateway(server: str, tmp_path: Path) -> None:
    rproc, rport = start_redis(tmp_path)
    env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{rport}/0"}
    a, data_a, admin_a = start_gateway(tmp_path, routing([server], [server]), env, name="a")
    b, data_b, admin_b = start_gateway(tmp_path, routing([server], [server]), env, name="b")
    try:
        first = expect(httpx.post(f"{data_a}{INFER}", content=body(1, "first")))
        assert first.headers["x-bluegreen-cache"] == "miss", describe(first)
        second = expect(httpx.post(f"{data_a}{INFER}", content=body(1, "second")))
        assert second.headers["x-bluegreen-cache"] == "hit", describe(second)
        assert second.json()["id"] == "second"  # the hit carries this request's id
        assert second.json()["outputs"] == first.json()["outputs"]
        assert cache_stats(admin_a)["l1_hits"] == 1

        r = redis.Redis(port=rport)
        wait_until(lambda: r.keys("bluegreen:cache:digits:1:*"), 5, what="the L2 write")
        third = expect(httpx.post(f"{data_b}{INFER}", content=body(1)))
        assert third.headers["x-bluegreen-cache"] == "hit", describe(third)
        assert "id" not in third.json()
        assert third.json()["outputs"] == first.json()["outputs"]
        assert cache_stats(admin_b)["l2_hits"] == 1
        r.close()
    finally:
        a.stop()
        b.stop()
        rproc.stop()


def test_concurrent_identical_cold_requests_make_one_upstream_call(tmp_path: Path) -> None:
    slow, slow_url = start_model_server(tmp_path, ["digits:1"], extra=["--fault-latency-ms", "300"])
    gw, data, _ = start_gateway(tmp_path, routing([slow_url], [slow_url]))
    try:
        before = inference_count(slow_url, "1")

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=data, timeout=20, limits=httpx.Limits(max_connections=200)) as c:
                return await asyncio.gather(*(c.post(INFER, content=body(42, f"r{i}")) for i in range(200)))

        responses = asyncio.run(burst())
        expect_all(responses, 200, "200 identical cold requests")
        assert inference_count(slow_url, "1") - before == 1
        assert [r.json()["id"] for r in responses] == [f"r{i}" for i in range(200)]
    finally:
        gw.stop()
        slow.stop()


def _gateway_time_s(r: httpx.Response) -> float:
    """The gateway's own account of a request (``server-timing``: upstream + gateway), in seconds."""
    parts = dict(p.strip().split(";dur=") for p in r.headers.get("server-timing", "").split(",") if ";dur=" in p)
    return sum(float(v) for v in parts.values()) / 1000


def _load(data: str, seconds: float, results: list[tuple[float, int]],
          gateway_times: list[float] | None = None, failures: list[str] | None = None) -> None:
    """Closed-loop load for ``seconds`` mixing repeated and fresh inputs; (latency, status) per request, the
    gateway's own time per request in ``gateway_times``, and each answer that was not a 200 in ``failures``."""
    async def run() -> None:
        stop = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=data, timeout=20) as c:
            async def worker(w: int) -> None:
                i = 0
                while time.monotonic() < stop:
                    seed = (w * 1000 + i) if i % 2 else (i % 20)
                    t0 = time.monotonic()
                    r = await c.post(INFER, content=body(seed))
                    results.append((time.monotonic() - t0, r.status_code))
                    if failures is not None and r.status_code != 200:
                        failures.append(describe(r))
                    if gateway_times is not None:
                        gateway_times.append(_gateway_time_s(r))
                    i += 1

            await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(run())


@pytest.mark.parametrize("fault", ["killed", "hanging"])
def test_redis_failure_never_fails_a_prediction_and_recovers(server: str, tmp_path: Path, fault: str) -> None:
    rproc, rport = start_redis(tmp_path)
    proxy = FaultProxy(rport)
    env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}
    gw, data, admin = start_gateway(tmp_path, routing([server], [server]), env)
    try:
        results: list[tuple[float, int]] = []
        gateway_times: list[float] = []
        failures: list[str] = []
        thread = threading.Thread(target=_load, args=(data, 2.5, results, gateway_times, failures))
        thread.start()
        wait_until(lambda: len(results) >= 50, 10, what="50 answers before the fault")
        if fault == "killed":
            rproc.signal(signal.SIGKILL)
            rproc.wait(5)
        else:
            proxy.set_mode("hang")
        thread.join(30)
        assert len(results) > 50
        assert failures == [], (f"{len(failures)} of {len(results)} predictions failed while Redis was down:\n"
                                + "\n".join(failures[:5]))
        # Bounded by the 50 ms cache timeout, with a wide margin: the gateway's own time per request (the client's
        # clock here also counts this test process's pauses, a thread beside a long test session's heap).
        assert max(gateway_times) < 1.0, sorted(gateway_times)[-5:]
        assert max(t for t, _ in results) < 5.0
        stats = cache_stats(admin)
        assert stats["l2_errors"] > 0, stats

        # Redis back: L2 writes and hits resume within 5 s, without restarting the gateway.
        if fault == "killed":
            rproc.stop()
            rproc, _ = start_redis(tmp_path, port=rport)
        else:
            proxy.set_mode("pass")
        r = redis.Redis(port=rport)

        def l2_resumed() -> bool:
            expect(httpx.post(f"{data}{INFER}", content=body(int(time.monotonic() * 1000) % 100_000 + 10_000)))
            return bool(r.keys("bluegreen:cache:*"))

        if fault == "killed":
            wait_until(l2_resumed, 5, interval=0.2, what="L2 writes to resume")
        else:
            keys_before = len(r.keys("bluegreen:cache:*"))
            wait_until(lambda: l2_resumed() and len(r.keys("bluegreen:cache:*")) > keys_before, 5, interval=0.2,
                       what="L2 writes to resume")
        r.close()
    finally:
        gw.stop()
        proxy.close()
        rproc.stop()


def test_a_repointed_color_never_serves_the_old_versions_cached_output(server: str, tmp_path: Path) -> None:
    rproc, rport = start_redis(tmp_path)
    env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{rport}/0"}
    doc = routing([server], [server], weights=(0, 100))
    gw, data, admin = start_gateway(tmp_path, doc, env)
    try:
        v2 = expect(httpx.post(f"{data}{INFER}", content=body(7)))
        assert v2.headers["x-bluegreen-model-version"] == "2", describe(v2)
        hit = expect(httpx.post(f"{data}{INFER}", content=body(7)))
        assert hit.headers["x-bluegreen-cache"] == "hit", describe(hit)
        expect(httpx.put(f"{admin}/admin/v1/models/digits/colors/green",
                         json={"version": "3", "backends": [server], "force": True}, headers=admin_headers()),
               200, "re-point green")
        v3 = expect(httpx.post(f"{data}{INFER}", content=body(7)))
        assert v3.headers["x-bluegreen-model-version"] == "3" == v3.json()["model_version"], describe(v3)
        assert v3.headers["x-bluegreen-cache"] == "miss", describe(v3)
    finally:
        gw.stop()

    # A changed routing file and a restart, while Redis keeps version 2's entries.
    redis_client = redis.Redis(port=rport)
    assert redis_client.keys("bluegreen:cache:digits:2:*")
    doc["models"]["digits"]["colors"]["green"]["version"] = "3"
    gw, data, _ = start_gateway(tmp_path, doc, env, name="restarted")
    try:
        for seed in (7, 7):
            resp = expect(httpx.post(f"{data}{INFER}", content=body(seed)))
            assert resp.headers["x-bluegreen-model-version"] == "3" == resp.json()["model_version"], describe(resp)
        direct = expect(httpx.post(f"{server}/v2/models/digits/versions/3/infer", content=body(7))).json()
        assert resp.json()["outputs"] == direct["outputs"]
    finally:
        gw.stop()
        redis_client.close()
        rproc.stop()


def test_stale_answer_when_both_colors_fail_and_503_without_one(server: str, tmp_path: Path) -> None:
    proxy = FaultProxy(int(server.rsplit(":", 1)[1]))
    env = {"BLUEGREEN_CACHE__TTL_S": "0.3", "BLUEGREEN_CACHE__STALE_S": "60"}
    gw, data, _ = start_gateway(tmp_path, routing([proxy.url], [proxy.url]), env)
    try:
        fresh = expect(httpx.post(f"{data}{INFER}", content=body(3, "a")))
        assert fresh.headers["x-bluegreen-cache"] == "miss", describe(fresh)
        # The two pauses are the 0.3 s TTL's own clock, not a condition to poll: any request to see whether the
        # entry has expired would itself refresh or read it.
        time.sleep(0.4)  # past the TTL: only stale now
        again = expect(httpx.post(f"{data}{INFER}", content=body(3)))
        assert again.headers["x-bluegreen-cache"] == "miss", f"an expired entry answered a healthy request: " \
                                                             f"{describe(again)}"

        time.sleep(0.4)  # the entry just refreshed is past its TTL too
        proxy.set_mode("close")
        stale = expect(httpx.post(f"{data}{INFER}", content=body(3, "b")), 200, "both colors failing, stale at hand")
        assert stale.headers["x-bluegreen-cache"] == "stale", describe(stale)
        assert stale.headers["x-bluegreen-degraded"] == "stale-cache", describe(stale)
        assert stale.json()["id"] == "b" and stale.json()["outputs"] == fresh.json()["outputs"], describe(stale)

        none = expect(httpx.post(f"{data}{INFER}", content=body(4)), 503, "both colors failing, nothing cached")
        assert "retry-after" in none.headers, describe(none)
    finally:
        gw.stop()
        proxy.close()


def test_cache_control_and_errors(server: str, tmp_path: Path) -> None:
    gw, data, _ = start_gateway(tmp_path, routing([server], [server]))
    try:
        url = f"{data}{INFER}"
        def cache_verdict(headers: dict[str, str] | None = None) -> str:
            r = expect(httpx.post(url, content=body(5), headers=headers))
            return f"{r.headers.get('x-bluegreen-cache')} ({describe(r)})"

        assert cache_verdict({"cache-control": "no-store"}).startswith("miss ")
        assert cache_verdict().startswith("miss "), "no-store stored the answer"
        assert cache_verdict().startswith("hit ")
        before = inference_count(server, "1")
        assert cache_verdict({"cache-control": "no-cache"}).startswith("bypass ")
        assert inference_count(server, "1") == before + 1
        bad = httpx.post(url, content=b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], '
                                      b'"data": [' + b'"x",' * 63 + b'"x"]}]}')
        expect(bad, 400, "strings in an FP32 tensor")  # the gateway refuses it with the model server's own check
        again = expect(httpx.post(url, content=bad.request.content), 400)
        assert "x-bluegreen-cache" not in again.headers, describe(again)  # refused before the cache
        assert inference_count(server, "1") == before + 1  # neither reached the model server
    finally:
        gw.stop()
